"""`python -m serving.cli` (index with a progress bar and a summary, search with ranked paths and
scores) on a real store and real images, run from a folder outside the checkout; the store
shared with the server, and the refusal while a server owns it."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.serving_fixtures import PYTHON, REPO, ServerProcess, tiny_checkpoint, write_image


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    pictures, cwd = base / "pictures", base / "elsewhere"
    cwd.mkdir()
    for index in range(6):
        write_image(pictures / "album" / f"c{index}.jpg", 700 + index)
    write_image(pictures / "album" / "sub" / "deep.png", 800)
    (pictures / "album" / "broken.jpg").write_text("not an image")
    (pictures / "album" / "notes.txt").write_text("hello")
    return {"base": base, "pictures": pictures, "cwd": cwd, "db": base / "db", "checkpoint": tiny_checkpoint(1)[0]}


def cli(env, *args, checkpoint=True):
    """Run from a folder outside the checkout, as a user would (PYTHONPATH points at this checkout
    so the test runs the code under test even where the shared environment links another clone)."""
    extra = ["--checkpoint", str(env["checkpoint"])] if checkpoint else []
    return subprocess.run([PYTHON, "-m", "serving.cli", *args, "--db-path", str(env["db"]), *extra],
                          cwd=env["cwd"], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(REPO), "SMART_GALLERY_CHECKPOINT": ""})


def test_index_then_search(env):
    album = env["pictures"] / "album"
    first = cli(env, "index", str(album), "--gallery", "family")
    assert first.returncode == 0, first.stderr
    assert "done: 7 added, 0 updated, 0 unchanged, 0 duplicates, 1 failed, 1 ignored" in first.stdout
    assert "failed: " in first.stdout and "broken.jpg" in first.stdout
    assert "100%" in first.stderr and "8/8" in first.stderr  # the progress bar
    assert "'family' now holds 7 images" in first.stdout

    again = cli(env, "index", str(album), "--gallery", "family", "--quiet", "--json")
    summary = json.loads(again.stdout)
    assert (summary["added"], summary["unchanged"], summary["failed"], summary["total_images"]) == (0, 7, 1, 7)
    assert "%" not in again.stderr

    found = cli(env, "search", "a red boat -people", "--gallery", "family", "--top-k", "3")
    assert found.returncode == 0, found.stderr
    lines = [line.split() for line in found.stdout.strip().splitlines()]
    assert [line[0] for line in lines] == ["1", "2", "3"]
    scores = [float(line[1]) for line in lines]
    assert scores == sorted(scores, reverse=True) and all(line[2].startswith(str(album)) for line in lines)

    listed = cli(env, "galleries", checkpoint=False)
    assert listed.returncode == 0 and listed.stdout.startswith("family\t7 images")


def test_clear_errors(env):
    unknown = cli(env, "search", "x", "--gallery", "nobody")
    assert unknown.returncode == 2 and "no gallery named 'nobody'" in unknown.stderr
    no_checkpoint = cli(env, "search", "x", "--gallery", "family", checkpoint=False)
    assert no_checkpoint.returncode == 2 and "--checkpoint" in no_checkpoint.stderr
    missing = cli(env, "index", str(env["pictures"] / "nope"), "--gallery", "family")
    assert missing.returncode == 1 and "no such folder" in missing.stderr


def test_refuses_while_a_server_owns_the_store_and_shares_it(env):
    server = ServerProcess(env["checkpoint"], env["db"], env["cwd"]).wait_ready()
    try:
        refused = cli(env, "index", str(env["pictures"] / "album"), "--gallery", "family")
        assert refused.returncode == 3
        assert "owned by a running server" in refused.stderr and "/images/add-folder" in refused.stderr
        assert cli(env, "search", "x", "--gallery", "family").returncode == 3
        with server.client() as client:  # the server sees what the CLI stored
            uid = client.post("/db/initialize", json={"user_name": "family"}).json()["user_id"]
            assert client.get("/db/info", params={"user_id": uid}).json()["images"] == 7
    finally:
        code, survivors = server.stop()
    assert code == 0 and not survivors
    assert cli(env, "search", "x", "--gallery", "family").returncode == 0  # free again


def test_commands_run_from_any_folder(tmp_path):
    """With the checkout installed in the environment (scripts/setup.sh), no PYTHONPATH needed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for module, args in (("serving.cli", ["--help"]), ("serving", ["--cfg", "job"]), ("training.train", ["--cfg", "job"]),
                         ("evaluation.evaluate", ["--cfg", "job"])):
        result = subprocess.run([PYTHON, "-m", module, *args], cwd=tmp_path, capture_output=True, text=True,
                                timeout=120, env=env)
        assert result.returncode == 0, f"{module} from {tmp_path}: {result.stderr[-2000:]} (run scripts/setup.sh)"
    assert list(tmp_path.iterdir()) == []  # no outputs/ or client.py left in the current folder
