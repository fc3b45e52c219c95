"""Per-gallery keys off loopback (issue 9): a server configured for 0.0.0.0, run in-process with
FastAPI's TestClient (nothing is bound), with a real gallery worker and store. Only the admin
key creates galleries there; a gallery key opens its own gallery only. Plus the settings rules."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from litserve.utils import wrap_litserve_start

from serving.api import build_server
from serving.config import ConfigError, ServeSettings
from tests.serving_fixtures import tiny_checkpoint, write_image

ADMIN = "admin-key-off-loopback-0123456789"


def settings(**values) -> ServeSettings:
    return ServeSettings.from_mapping({"checkpoint": "-", **values})


def test_when_keys_are_required(tmp_path):
    assert not settings().auth_enabled  # loopback, no admin key: the original open API
    assert settings(api_key=ADMIN).auth_enabled
    assert settings(auth=True).auth_enabled and settings(auth="true").auth_enabled
    assert not settings(api_key=ADMIN, auth=False).auth_enabled  # loopback may turn them off
    public = settings(host="0.0.0.0", api_key=ADMIN, allowed_roots=[str(tmp_path)], auth=False)
    assert public.auth_enabled
    with pytest.raises(ConfigError, match="loopback only"):
        public.validate()
    with pytest.raises(ConfigError, match="auth must be"):
        settings(auth="sometimes").validate()


def test_off_loopback_only_the_admin_key_creates_galleries(tmp_path):
    root = tmp_path / "root"
    write_image(root / "k.jpg", 77)
    checkpoint, _ = tiny_checkpoint(1)
    config = ServeSettings.from_mapping({
        "checkpoint": str(checkpoint), "db_path": str(tmp_path / "db"), "host": "0.0.0.0",
        "allowed_roots": [str(root)], "api_key": ADMIN, "log_level": "warning"})
    config.validate()
    with wrap_litserve_start(build_server(config)) as server, TestClient(server.app) as client:
        deadline = time.monotonic() + 90
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "worker did not become ready"
            time.sleep(0.2)
        body = {"user_name": "public"}
        assert client.post("/db/initialize", json=body).status_code == 401  # no key: not even creating
        created = client.post("/db/initialize", json=body, headers={"X-API-Key": ADMIN})
        assert created.status_code == 200 and created.json()["api_key"], created.text
        key = {"X-API-Key": created.json()["api_key"]}
        uid = created.json()["user_id"]
        other = client.post("/db/initialize", json={"user_name": "other"}, headers=key)
        assert other.status_code == 403 and "admin key" in other.json()["detail"]  # a gallery key creates nothing
        assert client.post("/db/initialize", json=body, headers=key).json()["user_id"] == uid  # opens its own
        added = client.post("/images/add", params={"user_id": uid}, json={"image_path": str(root / "k.jpg")},
                            headers=key)
        assert added.status_code == 200, added.text
        assert client.get("/images", params={"user_id": uid}).status_code == 401
        assert client.get("/info", headers=key).status_code == 401  # server info: admin only
        assert client.get("/info", headers={"X-API-Key": ADMIN}).status_code == 200
        assert client.get("/", headers={}).status_code == 200 and client.get("/health").status_code == 200


def test_a_key_rotated_in_one_process_stops_working_in_another(tmp_path):
    """Two KeyRings on one store folder stand for two gallery workers (Chroma server mode)."""
    from serving.keys import Caller, KeyRing, key_hash

    first, second = KeyRing(tmp_path), KeyRing(tmp_path)
    old = first.issue("gallery-a")
    assert second.owner(key_hash(old)) == "gallery-a"
    new = second.issue("gallery-a")  # rotated by the other worker
    assert first.owner(key_hash(old)) is None and first.owner(key_hash(new)) == "gallery-a"
    other = first.issue("gallery-b")
    assert second.owner(key_hash(other)) == "gallery-b" and second.owner(key_hash(new)) == "gallery-a"  # both kept
    first.authorize(Caller(key_hash=key_hash(new)), "gallery-a")
    with pytest.raises(Exception) as refused:
        first.authorize(Caller(key_hash=key_hash(new)), "gallery-b")
    assert refused.value.status_code == 404
    assert second.revoke("gallery-a") and first.owner(key_hash(new)) is None
    assert old not in (tmp_path / "keys.json").read_text() and oct((tmp_path / "keys.json").stat().st_mode)[-3:] == "600"
