"""The OpenAPI spec is the contract: schemathesis (pinned in pyproject's test extras) drives a
live `python -m serving` over every route of its own /openapi.json, once without keys and once
with keys, and must find no 5xx, no undocumented status code and no response that breaks its
schema. The generated case count is printed (pytest -s shows it)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.serving_fixtures import ServerProcess, tiny_checkpoint, write_image

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
ADMIN_KEY = "contract-admin-key-0123456789"
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
          "response_schema_conformance")
MAX_EXAMPLES = 20  # per operation and phase: ~850 cases, ~10 s per configuration on 2 cores


def _prepare(server: ServerProcess, pictures: Path, headers: dict) -> dict:
    """A gallery with images and a finished job, so generated requests reach real records."""
    with server.client() as client:
        created = client.post("/db/initialize", json={"user_name": "contract"})
        assert created.status_code == 200, created.text
        gallery = created.json()
        key = {"X-API-Key": gallery["api_key"]} if headers else {}
        uid = gallery["user_id"]
        added = client.post("/images/add-folder", params={"user_id": uid}, json={"folder_path": str(pictures)},
                            headers=key)
        assert added.status_code == 200 and added.json()["added"] == 4, added.text
        image = client.get("/images", params={"user_id": uid}, headers=key).json()["images"][0]["id"]
        job = client.post("/images/add-folder", params={"user_id": uid, "background": "true"},
                          json={"folder_path": str(pictures)}, headers=key).json()["job_id"]
    return {"user_id": uid, "image_id": image, "job_id": job, "key": gallery["api_key"]}


@pytest.mark.parametrize("auth", ["no-keys", "with-keys"])
def test_every_route_keeps_its_openapi_contract(tmp_path, auth):
    checkpoint, _ = tiny_checkpoint(1)
    pictures = tmp_path / "pictures"
    for index in range(4):
        write_image(pictures / f"p{index}.jpg", 500 + index)
    overrides = [f"api_key={ADMIN_KEY}"] if auth == "with-keys" else ["api_key=null"]
    server = ServerProcess(checkpoint, tmp_path / "db", tmp_path, *overrides, "log_level=info").wait_ready()
    ids = {"key": "sgk_not-issued"}
    try:
        spec = httpx.get(f"{server.url}/openapi.json").json()
        schemes = spec.get("components", {}).get("securitySchemes", {})
        assert bool(schemes) == (auth == "with-keys"), schemes  # security only when keys are required
        assert "text/html" in spec["paths"]["/"]["get"]["responses"]["200"]["content"]
        listing = spec["paths"]["/images"]["get"]
        offset = next(p for p in listing["parameters"] if p["name"] == "offset")["schema"]
        assert offset["maximum"] <= 2**32 - 1  # Chroma's offset is a u32: a bigger one was a 500
        for path, methods in spec["paths"].items():
            for method, operation in methods.items():
                responses = operation["responses"]
                if path not in ("/", "/health"):
                    assert ("401" in responses) == (auth == "with-keys"), (path, method)
                if path not in ("/", "/health", "/info"):
                    assert "422" in responses and ("404" in responses) == (path not in ("/db/initialize", "/db/import")), (path, method)
                    assert responses["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")

        ids = _prepare(server, pictures, {"auth": True} if auth == "with-keys" else {})
        config = tmp_path / "schemathesis.toml"
        config.write_text("[parameters]\n" + "".join(
            f'"{where}.{name}" = "{ids[name]}"\n'
            for where, name in (("query", "user_id"), ("path", "image_id"), ("path", "job_id"))))
        command = [str(SCHEMATHESIS), "--config-file", str(config), "run", f"{server.url}/openapi.json",
                   "--checks", CHECKS, "--max-examples", str(MAX_EXAMPLES), "--seed", "9",
                   "--phases", "examples,coverage,fuzzing", "--workers", "1", "--no-shrink", "--warnings", "off"]
        if auth == "with-keys":  # the admin key: rotate and revoke are among the routes fuzzed, so a gallery
            command += ["--header", f"X-API-Key: {ADMIN_KEY}"]  # key would stop working mid-run
        started = time.monotonic()
        run = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)
        output = run.stdout + run.stderr
        generated = re.search(r"(\d+) generated", output)
        print(f"\nschemathesis {auth}: {generated.group(0) if generated else 'no count'} cases, "
              f"{len(spec['paths'])} paths, {time.monotonic() - started:.1f} s")
        assert run.returncode == 0 and "No issues found" in output, output[-6000:]
        assert generated and int(generated.group(1)) >= 500, output[-2000:]
        with server.client() as client:  # the gallery survived the fuzzing in a readable state
            key = {"X-API-Key": ADMIN_KEY} if auth == "with-keys" else {}
            assert client.get("/db/info", params={"user_id": ids["user_id"]}, headers=key).status_code == 200
    finally:
        server.stop()
    log = server.log()
    assert ids["key"] not in log and ADMIN_KEY not in log  # keys never reach the log
    assert "Traceback" not in log, log[-4000:]
