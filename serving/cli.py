"""`python -m serving.cli index FOLDER --gallery NAME` and `python -m serving.cli search "QUERY" --gallery NAME`

The command line beside the server, on the same store folder (`db_path`, `gallery_db` by
default, as in configs/serve.yaml) and with the same rules (allowed roots, model id per
gallery, duplicates, batch-by-batch upserts).

It opens the store itself, so it needs the store to itself: an embedded Chroma store has
exactly one owner process (one that has loaded an index does not see what another adds), and
the store's folder lock enforces it. While a server owns the store, the CLI refuses with a
clear message (exit code 3); use the server then (the web page, or POST
/images/add-folder?background=true and /images/search). Going through the server's HTTP API
instead would have been the other choice; it was not taken so that the CLI works without a
running server and without an API key.

    python -m serving.cli index ~/Pictures --gallery me --checkpoint runs/x/best
    python -m serving.cli search "a red boat -people" --gallery me --checkpoint runs/x/best --top-k 5
    python -m serving.cli galleries
    python -m serving.cli prune --gallery me [--dry-run]           # drop records of files gone from the disk
    python -m serving.cli export --gallery me backup.npz            # vectors, records and model id in one file
    python -m serving.cli import backup.npz --checkpoint runs/x/best [--gallery new-name] [--reindex]
Settings: --checkpoint (or $SMART_GALLERY_CHECKPOINT), --db-path, and any key of
configs/serve.yaml as --set key=value (e.g. --set allowed_roots=[/photos] ingest.batch_size=16).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from serving.config import ConfigError, ServeSettings, configure_logging

CONFIG_FILE = Path(__file__).resolve().parents[1] / "configs" / "serve.yaml"
EXIT_USAGE, EXIT_ERROR, EXIT_LOCKED = 2, 1, 3


class StoreBusy(ConfigError):
    pass


def load_settings(checkpoint: str | None, db_path: str | None, overrides: list[str]) -> ServeSettings:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONFIG_FILE)
    for key in ("defaults", "hydra", "reindex"):
        cfg.pop(key, None)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    checkpoint = checkpoint or os.environ.get("SMART_GALLERY_CHECKPOINT")
    if not checkpoint:
        raise ConfigError("no checkpoint: pass --checkpoint PATH (a checkpoint folder) or set SMART_GALLERY_CHECKPOINT")
    cfg.checkpoint = checkpoint
    if db_path:
        cfg.db_path = db_path
    return ServeSettings.from_mapping(OmegaConf.to_container(cfg, resolve=True))


def open_gallery(settings: ServeSettings):
    from serving.__main__ import preflight
    from serving.gallery import Gallery
    from serving.store import StoreLockedError

    try:
        preflight(settings)
        return Gallery.open(settings)
    except (ConfigError, StoreLockedError) as error:
        if "in use by another process" in str(error):
            raise StoreBusy(
                f"the store {settings.db_dir} is owned by a running server (or another command); the CLI needs it "
                "to itself. Stop the server first, or use the server instead: the web page, or "
                "POST /images/add-folder?background=true and POST /images/search"
            ) from None
        raise


def find_user(gallery, name: str):
    user = gallery.store.find_user(name)
    if user is None:
        names = ", ".join(sorted(u.user_name for u in gallery.store.users())) or "none yet"
        raise ConfigError(f"no gallery named {name!r} in {gallery.store.path} (galleries: {names}); "
                          f"create it with `python -m serving.cli index FOLDER --gallery {name}`")
    return user


def cmd_index(args, settings: ServeSettings) -> int:
    from tqdm import tqdm

    from serving.ingest import IngestCancelled, IngestReport

    target = Path(args.folder).expanduser().absolute()
    if not target.is_dir():  # before loading the model
        from serving.errors import bad_request, not_found

        raise (bad_request(f"not a folder: {target}") if target.exists() else not_found(f"no such folder: {target}"))
    gallery = open_gallery(settings)
    try:
        info = gallery.initialize(args.gallery)
        new_key = _new_key(gallery, info)
        user = gallery.store.get_user(info["user_id"])
        gallery._require_model(user)
        folder = gallery._folder(str(target))
        started = time.perf_counter()
        report = IngestReport()
        entries = gallery.scan(folder, report)
        interrupted = False
        with tqdm(total=len(entries), unit="img", desc=f"indexing {folder.name or folder}", disable=args.quiet,
                  file=sys.stderr, dynamic_ncols=True) as bar:
            try:
                gallery.ingestor.ingest(user, entries, report, progress=bar.update)
            except (KeyboardInterrupt, IngestCancelled):
                interrupted = True
        seconds = time.perf_counter() - started
        summary = {"gallery": args.gallery, "user_id": user.user_id, "folder": str(folder), **report.as_dict(),
                   "seconds": round(seconds, 2), "total_images": gallery.store.count(user)}
        if args.json:
            print(json.dumps(summary))
        else:
            print(f"{'interrupted' if interrupted else 'done'}: {report.added} added, {report.updated} updated, "
                  f"{report.unchanged} unchanged, {len(report.duplicates)} duplicates, {len(report.failures)} failed, "
                  f"{report.ignored} ignored (not images) in {seconds:.1f} s; gallery {args.gallery!r} now holds "
                  f"{summary['total_images']} images")
            for failure in report.failures:
                print(f"  failed: {failure['path']}: {failure['reason']}")
            if interrupted:
                print("  the batches stored so far are kept; run the same command again to finish")
            if new_key:
                print(f"  the gallery's API key (shown once; needed when the server requires keys): {new_key}")
        return 130 if interrupted else 0
    finally:
        gallery.close()


def cmd_search(args, settings: ServeSettings) -> int:
    gallery = open_gallery(settings)
    try:
        user = find_user(gallery, args.gallery)
        result = gallery.search(user.user_id, args.query, top_k=args.top_k, negative=args.negative,
                                folder=str(Path(args.folder).expanduser().absolute()) if args.folder else None)
    finally:
        gallery.close()
    if args.json:
        print(json.dumps(result))
        return 0
    if not result["results"]:
        print("no results" if result["total_images"] else f"gallery {args.gallery!r} is empty: index a folder first")
    for hit in result["results"]:
        print(f"{hit['rank']:>3}  {hit['score']:.4f}  {hit['path']}")
    return 0


def open_store_only(settings: ServeSettings):
    """The gallery service without a model, for commands that never embed (prune, export)."""
    from serving.gallery import Gallery, UPLOAD_DIR
    from serving.paths import PathPolicy
    from serving.store import GalleryStore, StoreLockedError

    settings.db_dir.mkdir(parents=True, exist_ok=True)
    try:
        store = GalleryStore(settings.db_dir, **vars(settings.index))
    except StoreLockedError:
        raise StoreBusy(f"the store {settings.db_dir} is owned by a running server; stop it first, or use "
                        "POST /db/prune?user_id=... on the server") from None
    roots = list(settings.allowed_roots) + ([str(store.path / UPLOAD_DIR)] if settings.allowed_roots else [])
    return Gallery(store, _NoModel(), PathPolicy(roots), settings)


class _NoModel:
    """Stands in for the embedder where no picture is embedded; using it is a bug, so it says so."""
    model_id = None

    def close(self) -> None:
        pass

    def __getattr__(self, name):
        raise RuntimeError(f"this command has no model loaded (embedder.{name})")


def _new_key(gallery, info: dict) -> str | None:
    """A gallery created here gets its key like one created over HTTP (printed once)."""
    if not info.get("created"):
        return None
    from serving.keys import KeyRing

    return KeyRing(gallery.store.path).issue(info["user_id"])


def cmd_prune(args, settings: ServeSettings) -> int:
    gallery = open_store_only(settings)
    try:
        result = gallery.prune(find_user(gallery, args.gallery).user_id, dry_run=args.dry_run)
    finally:
        gallery.close()
    if args.json:
        print(json.dumps(result))
        return 0
    missing = [f for f in result["files"] if f["reason"] == "missing"]
    verb = "would remove" if args.dry_run else "removed"
    print(f"checked {result['checked']} images of {args.gallery!r}: {verb} {len(missing)} whose file is gone, "
          f"{result['changed']} changed since indexed (add their folder again to re-embed them)")
    for entry in result["files"]:
        print(f"  {entry['reason']}: {entry['path']}")
    return 0


def cmd_export(args, settings: ServeSettings) -> int:
    from serving.backup import export_gallery

    gallery = open_store_only(settings)
    try:
        summary = export_gallery(gallery.store, find_user(gallery, args.gallery), args.file)
    finally:
        gallery.close()
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"exported {summary['count']} images of {args.gallery!r} (model {summary['model_id']}) to "
              f"{summary['file']} ({summary['bytes']} bytes)")
    return 0


def cmd_import(args, settings: ServeSettings) -> int:
    from serving.backup import import_gallery, read_backup

    header = read_backup(args.file)[0]  # a bad file fails before the model loads
    gallery = open_gallery(settings)
    try:
        summary = import_gallery(gallery, args.file, name=args.gallery, reindex=args.reindex)
        summary["api_key"] = _new_key(gallery, {"created": summary["created"], "user_id": summary["user_id"]})
    finally:
        gallery.close()
    if args.json:
        print(json.dumps(summary))
        return 0
    how = "re-embedded from the files" if summary["reindexed"] else "vectors restored"
    print(f"imported {summary['imported']} of {header['count']} images into {summary['gallery']!r} ({how}); "
          f"it holds {summary['images']} images")
    for failure in summary["failed_files"]:
        print(f"  failed: {failure['path']}: {failure['reason']}")
    if summary["api_key"]:
        print(f"  the gallery's API key (shown once): {summary['api_key']}")
    return 0


def cmd_galleries(args, settings: ServeSettings) -> int:
    from serving.store import GalleryStore, StoreLockedError

    settings.db_dir.mkdir(parents=True, exist_ok=True)
    try:
        store = GalleryStore(settings.db_dir)
    except StoreLockedError:
        raise StoreBusy(f"the store {settings.db_dir} is owned by a running server; stop it first") from None
    with store:
        for user in sorted(store.users(), key=lambda u: u.user_name):
            print(f"{user.user_name}\t{store.count(user)} images\tmodel {store.model_id(user)}\t{user.user_id}")
    return 0


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", help="checkpoint folder (default: $SMART_GALLERY_CHECKPOINT)")
    common.add_argument("--db-path", help="store folder (default: db_path of configs/serve.yaml, gallery_db)")
    common.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="any configs/serve.yaml setting")
    common.add_argument("--json", action="store_true", help="print the result as JSON")
    main = argparse.ArgumentParser(prog="python -m serving.cli", description=__doc__.split("\n\n")[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = main.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", parents=[common], help="add every image under a folder to a gallery")
    index.add_argument("folder")
    index.add_argument("--gallery", required=True, help="gallery name (created if new)")
    index.add_argument("--quiet", action="store_true", help="no progress bar")
    search = commands.add_parser("search", parents=[common], help="search a gallery by text")
    search.add_argument("query", help='e.g. "a dog on a beach -people" (-word pushes matches down)')
    search.add_argument("--gallery", required=True)
    search.add_argument("--top-k", type=int, default=10)
    search.add_argument("--negative", help="text whose matches are pushed down")
    search.add_argument("--folder", help="only images under this folder")
    commands.add_parser("galleries", parents=[common], help="list the galleries in the store")
    prune = commands.add_parser("prune", parents=[common], help="remove records of files gone from the disk")
    prune.add_argument("--gallery", required=True)
    prune.add_argument("--dry-run", action="store_true", help="only report what is gone or changed")
    export = commands.add_parser("export", parents=[common], help="write a gallery (vectors, records, model id) "
                                                                  "to one backup file")
    export.add_argument("--gallery", required=True)
    export.add_argument("file", help="the backup file to write (.npz)")
    restore = commands.add_parser("import", parents=[common], help="restore a backup file into this store")
    restore.add_argument("file")
    restore.add_argument("--gallery", help="gallery name (default: the backup's)")
    restore.add_argument("--reindex", action="store_true",
                         help="the backup is of another model: embed the pictures again from their files")
    return main


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    configure_logging("warning")
    from serving.errors import GalleryError

    try:
        no_model = args.command in ("galleries", "prune", "export")
        checkpoint = args.checkpoint or ("-" if no_model else None)  # these need no model
        settings = load_settings(checkpoint, args.db_path, args.set)
        return {"index": cmd_index, "search": cmd_search, "galleries": cmd_galleries, "prune": cmd_prune,
                "export": cmd_export, "import": cmd_import}[args.command](args, settings)
    except StoreBusy as error:
        print(f"smart-gallery: {error}", file=sys.stderr)
        return EXIT_LOCKED
    except ConfigError as error:
        print(f"smart-gallery: {error}", file=sys.stderr)
        return EXIT_USAGE
    except GalleryError as error:
        print(f"smart-gallery: {error.detail}", file=sys.stderr)
        return EXIT_ERROR


def run() -> None:
    """Entry point (`python -m serving.cli`, the `smart-gallery` script): exits without running the
    interpreter's teardown, in which native threads of the store and the model libraries have
    aborted the process ("terminate called without an active exception") after the work was
    done. Every store write is committed by then and the store was closed."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
