"""The upload API over real HTTP (uvicorn on 127.0.0.1, httpx): resumable, authenticated, streamed."""

from __future__ import annotations

import hashlib
import os
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.reconciler.artifacts.archives import crafted_zip
from tests.reconciler.artifacts.conftest import UploadApi


def _client(api: UploadApi, token: str | None = None) -> httpx.Client:
    return httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {token or api.token}"},
                        trust_env=False, timeout=10)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(api: UploadApi) -> list[str]:
    return sorted(p.name for p in api.uploads.dir.iterdir()) + sorted(
        p.name for p in api.store.objects.iterdir() if p.name.startswith("."))


def test_upload_in_one_patch_then_complete(upload_api: UploadApi, good_mar: Path) -> None:
    data = good_mar.read_bytes()
    with _client(upload_api) as client:
        created = client.post("/api/v1/uploads", json={"name": "tiny.mar", "size": len(data)})
        assert created.status_code == 201, created.text
        upload = created.json()
        assert upload["offset"] == 0 and len(upload["id"]) == 32
        assert created.headers["location"] == f"/api/v1/uploads/{upload['id']}"
        url = upload["url"]
        patched = client.patch(url, content=data, headers={"Upload-Offset": "0"})
        assert patched.status_code == 200 and patched.json()["offset"] == len(data)
        head = client.head(url)
        assert head.headers["upload-offset"] == str(len(data)) and head.headers["upload-length"] == str(len(data))
        done = client.post(f"{url}/complete", json={"sha256": f"sha256:{_sha(good_mar)}"})
        assert done.status_code == 201, done.text
        body = done.json()
        assert body["sha256"] == f"sha256:{_sha(good_mar)}" and body["size"] == len(data)
        assert (body["model_name"], body["handler"], body["version"], body["name"]) == \
            ("tiny", "handler.py", "1.0", "tiny.mar")
        assert body["origin"] == {"file": {"sha256": body["sha256"]}}
        assert upload_api.store.path(body["sha256"]).read_bytes() == data
        assert client.head(url).status_code == 404  # the session is gone
        listed = client.get("/api/v1/artifacts").json()["artifacts"]
        assert [(a["sha256"], a["model_name"], a["name"]) for a in listed] == [(body["sha256"], "tiny", "tiny.mar")]
        assert client.get(f"/api/v1/artifacts/{body['sha256']}").json()["size"] == len(data)
        assert client.get("/api/v1/artifacts/sha256:" + "0" * 64).status_code == 404
    assert _leftovers(upload_api) == []


def test_resume_after_a_dropped_connection(upload_api: UploadApi, big_mar: Path) -> None:
    data = big_mar.read_bytes()
    with _client(upload_api) as client:
        url = client.post("/api/v1/uploads", json={"name": "big.mar"}).json()["url"]

        def dying_body() -> Iterator[bytes]:
            yield data[: 1 << 20]
            yield data[1 << 20: 3 << 20]
            raise ConnectionAbortedError("the network went away")

        with pytest.raises(ConnectionAbortedError):
            client.patch(url, content=dying_body(), headers={"Upload-Offset": "0"})
        # What arrived is kept; the client asks where to resume (the server may still be writing).
        deadline = time.monotonic() + 5
        while True:
            offset = int(client.head(url).headers["upload-offset"])
            response = client.patch(url, content=data[offset:], headers={"Upload-Offset": str(offset)})
            if response.status_code == 200 or time.monotonic() > deadline:
                break
            assert response.status_code == 409
            time.sleep(0.05)
        assert response.status_code == 200, response.text
        assert 0 < offset <= 3 << 20
        done = client.post(f"{url}/complete", json={"sha256": _sha(big_mar)})
        assert done.status_code == 201, done.text
        assert upload_api.store.path(done.json()["sha256"]).read_bytes() == data


def test_wrong_offset_is_a_conflict(upload_api: UploadApi, good_mar: Path) -> None:
    data = good_mar.read_bytes()
    with _client(upload_api) as client:
        url = client.post("/api/v1/uploads", json={"name": "tiny.mar"}).json()["url"]
        assert client.patch(url, content=data[:100], headers={"Upload-Offset": "0"}).json()["offset"] == 100
        conflict = client.patch(url, content=data[50:], headers={"Upload-Offset": "50"})
        assert conflict.status_code == 409 and conflict.json()["offset"] == 100
        assert conflict.headers["upload-offset"] == "100" and "offset mismatch" in conflict.json()["error"]
        assert client.patch(url, content=b"x", headers={}).status_code == 400  # no Upload-Offset
        assert client.patch(url, content=data[100:], headers={"Upload-Offset": "100"}).status_code == 200
        assert client.post(f"{url}/complete").status_code == 201


def test_bad_mar_is_refused_and_nothing_is_stored(upload_api: UploadApi, tmp_path: Path) -> None:
    bad = crafted_zip(tmp_path / "evil.mar", {"model.pt": b"w", "handler.py": b"h", "../../etc/passwd": b"x"})
    with _client(upload_api) as client:
        url = client.post("/api/v1/uploads", json={"name": "evil.mar"}).json()["url"]
        client.patch(url, content=bad.read_bytes(), headers={"Upload-Offset": "0"})
        refused = client.post(f"{url}/complete")
        assert refused.status_code == 422
        assert refused.json()["error"] == "evil.mar: entry '../../etc/passwd': path traversal ('..')"
        one_shot = client.put("/api/v1/artifacts", params={"name": "evil.mar"}, content=bad.read_bytes())
        assert one_shot.status_code == 422 and "path traversal" in one_shot.json()["error"]
        assert client.get("/api/v1/artifacts").json() == {"artifacts": []}
    assert upload_api.store.list() == [] and _leftovers(upload_api) == []


