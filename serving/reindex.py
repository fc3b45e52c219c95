"""`python -m serving.reindex checkpoint=PATH [db_path=...] [reindex.user_id=ID] [reindex.force=true]`

Re-embeds galleries from their stored paths with the given checkpoint, offline (the server
must be stopped: the store has one owner, and this command takes the same lock). Without
`reindex.user_id` it re-indexes every gallery whose collection was embedded by another model.
The running server offers the same as `POST /db/reindex?user_id=...`.
"""

from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from serving.__main__ import CONFIG_DIR, preflight
from serving.config import ConfigError, ServeSettings, configure_logging
from serving.store import UnknownUserError


def reindex(settings: ServeSettings, user_id: str | None = None, force: bool = False) -> list[dict]:
    from serving.gallery import Gallery

    gallery = Gallery.open(settings)
    try:
        if user_id:
            try:
                targets = [gallery.store.get_user(user_id)]
            except UnknownUserError:
                raise ConfigError(f"no gallery with user_id {user_id} in {settings.db_dir}") from None
        else:
            targets = [u for u in gallery.store.users() if force or gallery.store.model_id(u) != gallery.model_id]
        results = []
        for user in targets:
            result = gallery.reindex(user.user_id, force=force)
            result["user_name"] = user.user_name
            results.append(result)
        return results
    finally:
        gallery.close()


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="serve")
def main(cfg: DictConfig) -> None:
    configure_logging(cfg.log_level)
    options = OmegaConf.to_container(cfg.reindex, resolve=True)
    try:
        settings = ServeSettings.from_hydra(cfg)
        preflight(settings)
        results = reindex(settings, options.get("user_id"), bool(options.get("force")))
    except ConfigError as error:
        print(f"smart-gallery reindex: {error}", file=sys.stderr)
        sys.exit(2)
    if not results:
        print("nothing to re-index: every gallery already matches this checkpoint (reindex.force=true to redo)")
    for result in results:
        print(json.dumps({k: result[k] for k in ("user_name", "user_id", "previous_model_id", "model_id",
                                                  "reindexed", "failed", "seconds")}))
        for failure in result["failed_files"]:
            print(f"  failed: {failure['path']}: {failure['reason']}")


if __name__ == "__main__":
    main()
