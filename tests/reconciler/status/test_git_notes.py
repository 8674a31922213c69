"""GitNotesWriter against real git: a bare repository stands for the remote, clones for daemons."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from modelfleet.reconciler.status import (
    AGGREGATE_CONTEXT,
    NOTES_REF,
    CommitStatus,
    StatusError,
    deployment_context,
)
from modelfleet.reconciler.status.git_notes import GitNotesWriter, merge_documents, read_statuses

PROD_SENTIMENT = deployment_context("production", "sentiment")
DEV_SENTIMENT = deployment_context("development", "sentiment")
PROD_EMBED = deployment_context("production", "embeddings")


@pytest.fixture(autouse=True)
def hermetic_git(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No user or system git config (and so no identity): the writer must bring its own."""
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "no-global-gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for role in ("AUTHOR", "COMMITTER"):
        for key in ("NAME", "EMAIL"):
            monkeypatch.delenv(f"GIT_{role}_{key}", raising=False)


def git(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=Test", "-c", "user.email=test@example.invalid", *args],
        cwd=cwd, check=True, capture_output=True, text=True, timeout=30)
    return done.stdout.strip()


@pytest.fixture()
def origin(tmp_path: Path) -> tuple[Path, str]:
    """A bare 'remote' with one commit on main; returns (path, commit sha)."""
    remote = tmp_path / "origin.git"
    git("init", "--bare", "-q", "-b", "main", str(remote))
    empty_tree = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
    sha = git("--git-dir", str(remote), "commit-tree", empty_tree, "-m", "first")
    git("--git-dir", str(remote), "update-ref", "refs/heads/main", sha)
    return remote, sha


def clone(origin: tuple[Path, str], name: str, *, bare: bool = True) -> Path:
    path = origin[0].parent / name
    git("clone", "-q", *(["--bare"] if bare else []), str(origin[0]), str(path))
    return path


def notes_tip(repo: Path) -> str | None:
    done = subprocess.run(["git", "--git-dir" if repo.suffix == ".git" else "-C", str(repo), "rev-parse",
                           "--verify", "--quiet", NOTES_REF], capture_output=True, text=True)
    return done.stdout.strip() or None


def ticking_clock(start: datetime) -> Callable[[], datetime]:
    moments = iter(start + timedelta(seconds=i) for i in range(10_000))
    return lambda: next(moments)


@pytest.mark.parametrize("bare", [True, False], ids=["bare-clone", "work-tree-clone"])
def test_publish_merges_contexts_and_pushes(origin: tuple[Path, str], bare: bool) -> None:
    remote, sha = origin
    local = clone(origin, "daemon.git" if bare else "daemon", bare=bare)
    writer = GitNotesWriter(str(local))

    writer.publish(sha, [CommitStatus(AGGREGATE_CONTEXT, "pending", "deploying 2 models"),
                         CommitStatus(PROD_SENTIMENT, "pending", "starting on par-1")])
    writer.publish(sha, [CommitStatus(PROD_SENTIMENT, "success", "ready on par-1", "http://gw/models/sentiment"),
                         CommitStatus(DEV_SENTIMENT, "failure", "flavor gpu-a100 not allowed")])

    for repo in (local, remote):
        statuses = read_statuses(str(repo), sha)
        assert {c: s["state"] for c, s in statuses.items()} == {
            AGGREGATE_CONTEXT: "pending", PROD_SENTIMENT: "success", DEV_SENTIMENT: "failure"}
        assert statuses[PROD_SENTIMENT]["description"] == "ready on par-1"
        assert statuses[PROD_SENTIMENT]["target_url"] == "http://gw/models/sentiment"
        assert statuses[AGGREGATE_CONTEXT]["target_url"] is None
        assert statuses[PROD_SENTIMENT]["updated_at"] > statuses[AGGREGATE_CONTEXT]["updated_at"]
    assert notes_tip(local) == notes_tip(remote)


def test_note_is_a_json_document(origin: tuple[Path, str]) -> None:
    remote, sha = origin
    GitNotesWriter(str(clone(origin, "daemon.git"))).publish(
        sha, [CommitStatus(PROD_SENTIMENT, "error", "host par-1 unreachable: connection refused")])

    document = json.loads(git("--git-dir", str(remote), "notes", "--ref", NOTES_REF, "show", sha))
    assert set(document) == {"statuses", "updated_at"}
    entry = document["statuses"][PROD_SENTIMENT]
    assert set(entry) == {"state", "description", "target_url", "updated_at"}
    assert entry["state"] == "error"
    for stamp in (entry["updated_at"], document["updated_at"]):
        assert stamp.endswith("Z")
        assert datetime.fromisoformat(stamp).tzinfo is not None  # RFC 3339, UTC
    # The writer brought its own identity (this test runs without any git config).
    assert git("--git-dir", str(remote), "log", "-1", "--format=%an <%ae>", NOTES_REF) \
        == "modelfleet <modelfleet@localhost>"


