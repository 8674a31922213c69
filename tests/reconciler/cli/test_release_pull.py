"""`modelfleet release --push --config CFG` with a forge status.provider: the pushed release branch
gets a pull request (GitLab: merge request) on the stand-in forge, or the one open already is reused."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from modelfleet.reconciler.cli.main import main
from tests.reconciler.status.forge_standin import StandInForge

from .test_release import DIGEST, GIT_ENV, clone, git  # noqa: F401 (clone is a fixture)

TOKEN = "tok-release-pr-0c0ffee"
BRANCH = f"release/tiny-classifier-production-{DIGEST[:8]}"
TARGETS = {"github": "acme/models", "gitea": "acme/models", "gitlab": "platform/models"}


@pytest.fixture(autouse=True)
def git_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in GIT_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(params=["github", "gitea", "gitlab"])
def forge(request: pytest.FixtureRequest) -> Iterator[StandInForge]:
    with StandInForge(request.param, TOKEN, TARGETS[request.param]) as standin:
        yield standin


def idle_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def config_for(tmp_path: Path, forge: StandInForge, token: str = TOKEN) -> Path:
    token_file = tmp_path / "forge-token"
    token_file.write_text(token + "\n")
    config = {"repo": {"url": f"https://forge.example.com/{forge.target}.git", "branch": "main"},
              "stateDir": str(tmp_path / "state"), "api": {"listen": f"127.0.0.1:{idle_port()}"},
              "status": {"provider": forge.forge, "url": forge.url, "tokenFile": str(token_file)}}
    path = tmp_path / "modelfleet.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def release_args(repo: Path, config: Path) -> list[str]:
    return ["release", "tiny-classifier", "--from", "development", "--to", "production", "--repo", str(repo),
            "--push", "--config", str(config)]


def test_release_push_opens_a_pull_request(clone: Path, tmp_path: Path, forge: StandInForge,  # noqa: F811
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(release_args(clone, config_for(tmp_path, forge))) == 0
    out = capsys.readouterr().out
    (pull,) = forge.pulls.values()
    assert (pull["head"], pull["base"]) == (BRANCH, "main")
    assert pull["title"].startswith("release tiny-classifier: development -> production")
    noun = "merge request" if forge.forge == "gitlab" else "pull request"
    path = f"/-/merge_requests/{pull['number']}" if forge.forge == "gitlab" else f"/pull/{pull['number']}"
    assert f"opened {noun} #{pull['number']}: {forge.url}/{forge.target}{path}" in out
    assert git(clone, "ls-remote", "origin", f"refs/heads/{BRANCH}")  # pushed first
    assert forge.violations == []
    assert [r.method for r in forge.requests] == ["GET", "POST"]  # looked for an open one, then opened it


def test_a_pull_request_open_for_the_branch_is_reused(clone: Path, tmp_path: Path, forge: StandInForge,  # noqa: F811
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    forge.add_pull(7, BRANCH, "0" * 40, title="an earlier release")
    assert main(release_args(clone, config_for(tmp_path, forge))) == 0
    out = capsys.readouterr().out
    assert f"is open for {BRANCH} already: #7: " in out and "(reused)" in out
    assert list(forge.pulls) == [7]
    assert "POST" not in [r.method for r in forge.requests]
    assert forge.violations == []


def test_a_forge_refusing_says_the_branch_is_pushed(clone: Path, tmp_path: Path, forge: StandInForge,  # noqa: F811
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(release_args(clone, config_for(tmp_path, forge, token="wrong-token-abc"))) == 3
    err = capsys.readouterr().err
    assert f"the branch {BRANCH} is pushed, but opening its pull request failed" in err and "401" in err
    assert "wrong-token-abc" not in err
    assert git(clone, "ls-remote", "origin", f"refs/heads/{BRANCH}")


def test_without_a_forge_no_pull_request(clone: Path, tmp_path: Path,  # noqa: F811
                                         capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "modelfleet.yaml"
    config.write_text(yaml.safe_dump({"repo": {"url": "/srv/models.git"}, "stateDir": str(tmp_path / "s"),
                                      "api": {"listen": f"127.0.0.1:{idle_port()}"}}))
    assert main(release_args(clone, config)) == 0
    assert "pull request" not in capsys.readouterr().out
