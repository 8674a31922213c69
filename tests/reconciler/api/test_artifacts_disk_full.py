"""The artifact API on a full disk: 507 with a JSON message, and nothing half written kept or visible.

The "disk" is a quota on the files the artifact store and the upload sessions write (what fits is
written, then the write fails with ENOSPC, as on a real filesystem), or a rename that fails; the
API and the store above it are the real ones. The daemon on a really full tmpfs is
tests/integration/test_faults_state.py.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from modelfleet.reconciler.api.artifacts import artifact_routes
from modelfleet.reconciler.artifacts import store as store_module
from modelfleet.reconciler.artifacts import uploads as uploads_module
from modelfleet.reconciler.artifacts.store import ArtifactStore
from modelfleet.reconciler.artifacts.uploads import UploadManager

DATA = os.urandom(5000)
DIGEST = hashlib.sha256(DATA).hexdigest()


class TinyDisk:
    """``free`` bytes left for the files opened for writing through ``open``; beyond that a write
    puts what fits on disk and fails with ``error`` (ENOSPC: "No space left on device")."""

    def __init__(self, free: int, error: int = errno.ENOSPC) -> None:
        self.free = free
        self.error = error

    def open(self, file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        real = open(file, mode, *args, **kwargs)  # noqa: SIM115 - the wrapper closes it
        return _Quota(real, self) if any(c in mode for c in "wax+") else real


class _Quota:
    def __init__(self, real: Any, disk: TinyDisk) -> None:
        self._real = real
        self._disk = disk

    def write(self, data: bytes) -> int:
        if len(data) > self._disk.free:
            fits = self._disk.free
            self._real.write(data[:fits])
            self._real.flush()
            self._disk.free = 0
            raise OSError(self._disk.error, os.strerror(self._disk.error))
        self._disk.free -= len(data)
        return int(self._real.write(data))

    def __enter__(self) -> _Quota:
        return self

    def __exit__(self, *exc: object) -> None:
        self._real.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class FailingReplace:
    """The module's ``os`` with an ``os.replace`` that fails (ENOSPC) for targets under ``under``."""

    def __init__(self, under: Path) -> None:
        self.under = under

    def replace(self, src: Any, dst: Any) -> None:
        if Path(dst).parent == self.under:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.replace(src, dst)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[SimpleNamespace]:
    store = ArtifactStore(tmp_path / "state")
    uploads = UploadManager(store)
    app = Starlette(routes=artifact_routes(store, None, uploads=uploads))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield SimpleNamespace(client=client, store=store, uploads=uploads)


def _everything(api: SimpleNamespace) -> list[str]:
    """Every file the store and the sessions hold, temporary ones included."""
    root: Path = api.store.root
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _full(monkeypatch: pytest.MonkeyPatch, free: int, error: int = errno.ENOSPC) -> TinyDisk:
    disk = TinyDisk(free, error)
    monkeypatch.setattr(store_module, "open", disk.open, raising=False)
    monkeypatch.setattr(uploads_module, "open", disk.open, raising=False)
    return disk


def _says_disk_full(body: dict[str, Any], api: SimpleNamespace) -> None:
    message = body["error"]
    assert "disk full" in message and "bytes free" in message and "free space under stateDir" in message
    assert str(api.store.root) in message and "upload again" in message


def test_a_one_shot_upload_on_a_full_disk_is_507_and_leaves_nothing(api: SimpleNamespace,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    disk = _full(monkeypatch, free=1000)
    response = api.client.put("/api/v1/artifacts?name=blob.bin", content=DATA)
    assert response.status_code == 507, response.text
    _says_disk_full(response.json(), api)
    assert _everything(api) == []  # the 1000 bytes that fitted are gone with their temporary file
    assert api.client.get("/api/v1/artifacts").json() == {"artifacts": []}
    assert api.client.get(f"/api/v1/artifacts/sha256:{DIGEST}").status_code == 404
    disk.free = 1 << 20  # space is freed: the same upload works
    response = api.client.put("/api/v1/artifacts?name=blob.bin", content=DATA)
    assert response.status_code == 201, response.text
    assert api.store.path(DIGEST).read_bytes() == DATA


def test_another_write_error_is_a_500_with_a_json_message(api: SimpleNamespace,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _full(monkeypatch, free=1000, error=errno.EIO)
    response = api.client.put("/api/v1/artifacts?name=blob.bin", content=DATA)
    assert response.status_code == 500
    assert "disk I/O error" in response.json()["error"]
    assert _everything(api) == []


def test_a_rename_into_the_store_that_fails_for_a_full_disk_is_507(api: SimpleNamespace,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "os", FailingReplace(api.store.objects))
    response = api.client.put("/api/v1/artifacts?name=blob.bin", content=DATA)
    assert response.status_code == 507, response.text
    _says_disk_full(response.json(), api)
    assert _everything(api) == []


def test_metadata_that_does_not_fit_does_not_fail_a_stored_artifact(api: SimpleNamespace,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "os", FailingReplace(api.store.meta_dir))
    response = api.client.put("/api/v1/artifacts?name=blob.bin", content=DATA)
    assert response.status_code == 201, response.text  # complete and in place: the metadata is informative
    assert response.json()["sha256"] == f"sha256:{DIGEST}"
    assert _everything(api) == [f"sha256/{DIGEST}"]  # no temporary metadata file left either


def test_a_resumable_upload_that_fills_the_disk_is_507_and_its_session_is_removed(
        api: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    created = api.client.post("/api/v1/uploads", json={"name": "blob.bin", "size": len(DATA)})
    assert created.status_code == 201
    url = created.json()["url"]
    _full(monkeypatch, free=1000)
    response = api.client.patch(url, content=DATA, headers={"Upload-Offset": "0"})
    assert response.status_code == 507, response.text
    _says_disk_full(response.json(), api)
    assert "upload was removed" in response.json()["error"]
    assert api.client.head(url).status_code == 404  # its 1000 bytes would have kept the disk full
    assert _everything(api) == []


def test_a_session_that_cannot_be_created_on_a_full_disk_is_507(api: SimpleNamespace,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uploads_module, "os", FailingReplace(api.uploads.dir))
    response = api.client.post("/api/v1/uploads", json={"name": "blob.bin"})
    assert response.status_code == 507, response.text
    assert "disk full" in response.json()["error"] and "no upload was started" in response.json()["error"]
    assert _everything(api) == []


def test_completing_an_upload_on_a_full_disk_is_507_and_stores_nothing(api: SimpleNamespace,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    url = api.client.post("/api/v1/uploads", json={"name": "blob.bin", "size": len(DATA)}).json()["url"]
    assert api.client.patch(url, content=DATA, headers={"Upload-Offset": "0"}).status_code == 200
    monkeypatch.setattr(store_module, "os", FailingReplace(api.store.objects))
    response = api.client.post(f"{url}/complete", json={"sha256": f"sha256:{DIGEST}"})
    assert response.status_code == 507, response.text
    _says_disk_full(response.json(), api)
    assert _everything(api) == [] and not api.store.has(DIGEST)