def test_unchanged_statuses_do_not_grow_the_notes_history(origin: tuple[Path, str]) -> None:
    remote, sha = origin
    writer = GitNotesWriter(str(clone(origin, "daemon.git")))
    statuses = [CommitStatus(AGGREGATE_CONTEXT, "success", "2 deployments ready")]
    writer.publish(sha, statuses)
    tip, before = notes_tip(remote), read_statuses(str(remote), sha)
    writer.publish(sha, statuses)
    assert notes_tip(remote) == tip
    assert read_statuses(str(remote), sha) == before


def test_two_writers_on_one_commit_lose_nothing(origin: tuple[Path, str]) -> None:
    remote, sha = origin
    # Both clones are made before any note exists; neither fetches before publishing.
    a, b = clone(origin, "a.git"), clone(origin, "b.git")
    writer_a, writer_b = GitNotesWriter(str(a)), GitNotesWriter(str(b))

    writer_a.publish(sha, [CommitStatus(PROD_SENTIMENT, "pending", "starting")])
    writer_b.publish(sha, [CommitStatus(PROD_EMBED, "success", "ready")])
    writer_a.publish(sha, [CommitStatus(PROD_SENTIMENT, "success", "ready")])

    states = {c: s["state"] for c, s in read_statuses(str(remote), sha).items()}
    assert states == {PROD_SENTIMENT: "success", PROD_EMBED: "success"}
    assert read_statuses(str(a), sha) == read_statuses(str(remote), sha)


def test_the_newer_write_of_a_context_wins_across_writers(origin: tuple[Path, str]) -> None:
    remote, sha = origin
    a, b = clone(origin, "a.git"), clone(origin, "b.git")
    start = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    writer_a = GitNotesWriter(str(a), clock=ticking_clock(start))
    writer_b = GitNotesWriter(str(b), clock=ticking_clock(start + timedelta(minutes=1)))

    writer_a.publish(sha, [CommitStatus(PROD_SENTIMENT, "failure", "readiness probe failed")])
    writer_b.publish(sha, [CommitStatus(PROD_SENTIMENT, "success", "ready on par-2")])
    # a still holds its older 'failure' locally; merging on its next publish must not resurrect it.
    writer_a.publish(sha, [CommitStatus(AGGREGATE_CONTEXT, "success", "all ready")])

    statuses = read_statuses(str(remote), sha)
    assert statuses[PROD_SENTIMENT]["state"] == "success"
    assert statuses[PROD_SENTIMENT]["updated_at"] == "2024-05-01T12:01:00.000000Z"
    assert statuses[AGGREGATE_CONTEXT]["state"] == "success"


def test_a_push_that_loses_a_race_is_merged_and_retried(origin: tuple[Path, str]) -> None:
    remote, sha = origin
    a, b = clone(origin, "a.git"), clone(origin, "b.git")
    writer_a, writer_b = GitNotesWriter(str(a)), GitNotesWriter(str(b))
    fetch = writer_b._fetch
    fetches: list[str | None] = []

    def fetch_then_a_pushes(repo: Any, url: str) -> str | None:
        tip = fetch(repo, url)
        if not fetches:  # a pushes between b's fetch and b's push: b's first push is rejected
            writer_a.publish(sha, [CommitStatus(PROD_SENTIMENT, "success", "ready")])
        fetches.append(tip)
        return tip

    writer_b._fetch = fetch_then_a_pushes  # type: ignore[method-assign]
    writer_b.publish(sha, [CommitStatus(PROD_EMBED, "success", "ready")])

    assert len(fetches) == 2
    assert set(read_statuses(str(remote), sha)) == {PROD_SENTIMENT, PROD_EMBED}


