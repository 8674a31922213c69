"""``POST /api/v1/confirm/<sha>``: token-protected, remembered in the store, triggers a pass."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.testclient import TestClient

from modelfleet.reconciler.api.app import make_api
from modelfleet.reconciler.artifacts.store import ArtifactStore
from modelfleet.reconciler.daemon.store import FACT_CONFIRMED_DELETIONS, Store

TOKEN = "api-t0ken"
SHA = "0123456789abcdef0123456789abcdef01234567"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def setup(tmp_path: Path) -> tuple[TestClient, Store, list[str]]:
    fired: list[str] = []
    store = Store(tmp_path / "state")
    daemon: Any = SimpleNamespace(
        status=SimpleNamespace(to_json=lambda: {}, observed_once=True, revision=SHA),
        artifacts=ArtifactStore(tmp_path / "state"), store=store,
        triggers=SimpleNamespace(fire=fired.append))
    return TestClient(make_api(daemon, TOKEN, None, fired.append), raise_server_exceptions=False), store, fired


def test_a_confirmation_is_stored_and_triggers_a_pass(setup: tuple[TestClient, Store, list[str]]) -> None:
    client, store, fired = setup
    response = client.post(f"/api/v1/confirm/{SHA[:12]}", headers=AUTH)
    assert response.status_code == 202, response.text
    assert response.json() == {"confirmed": SHA[:12], "queued": True, "currentRevision": SHA, "isCurrent": True}
    assert store.fact(FACT_CONFIRMED_DELETIONS) == [SHA[:12]]
    assert fired == ["confirm"]
    # Again, and another: each once, the most recent last.
    client.post(f"/api/v1/confirm/{'f' * 40}", headers=AUTH)
    client.post(f"/api/v1/confirm/{SHA[:12].upper()}", headers=AUTH)
    assert store.fact(FACT_CONFIRMED_DELETIONS) == ["f" * 40, SHA[:12]]


@pytest.mark.parametrize("sha", ["0123", "xyz0123456", "g" * 40, "0" * 41])
def test_not_a_sha_is_a_400_and_nothing_is_stored(setup: tuple[TestClient, Store, list[str]], sha: str) -> None:
    client, store, fired = setup
    response = client.post(f"/api/v1/confirm/{sha}", headers=AUTH)
    assert response.status_code == 400 and "7 to 40 hex digits" in response.json()["error"]
    assert store.fact(FACT_CONFIRMED_DELETIONS) is None and fired == []


def test_without_the_token_it_is_a_401(setup: tuple[TestClient, Store, list[str]]) -> None:
    client, store, fired = setup
    assert client.post(f"/api/v1/confirm/{SHA}").status_code == 401
    assert client.post(f"/api/v1/confirm/{SHA}", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert store.fact(FACT_CONFIRMED_DELETIONS) is None and fired == []
