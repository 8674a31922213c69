"""Fixtures for the artifact tests: real archives built once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette

from modelfleet.reconciler.api.artifacts import artifact_routes
from modelfleet.reconciler.artifacts.store import ArtifactStore
from modelfleet.reconciler.artifacts.uploads import UploadManager
from tests.http_server import ServerThread
from tests.reconciler.artifacts.archives import build_mar


@pytest.fixture(scope="session")
def mar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mars")


@pytest.fixture(scope="session")
def good_mar(mar_dir: Path) -> Path:
    """tiny.mar built by the real torch-model-archiver 0.12 CLI (state dict + custom handler)."""
    return build_mar(mar_dir)


API_TOKEN = "mf-api-token-7c1b0e"


@dataclass
class UploadApi:
    url: str
    store: ArtifactStore
    uploads: UploadManager
    token: str


class _Swappable:
    """An ASGI app that forwards to ``self.app``: one server per session, a fresh app per test."""

    def __init__(self) -> None:
        self.app: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


@pytest.fixture(scope="session")
def _api_server() -> Iterator[tuple[ServerThread, _Swappable]]:
    swappable = _Swappable()
    server = ServerThread.for_app(swappable).start()
    try:
        yield server, swappable
    finally:
        server.stop()


@pytest.fixture
def upload_api(tmp_path: Path, _api_server: tuple[ServerThread, _Swappable]) -> UploadApi:
    """The artifact routes, mounted like the daemon does, served by uvicorn on 127.0.0.1."""
    server, swappable = _api_server
    store = ArtifactStore(tmp_path / "state")
    uploads = UploadManager(store)
    swappable.app = Starlette(routes=artifact_routes(store, API_TOKEN, uploads=uploads))
    return UploadApi(server.url, store, uploads, API_TOKEN)


@pytest.fixture(scope="session")
def big_mar(mar_dir: Path) -> Path:
    """A real archive of ~6 MiB (random, incompressible extra file): big enough to drop mid-way."""
    extra = mar_dir / "weights.bin"
    extra.write_bytes(os.urandom(6 << 20))
    return build_mar(mar_dir / "big", "big", extra=[extra])
