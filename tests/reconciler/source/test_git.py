"""GitSource against real repositories: a remote that goes away and comes back, a force-pushed or
deleted branch, a damaged local mirror (re-fetched, never trusted)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from modelfleet.reconciler.errors import GitSourceError
from modelfleet.reconciler.source.git import CORRUPT_SUFFIX, GitSource, read_ref
from modelfleet.state.loader import load_tree
from modelfleet.state.source import BRANCH_MISSING, REMOTE_UNREACHABLE
from tests.reconciler.source.helpers import MANIFESTS, Remote, damage_objects, git, make_remote


@pytest.fixture
def remote(tmp_path: Path) -> Remote:
    return make_remote(tmp_path / "remote")


def source_for(remote: Remote, tmp_path: Path, url: str | None = None, branch: str = "main") -> GitSource:
    return GitSource(url or str(remote.origin), branch, tmp_path / "state", timeout=20)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again when the socket is: connections are refused


def test_sync_fetches_the_head(remote: Remote, tmp_path: Path) -> None:
    head = git(remote.work, "rev-parse", "HEAD")
    synced = source_for(remote, tmp_path).sync()
    assert synced.revision == head and synced.failure is None


def test_unreachable_remote_keeps_the_last_fetched_commit_then_catches_up(remote: Remote, tmp_path: Path) -> None:
    source = source_for(remote, tmp_path)
    first = source.sync().revision
    aside = remote.take_away()
    synced = source.sync()
    assert synced.revision == first
    assert synced.failure is not None and synced.failure.reason == REMOTE_UNREACHABLE
    assert "does not appear to be a git repository" in synced.failure.detail
    assert synced.failure.remote == str(remote.origin) and synced.failure.branch == "main"
    remote.bring_back(aside)
    newer = remote.commit({"models/echo.yaml": None}, "remove echo")
    caught_up = source.sync()
    assert caught_up.revision == newer and caught_up.failure is None


def test_a_refused_connection_is_unreachable_with_what_git_said(remote: Remote, tmp_path: Path) -> None:
    source = source_for(remote, tmp_path)
    first = source.sync().revision
    # The same mirror, now pointed at a git:// remote nobody listens on.
    moved = GitSource(f"git://127.0.0.1:{closed_port()}/origin.git", "main", tmp_path / "state", timeout=20)
    synced = moved.sync()
    assert synced.revision == first
    assert synced.failure is not None and synced.failure.reason == REMOTE_UNREACHABLE
    assert "unable to connect" in synced.failure.detail or "refused" in synced.failure.detail.lower()


def test_nothing_ever_fetched_fails_with_a_clear_error(remote: Remote, tmp_path: Path) -> None:
    source = GitSource(str(tmp_path / "nowhere.git"), "main", tmp_path / "state", timeout=20)
    with pytest.raises(GitSourceError) as caught:
        source.sync()
    message = str(caught.value)
    assert str(tmp_path / "nowhere.git") in message and "unreachable" in message
    assert "nothing to deploy yet" in message


@pytest.mark.parametrize("rewrite", ["older", "unrelated"])
def test_force_push_is_followed_to_the_new_head(remote: Remote, tmp_path: Path, rewrite: str) -> None:
    source = source_for(remote, tmp_path)
    first = source.sync().revision
    second = remote.commit({"models/other.yaml": MANIFESTS["models/echo.yaml"]}, "two")
    assert source.sync().revision == second
    if rewrite == "older":
        target = first
    else:
        git(remote.work, "checkout", "-q", "--orphan", "rewritten")
        git(remote.work, "rm", "-rfq", ".")
        target = remote.commit({"environments.yaml": MANIFESTS["environments.yaml"]}, "unrelated", push=False)
    remote.force_push(target)
    synced = source.sync()
    assert synced.revision == target and synced.failure is None
    assert read_ref(source.path, "refs/heads/main") == target
    expected = {"environments.yaml"} if rewrite == "unrelated" else set(MANIFESTS)
    assert set(source.tree(target)) == expected


def test_deleted_branch_names_branch_and_remote_and_keeps_the_last_commit(remote: Remote, tmp_path: Path) -> None:
    source = source_for(remote, tmp_path)
    first = source.sync().revision
    git(remote.work, "push", "-q", "origin", "main:other")
    git(remote.origin, "symbolic-ref", "HEAD", "refs/heads/other")
    git(remote.origin, "update-ref", "-d", "refs/heads/main")
    synced = source.sync()
    assert synced.revision == first
    assert synced.failure is not None and synced.failure.reason == BRANCH_MISSING
    assert "refs/heads/main" in synced.failure.detail


def test_a_branch_that_never_existed_names_branch_and_remote(remote: Remote, tmp_path: Path) -> None:
    source = source_for(remote, tmp_path, branch="mian")
    with pytest.raises(GitSourceError) as caught:
        source.sync()
    message = str(caught.value)
    assert "'mian'" in message and str(remote.origin) in message and "repo.branch" in message


@pytest.mark.parametrize("damage", ["head deleted", "objects truncated", "config garbage"])
def test_a_damaged_mirror_is_found_at_start_and_fetched_afresh(remote: Remote, tmp_path: Path, damage: str) -> None:
    head = source_for(remote, tmp_path).sync().revision
    mirror = tmp_path / "state" / "repo.git"
    if damage == "head deleted":
        (mirror / "HEAD").unlink()
    elif damage == "objects truncated":
        assert damage_objects(mirror) > 0
    else:
        (mirror / "config").write_text("[[[ not a config\n")
    restarted = source_for(remote, tmp_path)  # a daemon starting on that stateDir
    synced = restarted.sync()
    assert synced.revision == head and synced.failure is None
    assert restarted.recovery is not None and "damaged" in restarted.recovery
    assert (tmp_path / "state" / f"repo.git{CORRUPT_SUFFIX}").is_dir()  # kept aside for inspection
    assert set(load_tree(restarted.tree(head)).models) == {"echo"}


def test_a_mirror_damaged_while_running_is_fetched_afresh_at_the_next_commit(remote: Remote, tmp_path: Path) -> None:
    source = source_for(remote, tmp_path)
    source.sync()
    damage_objects(source.path)
    newer = remote.commit({"models/more.yaml": [{"apiVersion": "modelfleet.dev/v1alpha1", "kind": "Model",
                                                 "metadata": {"name": "more"}, "spec": {"deployments": []}}]})
    synced = source.sync()
    assert synced.revision == newer and synced.failure is None
    assert source.recovery is not None
    assert set(load_tree(source.tree(newer)).models) == {"echo", "more"}


def test_head_deleted_while_running_never_makes_git_use_an_enclosing_repository(remote: Remote,
                                                                                 tmp_path: Path) -> None:
    # stateDir inside another repository's work tree: git must not find that one instead.
    outer = tmp_path / "outer"
    outer.mkdir()
    git(outer, "init", "-q", "-b", "main")
    git(outer, "commit", "-q", "--allow-empty", "-m", "outer")
    outer_head = git(outer, "rev-parse", "HEAD")
    source = GitSource(str(remote.origin), "main", outer / "state", timeout=20)
    source.sync()
    (source.path / "HEAD").unlink()
    newer = remote.commit({"models/echo.yaml": None}, "remove echo")
    assert source.sync().revision == newer
    assert git(outer, "rev-parse", "HEAD") == outer_head
    assert git(outer, "for-each-ref", "--format=%(refname)") == "refs/heads/main"


def test_a_damaged_mirror_is_not_trusted_while_the_remote_is_unreachable(remote: Remote, tmp_path: Path) -> None:
    source_for(remote, tmp_path).sync()
    damage_objects(tmp_path / "state" / "repo.git")
    remote.take_away()
    with pytest.raises(GitSourceError) as caught:
        source_for(remote, tmp_path).sync()
    assert "nothing to deploy yet" in str(caught.value)


def test_a_blob_that_cannot_be_read_marks_the_mirror_for_a_check(remote: Remote, tmp_path: Path) -> None:
    source = source_for(remote, tmp_path)
    head = source.sync().revision
    tree = source.tree(head)

    def broken(oid: str) -> bytes:
        raise ValueError(f"SHA {oid} could not be resolved")

    tree._read = broken
    with pytest.raises(GitSourceError, match=r"cannot read \S+\.yaml .* of commit"):
        load_tree(tree)
    damage_objects(source.path)
    synced = source.sync()  # the check finds the damage: fetched afresh although nothing changed
    assert synced.revision == head and source.recovery is not None


def test_a_remote_that_never_answers_is_unreachable_after_the_fetch_timeout(remote: Remote, tmp_path: Path) -> None:
    source = source_for(remote, tmp_path)
    first = source.sync().revision
    # A git:// remote that accepts the connection and then says nothing (a hung server, a dead link
    # behind a proxy): the fetch is killed after repo.fetchTimeout and the pass goes on.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = f"git://127.0.0.1:{silent.getsockname()[1]}/origin.git"
        hung = GitSource(url, "main", tmp_path / "state", timeout=1.0)
        started = time.monotonic()
        synced = hung.sync()
        elapsed = time.monotonic() - started
    assert synced.revision == first
    assert synced.failure is not None and synced.failure.reason == REMOTE_UNREACHABLE
    detail = synced.failure.detail
    assert "no answer within 1 s (fetch killed; the limit is repo.fetchTimeout)" in detail, detail
    assert elapsed < 15, elapsed  # bounded by the timeout, not by git's own (none for git://)
