"""``POST /api/v1/releases``: a release on a fresh clone of repo.url, pushed as a release branch."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.testclient import TestClient

from modelfleet.reconciler.api.app import make_api
from modelfleet.reconciler.artifacts.store import ArtifactStore
from tests.reconciler.cli.test_release import CLASSIFIER, ENVIRONMENTS, git

TOKEN = "api-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def setup(tmp_path: Path) -> tuple[TestClient, Path]:
    origin, work = tmp_path / "origin.git", tmp_path / "work"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(origin))
    git(tmp_path, "clone", "-q", str(origin), str(work))
    (work / "models").mkdir()
    (work / "environments.yaml").write_text(ENVIRONMENTS)
    (work / "models" / "tiny-classifier.yaml").write_text(CLASSIFIER)
    (work / "models" / "tiny-classifier.mar").write_bytes(b"archive")
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", "initial")
    git(work, "push", "-q", "origin", "main")
    daemon: Any = SimpleNamespace(
        status=SimpleNamespace(to_json=lambda: {}, observed_once=True, deployments={}),
        artifacts=ArtifactStore(tmp_path / "state"),
        config=SimpleNamespace(state_dir=str(tmp_path / "state"), repo=SimpleNamespace(url=str(origin), branch="main")))
    return TestClient(make_api(daemon, TOKEN, None, lambda reason: None), raise_server_exceptions=False), origin


def test_a_release_is_pushed_as_a_branch_and_main_is_untouched(setup: tuple[TestClient, Path]) -> None:
    client, origin = setup
    main_before = git(origin, "rev-parse", "main")
    response = client.post("/api/v1/releases", headers=AUTH,
                           json={"model": "tiny-classifier", "from": "development", "to": "production"})
    assert response.status_code == 201, response.text
    data = response.json()
    assert data["branch"].startswith("release/tiny-classifier-production-")
    assert data["message"].startswith("release tiny-classifier: development -> production (origin sha256:")
    assert git(origin, "rev-parse", data["branch"]) == data["commit"]
    assert git(origin, "log", "-1", "--format=%an", data["commit"]) == "modelfleet"
    assert git(origin, "rev-parse", "main") == main_before
    assert "sha256:" in git(origin, "show", f"{data['commit']}:models/tiny-classifier.yaml")


@pytest.mark.parametrize(("body", "code", "error"), [
    ({"model": "tiny-classifier", "from": "development", "to": "staging"}, 422, "no deployment in environment"),
    ({"model": "Bad Name", "from": "development", "to": "production"}, 400, "model"),
    ({"model": "tiny-classifier", "from": "development", "to": "production", "branch": "../x"}, 400, "branch"),
])
def test_bad_releases_are_clear_errors(setup: tuple[TestClient, Path], body: dict[str, str], code: int,
                                       error: str) -> None:
    client, origin = setup
    response = client.post("/api/v1/releases", headers=AUTH, json=body)
    assert response.status_code == code and error in response.json()["error"]
    assert git(origin, "for-each-ref", "--format=%(refname)", "refs/heads/") == "refs/heads/main"


def test_without_the_token_it_is_a_401(setup: tuple[TestClient, Path]) -> None:
    client, _ = setup
    assert client.post("/api/v1/releases", json={}).status_code == 401




def test_with_a_forge_the_release_opens_its_pull_request(tmp_path: Path) -> None:
    from modelfleet.reconciler.status.pulls import GitHubPulls
    from tests.reconciler.status.forge_standin import StandInForge

    origin, work = tmp_path / "origin.git", tmp_path / "work"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(origin))
    git(tmp_path, "clone", "-q", str(origin), str(work))
    (work / "models").mkdir()
    (work / "environments.yaml").write_text(ENVIRONMENTS)
    (work / "models" / "tiny-classifier.yaml").write_text(CLASSIFIER)
    (work / "models" / "tiny-classifier.mar").write_bytes(b"archive")
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", "initial")
    git(work, "push", "-q", "origin", "main")
    with StandInForge("github", "forge-tok-1", "acme/models") as forge:
        daemon: Any = SimpleNamespace(
            status=SimpleNamespace(to_json=lambda: {}, observed_once=True, deployments={}),
            artifacts=ArtifactStore(tmp_path / "state"),
            reviews=SimpleNamespace(pulls=GitHubPulls(forge.url, "acme/models", "forge-tok-1", timeout=2)),
            config=SimpleNamespace(state_dir=str(tmp_path / "state"),
                                   repo=SimpleNamespace(url=str(origin), branch="main")))
        client = TestClient(make_api(daemon, TOKEN, None, lambda reason: None), raise_server_exceptions=False)
        body = {"model": "tiny-classifier", "from": "development", "to": "production", "branch": "release/one"}
        first = client.post("/api/v1/releases", headers=AUTH, json=body)
        assert first.status_code == 201, first.text
        assert first.json()["pullRequest"] == {"number": 1, "url": f"{forge.url}/acme/models/pull/1",
                                               "created": True}
        assert (forge.pulls[1]["head"], forge.pulls[1]["base"]) == ("release/one", "main")
        assert forge.violations == []