def test_digest_mismatch_and_incomplete_upload(upload_api: UploadApi, good_mar: Path) -> None:
    data = good_mar.read_bytes()
    with _client(upload_api) as client:
        url = client.post("/api/v1/uploads", json={"name": "tiny.mar", "size": len(data)}).json()["url"]
        client.patch(url, content=data[:10], headers={"Upload-Offset": "0"})
        early = client.post(f"{url}/complete")
        assert early.status_code == 409 and early.json()["offset"] == 10
        too_much = client.patch(url, content=data[10:] + b"extra", headers={"Upload-Offset": "10"})
        assert too_much.status_code == 413
        offset = int(client.head(url).headers["upload-offset"])
        client.patch(url, content=data[offset:], headers={"Upload-Offset": str(offset)})
        wrong = client.post(f"{url}/complete", json={"sha256": "sha256:" + "0" * 64})
        assert wrong.status_code == 422 and "expected sha256:0000" in wrong.json()["error"]
    assert upload_api.store.list() == [] and _leftovers(upload_api) == []


def test_one_shot_put(upload_api: UploadApi, good_mar: Path) -> None:
    with _client(upload_api) as client:
        def body() -> Iterator[bytes]:
            with open(good_mar, "rb") as fh:
                while chunk := fh.read(300):
                    yield chunk

        stored = client.put("/api/v1/artifacts", params={"name": "tiny.mar", "sha256": _sha(good_mar)},
                            content=body())
        assert stored.status_code == 201, stored.text
        assert stored.json()["model_name"] == "tiny" and stored.json()["sha256"] == f"sha256:{_sha(good_mar)}"
        mismatch = client.put("/api/v1/artifacts", params={"name": "x.mar", "sha256": "1" * 64},
                              content=good_mar.read_bytes())
        assert mismatch.status_code == 422
    assert len(upload_api.store.list()) == 1 and _leftovers(upload_api) == []


def test_every_route_needs_the_token(upload_api: UploadApi) -> None:
    routes = [("POST", "/api/v1/uploads"), ("HEAD", "/api/v1/uploads/x" * 1), ("GET", "/api/v1/uploads/abc"),
              ("PATCH", "/api/v1/uploads/abc"), ("DELETE", "/api/v1/uploads/abc"),
              ("POST", "/api/v1/uploads/abc/complete"), ("PUT", "/api/v1/artifacts"), ("GET", "/api/v1/artifacts"),
              ("GET", "/api/v1/artifacts/sha256:" + "0" * 64)]
    with httpx.Client(base_url=upload_api.url, trust_env=False) as anonymous, \
            _client(upload_api, token="not-the-token") as wrong:
        for method, path in routes:
            assert anonymous.request(method, path, content=b"x").status_code == 401, (method, path)
            assert wrong.request(method, path, content=b"x").status_code == 401, (method, path)
    assert upload_api.store.list() == [] and list(upload_api.uploads.dir.iterdir()) == []


def test_upload_ids_are_unguessable_and_checked(upload_api: UploadApi) -> None:
    with _client(upload_api) as client:
        ids = {client.post("/api/v1/uploads", json={"name": "a.mar"}).json()["id"] for _ in range(5)}
        assert len(ids) == 5
        for bogus in ("..%2F..%2Fetc", "a" * 31, "a" * 32):
            assert client.head(f"/api/v1/uploads/{bogus}").status_code == 404
        assert client.post("/api/v1/uploads", json={"name": "../x.mar"}).status_code == 400
        one = ids.pop()
        assert client.delete(f"/api/v1/uploads/{one}").status_code == 204
        assert client.get(f"/api/v1/uploads/{one}").status_code == 404


def test_abandoned_uploads_are_cleaned(upload_api: UploadApi) -> None:
    with _client(upload_api) as client:
        old = client.post("/api/v1/uploads", json={"name": "old.mar"}).json()
        client.patch(old["url"], content=b"partial", headers={"Upload-Offset": "0"})
        fresh = client.post("/api/v1/uploads", json={"name": "fresh.mar"}).json()
    stale = time.time() - 2 * upload_api.uploads.abandon_after
    for suffix in (".part", ".json"):
        os.utime(upload_api.uploads.dir / f"{old['id']}{suffix}", (stale, stale))
    assert upload_api.uploads.cleanup() == [old["id"]]
    assert upload_api.uploads.get(old["id"]) is None and upload_api.uploads.get(fresh["id"]) is not None


def test_a_large_upload_streams_to_disk(upload_api: UploadApi) -> None:
    """64 MiB through PATCH: the server (in this process) never holds more than a few MiB."""
    size = 64 << 20
    chunk = os.urandom(1 << 20)
    with _client(upload_api) as client:
        url = client.post("/api/v1/uploads", json={"name": "blob.bin", "size": size}).json()["url"]
        peaks: list[int] = []
        tracemalloc.start()
        try:
            sender = threading.Thread(target=lambda: peaks.append(client.patch(
                url, content=(chunk for _ in range(64)), headers={"Upload-Offset": "0"}).status_code))
            sender.start()
            sender.join(30)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peaks == [200]
        done = client.post(f"{url}/complete").json()
        assert done["size"] == size and done["model_name"] is None
    assert peak < 24 << 20, f"peak {peak / 2**20:.1f} MiB"