def test_concurrent_writers_all_land(origin: tuple[Path, str]) -> None:
    remote, sha = origin
    writers = [GitNotesWriter(str(clone(origin, f"w{i}.git"))) for i in range(3)]
    barrier = threading.Barrier(len(writers))
    errors: list[BaseException] = []

    def run(index: int, writer: GitNotesWriter) -> None:
        try:
            barrier.wait()
            writer.publish(sha, [CommitStatus(deployment_context("production", f"m{index}"), "success", "ok")])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, w)) for i, w in enumerate(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert not errors
    assert set(read_statuses(str(remote), sha)) == {deployment_context("production", f"m{i}") for i in range(3)}


@pytest.fixture()
def blackhole() -> Iterator[int]:
    """A TCP port that accepts connections and never answers (a hung git server)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


def test_unreachable_remote_fails_fast_and_keeps_the_local_note(origin: tuple[Path, str], blackhole: int) -> None:
    _, sha = origin
    local = clone(origin, "daemon.git")
    git("--git-dir", str(local), "remote", "set-url", "origin",
        f"http://deploy:s3cr3t-t0ken@127.0.0.1:{blackhole}/acme/models.git")
    writer = GitNotesWriter(str(local), timeout=0.5)

    started = time.monotonic()
    with pytest.raises(StatusError) as failure:
        writer.publish(sha, [CommitStatus(PROD_SENTIMENT, "success", "ready")])
    assert time.monotonic() - started < 3
    message = str(failure.value)
    assert str(local) in message and "timed out" in message
    assert "s3cr3t-t0ken" not in message and "s3cr3t-t0ken" not in repr(writer)
    assert read_statuses(str(local), sha)[PROD_SENTIMENT]["state"] == "success"


def test_missing_remote_repository_is_a_status_error(origin: tuple[Path, str], tmp_path: Path) -> None:
    _, sha = origin
    local = clone(origin, "daemon.git")
    git("--git-dir", str(local), "remote", "set-url", "origin", str(tmp_path / "gone.git"))
    with pytest.raises(StatusError, match=r"cannot fetch refs/notes/modelfleet of repository .*daemon\.git"):
        GitNotesWriter(str(local)).publish(sha, [CommitStatus(AGGREGATE_CONTEXT, "pending", "deploying")])
    assert read_statuses(str(local), sha)[AGGREGATE_CONTEXT]["state"] == "pending"


@pytest.mark.parametrize("options", [{"push": False}, {"remote": None}, {"remote": "upstream"}],
                         ids=["push-off", "no-remote", "unknown-remote"])
def test_notes_stay_local_without_push(origin: tuple[Path, str], options: dict[str, object]) -> None:
    remote, sha = origin
    local = clone(origin, "daemon.git")
    GitNotesWriter(str(local), **options).publish(sha, [CommitStatus(AGGREGATE_CONTEXT, "success", "ok")])  # type: ignore[arg-type]
    assert set(read_statuses(str(local), sha)) == {AGGREGATE_CONTEXT}
    assert notes_tip(remote) is None


def test_reading_and_writing_errors(origin: tuple[Path, str], tmp_path: Path) -> None:
    remote, sha = origin
    assert read_statuses(str(remote), sha) == {}
    assert read_statuses(str(remote), "main") == {}
    with pytest.raises(StatusError, match="not in repository"):
        read_statuses(str(remote), "0" * 40)
    with pytest.raises(StatusError, match="not a git repository"):
        GitNotesWriter(str(tmp_path / "nowhere")).publish(sha, [])


def test_a_foreign_note_is_replaced(origin: tuple[Path, str]) -> None:
    remote, sha = origin
    local = clone(origin, "daemon.git")
    git("--git-dir", str(local), "notes", "--ref", NOTES_REF, "add", "-m", "not json", sha)
    GitNotesWriter(str(local)).publish(sha, [CommitStatus(AGGREGATE_CONTEXT, "success", "ok")])
    assert set(read_statuses(str(remote), sha)) == {AGGREGATE_CONTEXT}


def test_merge_documents_is_symmetric() -> None:
    old = {"state": "failure", "description": "x", "target_url": None, "updated_at": "2024-05-01T12:00:00Z"}
    new = {"state": "success", "description": "y", "target_url": None, "updated_at": "2024-05-01T12:00:01.5Z"}
    ours = {"statuses": {"a": old, "b": old}}
    theirs = {"statuses": {"a": new, "c": new}}
    merged = merge_documents(ours, theirs)
    assert merged == merge_documents(theirs, ours)
    assert merged["statuses"] == {"a": new, "b": old, "c": new}
    assert merged["updated_at"] == new["updated_at"]
