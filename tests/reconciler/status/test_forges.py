"""Forge status writers against a stand-in forge that checks the documented request shapes."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modelfleet.reconciler.config import StatusSettings
from modelfleet.reconciler.status import AGGREGATE_CONTEXT, CommitStatus, StatusError, StatusWriter, deployment_context
from modelfleet.reconciler.status.forges import GITHUB_API_URL, GiteaWriter, GitHubWriter, GitLabWriter
from modelfleet.reconciler.status.git_notes import GitNotesWriter
from modelfleet.reconciler.status.registry import make_writer as registry_make_writer

from .forge_standin import StandInForge

SHA = "3f786850e387550fdab836ed7e6dc881de23001b"
TOKEN = "tok-9f8e7d6c5b4a"
FAST = {"attempts": 3, "backoff": 0.01, "timeout": 2.0}
PROD = deployment_context("production", "sentiment")
DEV = deployment_context("development", "sentiment")
TARGETS = {"gitea": "acme/models", "github": "acme/models", "gitlab": "platform/ml/models"}

Writer = GiteaWriter | GitHubWriter | GitLabWriter


def writer_for(forge: StandInForge, token: str = TOKEN) -> Writer:
    if forge.forge == "gitea":
        return GiteaWriter(forge.url, forge.target, token, **FAST)
    if forge.forge == "github":
        return GitHubWriter(forge.url, forge.target, token, **FAST)
    return GitLabWriter(forge.url, forge.target, token, **FAST)


@pytest.fixture(params=["gitea", "github", "gitlab"])
def forge(request: pytest.FixtureRequest) -> Iterator[StandInForge]:
    with StandInForge(request.param, TOKEN, TARGETS[request.param]) as standin:
        yield standin


def context_of(forge: StandInForge, body: dict[str, Any]) -> str:
    return str(body["name" if forge.forge == "gitlab" else "context"])


def test_statuses_have_the_forge_request_shape(forge: StandInForge) -> None:
    writer_for(forge).publish(SHA, [
        CommitStatus(AGGREGATE_CONTEXT, "pending", "deploying 2 deployments"),
        CommitStatus(PROD, "success", "ready on par-1", "https://fleet.example.com/models/sentiment"),
        CommitStatus(DEV, "failure", 'flavor "gpu-a100" is not allowed by policies of environment "development"'),
        CommitStatus(deployment_context("production", "embeddings"), "error", "host par-2 unreachable"),
    ])

    assert forge.violations == []
    assert [r.sha for r in forge.requests] == [SHA] * 4
    bodies = [r.body for r in forge.requests]
    assert [context_of(forge, b) for b in bodies] == [
        AGGREGATE_CONTEXT, PROD, DEV, deployment_context("production", "embeddings")]
    expected_states = {"gitlab": ["pending", "success", "failed", "failed"]}.get(
        forge.forge, ["pending", "success", "failure", "error"])
    assert [b["state"] for b in bodies] == expected_states
    assert bodies[1]["target_url"] == "https://fleet.example.com/models/sentiment"
    assert "target_url" not in bodies[0]
    assert bodies[2]["description"].startswith('flavor "gpu-a100" is not allowed')


def test_requests_carry_the_forge_headers(forge: StandInForge) -> None:
    writer_for(forge).publish(SHA, [CommitStatus(AGGREGATE_CONTEXT, "success", "all ready")])
    (request,) = forge.requests
    expected = {
        "gitea": {"authorization": f"token {TOKEN}"},
        "github": {"authorization": f"Bearer {TOKEN}", "accept": "application/vnd.github+json",
                   "x-github-api-version": "2022-11-28"},
        "gitlab": {"private-token": TOKEN},
    }[forge.forge]
    assert {k: request.headers.get(k) for k in expected} == expected
    assert request.headers["content-type"] == "application/json"
    assert request.method == "POST"
    if forge.forge == "gitlab":
        assert request.path == f"/api/v4/projects/platform%2Fml%2Fmodels/statuses/{SHA}"


def test_long_descriptions_are_cut_to_the_forge_limit(forge: StandInForge) -> None:
    description = "readiness probe failed: " + "x" * 400
    writer_for(forge).publish(SHA, [CommitStatus(PROD, "failure", description)])
    assert forge.violations == []
    sent = forge.requests[0].body["description"]
    limit = 140 if forge.forge == "github" else 255
    assert len(sent) == limit and sent.endswith("…") and sent.startswith("readiness probe failed: ")


def test_a_server_error_is_retried(forge: StandInForge) -> None:
    forge.script.append((502, {"message": "Bad Gateway"}))
    writer_for(forge).publish(SHA, [CommitStatus(PROD, "success", "ready")])
    assert len(forge.requests) == 2
    assert forge.requests[0].body == forge.requests[1].body
    assert forge.violations == []


def test_retries_are_bounded(forge: StandInForge) -> None:
    forge.script.extend([(503, {"message": "maintenance"})] * 5)
    started = time.monotonic()
    with pytest.raises(StatusError, match=r"HTTP 503 .*maintenance.*after 3 attempts"):
        writer_for(forge).publish(SHA, [CommitStatus(PROD, "success", "ready"), CommitStatus(DEV, "success", "ok")])
    assert len(forge.requests) == 3  # gave up on the first status; did not hammer on
    assert time.monotonic() - started < 1


def test_rate_limit_is_retried(forge: StandInForge) -> None:
    forge.script.append((429, {"message": "API rate limit exceeded"}))
    writer_for(forge).publish(SHA, [CommitStatus(PROD, "success", "ready")])
    assert len(forge.requests) == 2


def test_unauthorized_is_not_retried_and_hides_the_token(forge: StandInForge) -> None:
    wrong = "wrong-token-0123456789"
    with pytest.raises(StatusError) as failure:
        writer_for(forge, token=wrong).publish(SHA, [CommitStatus(PROD, "success", "ready")])
    message = str(failure.value)
    assert "HTTP 401" in message and forge.forge in message and forge.target in message
    assert wrong not in message and TOKEN not in message
    assert len(forge.requests) == 1


def test_a_forge_echoing_the_token_does_not_leak_it(forge: StandInForge) -> None:
    forge.script.append((403, {"message": f"token {TOKEN} lacks the repo:status scope"}))
    with pytest.raises(StatusError) as failure:
        writer_for(forge).publish(SHA, [CommitStatus(PROD, "success", "ready")])
    assert TOKEN not in str(failure.value)
    assert "lacks the repo:status scope" in str(failure.value)


def test_connection_errors_are_retried_then_reported() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    writer = GiteaWriter(f"http://127.0.0.1:{port}", "acme/models", TOKEN, **FAST)
    started = time.monotonic()
    with pytest.raises(StatusError, match=r"ConnectError.*after 3 attempts") as failure:
        writer.publish(SHA, [CommitStatus(PROD, "success", "ready")])
    assert time.monotonic() - started < 1
    assert TOKEN not in str(failure.value)


def test_gitlab_same_state_twice_is_success() -> None:
    with StandInForge("gitlab", TOKEN, "4711") as forge:
        forge.script.append((400, {"message": "Cannot transition status via :run from :running"}))
        writer_for(forge).publish(SHA, [CommitStatus(PROD, "pending", "starting")])
        assert forge.requests[0].path == f"/api/v4/projects/4711/statuses/{SHA}"
        assert len(forge.requests) == 1

        forge.script.append((400, {"message": {"state": ["is invalid"]}}))
        with pytest.raises(StatusError, match="HTTP 400"):
            writer_for(forge).publish(SHA, [CommitStatus(PROD, "pending", "starting")])
        assert forge.violations == []


def test_a_revision_that_is_not_a_full_sha_is_refused(forge: StandInForge) -> None:
    with pytest.raises(StatusError, match="not a full commit SHA"):
        writer_for(forge).publish("main", [CommitStatus(PROD, "success", "ready")])
    assert forge.requests == []


def test_github_context_over_255_bytes_is_refused_before_sending() -> None:
    with StandInForge("github", TOKEN, "acme/models") as forge:
        too_long = deployment_context("production", "é" * 130)
        with pytest.raises(StatusError, match="255"):
            writer_for(forge).publish(SHA, [CommitStatus(AGGREGATE_CONTEXT, "pending", "x"),
                                            CommitStatus(too_long, "pending", "x")])
        assert forge.requests == []


def test_reprs_hide_the_token() -> None:
    writers: list[object] = [GiteaWriter("https://git.example.com", "acme/models", TOKEN),
                             GitHubWriter(None, "acme/models", TOKEN),
                             GitLabWriter("https://gitlab.example.com", "platform/ml/models", TOKEN)]
    for writer in writers:
        assert TOKEN not in repr(writer) and TOKEN not in str(writer)
        assert TOKEN not in repr(vars(writer))
        assert "token=***" in repr(writer)
    assert repr(writers[1]) == "GitHubWriter(base_url='https://api.github.com', owner_repo='acme/models', token=***)"


def test_bad_writer_settings_are_value_errors() -> None:
    with pytest.raises(ValueError, match="owner/name"):
        GiteaWriter("https://git.example.com", "acme", TOKEN)
    with pytest.raises(ValueError, match="http"):
        GitHubWriter("api.github.com", "acme/models", TOKEN)
    with pytest.raises(ValueError, match="empty"):
        GitLabWriter("https://gitlab.example.com", "g/p", "  \n")


# -- the providers' factories, through the registry ----------------------------------------------------


def make_writer(provider: str, *, repo_path: str, repo_url: str | None = None, base_url: str | None = None,
                token_file: str | None = None, push: bool = True) -> StatusWriter | None:
    settings = StatusSettings(provider=provider, url=base_url, token_file=token_file, push=push)
    return registry_make_writer(settings, repo_path=repo_path, repo_url=repo_url)


@pytest.fixture()
def token_file(tmp_path: Path) -> str:
    path = tmp_path / "status-token"
    path.write_text(f"  {TOKEN}\n\n")
    return str(path)


@pytest.mark.parametrize(("provider", "repo_url", "base_url", "kind", "api", "target"), [
    ("gitea", "https://git.example.com/acme/models.git", None, GiteaWriter, "https://git.example.com",
     "acme/models"),
    ("gitea", "ssh://git@git.example.com:2222/acme/models.git", None, GiteaWriter, "https://git.example.com",
     "acme/models"),
    ("gitea", "https://example.com/forge/acme/models", "https://example.com/forge/", GiteaWriter,
     "https://example.com/forge", "acme/models"),
    ("gitea", "http://127.0.0.1:3000/acme/models.git", None, GiteaWriter, "http://127.0.0.1:3000", "acme/models"),
    ("github", "git@github.com:acme/models.git", None, GitHubWriter, GITHUB_API_URL, "acme/models"),
    ("github", "https://x-access-token:secret@github.com/acme/models", None, GitHubWriter, GITHUB_API_URL,
     "acme/models"),
    ("github", "git@ghe.example.com:acme/models.git", None, GitHubWriter, "https://ghe.example.com/api/v3",
     "acme/models"),
    ("gitlab", "https://gitlab.example.com/platform/ml/models.git", None, GitLabWriter,
     "https://gitlab.example.com", "platform/ml/models"),
    ("gitlab", "git@gitlab.com:platform/models.git", "https://gitlab.com", GitLabWriter, "https://gitlab.com",
     "platform/models"),
])
def test_make_writer_derives_the_forge_repository(
        token_file: str, provider: str, repo_url: str, base_url: str | None, kind: type, api: str,
        target: str) -> None:
    writer = make_writer(provider, repo_path="/var/lib/modelfleet/repo.git", repo_url=repo_url,
                         base_url=base_url, token_file=token_file)
    assert isinstance(writer, kind) and isinstance(writer, GiteaWriter | GitHubWriter | GitLabWriter)
    assert writer.base_url == api
    assert writer.target == target
    assert "secret" not in repr(writer) and TOKEN not in repr(writer)


def test_make_writer_reads_and_strips_the_token(token_file: str) -> None:
    with StandInForge("gitea", TOKEN, "acme/models") as forge:
        writer = make_writer("gitea", repo_path="/unused", repo_url=f"{forge.url}/acme/models.git",
                             base_url=None, token_file=token_file)
        assert writer is not None
        writer.publish(SHA, [CommitStatus(AGGREGATE_CONTEXT, "success", "ok")])
        assert forge.violations == []
        assert forge.requests[0].headers["authorization"] == f"token {TOKEN}"


def test_make_writer_embedded_providers(tmp_path: Path) -> None:
    notes = make_writer("git-notes", repo_path=str(tmp_path), repo_url=None, base_url=None, token_file=None,
                        push=False)
    assert isinstance(notes, GitNotesWriter) and notes.push is False and notes.remote == "origin"
    assert make_writer("none", repo_path=str(tmp_path)) is None


@pytest.mark.parametrize(("provider", "repo_url", "token", "message"), [
    ("gitea", "https://git.example.com/acme/models.git", "missing", r"token file .*missing-token does not exist"),
    ("github", "https://github.com/acme/models.git", None, r"needs a token file \(status.tokenFile\)"),
    ("gitlab", "https://gitlab.com/g/p.git", "empty", "is empty"),
    ("gitea", ".", "ok", "cannot tell"),
    ("gitea", "https://git.example.com/models.git", "ok", "owner/name"),
])
def test_make_writer_bad_settings(tmp_path: Path, provider: str, repo_url: str, token: str | None,
                                  message: str) -> None:
    (tmp_path / "empty-token").write_text("\n")
    (tmp_path / "ok-token").write_text(TOKEN)
    token_file = None if token is None else str(tmp_path / f"{token}-token")
    with pytest.raises(ValueError, match=message) as failure:
        make_writer(provider, repo_path="/unused", repo_url=repo_url, base_url=None, token_file=token_file)
    assert TOKEN not in str(failure.value)
