"""The API's bearer token: a wrong or non-ASCII Authorization header is a 401, never a 500."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.testclient import TestClient

from modelfleet.reconciler.api.app import make_api
from modelfleet.reconciler.artifacts.store import ArtifactStore

TOKEN = "api-t0ken"


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    daemon: Any = SimpleNamespace(
        status=SimpleNamespace(to_json=lambda: {"hosts": [{"name": "h1"}]}, observed_once=True),
        artifacts=ArtifactStore(tmp_path / "state"))
    return TestClient(make_api(daemon, TOKEN, None, lambda reason: None), raise_server_exceptions=False)


@pytest.mark.parametrize("path", ["/api/v1/hosts", "/api/v1/artifacts"])
@pytest.mark.parametrize("authorization", [
    "Bearer api-t0kén".encode(),  # non-ASCII (UTF-8 bytes on the wire)
    b"Bearer \xff\xfe\xfd",  # not text at all
    b"Bearer api-t0ken-longer",  # wrong length
    b"Basic api-t0ken",
])
def test_a_bad_authorization_header_is_401(client: TestClient, path: str, authorization: bytes) -> None:
    response = client.get(path, headers={b"Authorization": authorization})
    assert response.status_code == 401, response.text
    assert client.get(path).status_code == 401


@pytest.mark.parametrize(("path", "key"), [("/api/v1/hosts", "hosts"), ("/api/v1/artifacts", "artifacts")])
def test_the_token_opens_the_api(client: TestClient, path: str, key: str) -> None:
    response = client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200 and key in response.json()
