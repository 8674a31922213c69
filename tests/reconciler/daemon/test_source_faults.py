"""Step 1 of a pass when the Git source fails (in-process, empty pool, real repositories): the pass
goes on with the commit fetched last, the status and the commit say why, the since-time survives
a restart, and it all clears when the remote is back."""

from __future__ import annotations

from pathlib import Path

import yaml

from modelfleet.reconciler.config import parse_config
from modelfleet.reconciler.daemon.reconcile import Daemon
from modelfleet.reconciler.daemon.store import FACT_SOURCE_UNREACHABLE_SINCE
from modelfleet.reconciler.status import CommitStatus
from modelfleet.state.source import NOTHING_FETCHED, REMOTE_UNREACHABLE, SOURCE_CONTEXT, SYNCED, iso
from tests.reconciler.source.helpers import Remote, make_remote

NOW = 1_700_000_000.0


class Recorder:
    def __init__(self) -> None:
        self.published: list[tuple[str, CommitStatus]] = []

    def publish(self, revision: str, statuses: list[CommitStatus]) -> None:
        self.published += [(revision, s) for s in statuses]

    def of(self, context: str) -> list[tuple[str, str, str]]:
        return [(rev, s.state, s.description) for rev, s in self.published if s.context == context]


def make_daemon(tmp_path: Path, url: str, clock: list[float]) -> tuple[Daemon, Recorder]:
    config = parse_config(yaml.safe_dump({"repo": {"url": url}, "stateDir": str(tmp_path / "state"),
                                          "status": {"provider": "none"}}))
    recorder = Recorder()
    return Daemon(config, status_writer=recorder, clock=lambda: clock[0]), recorder


def test_an_unreachable_remote_does_not_stop_passes_and_clears_when_it_is_back(tmp_path: Path) -> None:
    remote: Remote = make_remote(tmp_path / "remote")
    clock = [NOW]
    daemon, recorder = make_daemon(tmp_path, str(remote.origin), clock)
    try:
        head = daemon.reconcile("test").revision
        assert head is not None and daemon.status.source_error is None
        aside = remote.take_away()
        clock[0] = NOW + 30
        status = daemon.reconcile("poll")
        # The pass went on (observe, plan, statuses) with the commit fetched last.
        assert status.last_pass["result"] != "failed" and status.last_pass["revision"] == head
        assert status.revision == head and status.observed_once
        error = status.source_error
        assert error is not None and error.startswith(f"git remote unreachable since {iso(NOW + 30)}: ")
        assert "does not appear to be a git repository" in error
        body = status.to_json()
        assert body["sourceError"] == error
        [condition] = body["conditions"]
        assert (condition["type"], condition["status"], condition["reason"]) == ("SourceSynced", "False",
                                                                                 REMOTE_UNREACHABLE)
        assert recorder.of(SOURCE_CONTEXT) == [(head, "error", error)]
        assert daemon.store.fact(FACT_SOURCE_UNREACHABLE_SINCE)["since"] == NOW + 30
    finally:
        daemon.close()
    # A restart during the outage: the since-time is the store's, not the restart's.
    clock[0] = NOW + 90
    daemon, recorder = make_daemon(tmp_path, str(remote.origin), clock)
    try:
        status = daemon.reconcile("start")
        assert status.revision == head and status.source_error is not None
        assert f"since {iso(NOW + 30)}" in status.source_error
        remote.bring_back(aside)
        newer = remote.commit({"models/echo.yaml": None}, "remove echo")
        clock[0] = NOW + 120
        status = daemon.reconcile("poll")
        assert status.revision == newer and status.source_error is None
        assert daemon.store.fact(FACT_SOURCE_UNREACHABLE_SINCE) is None
        assert status.to_json()["conditions"][0]["reason"] == SYNCED
        # The commit that was told "unreachable" is told it is over.
        assert [(rev, state) for rev, state, _ in recorder.of(SOURCE_CONTEXT)] == [(head, "error"),
                                                                                    (head, "success")]
    finally:
        daemon.close()


def test_with_no_commit_ever_fetched_the_pass_fails_with_a_clear_error(tmp_path: Path) -> None:
    daemon, recorder = make_daemon(tmp_path, str(tmp_path / "nowhere.git"), [NOW])
    try:
        status = daemon.reconcile("start")
    finally:
        daemon.close()
    assert status.last_pass["result"] == "failed"
    assert status.source_error is not None and "nothing to deploy yet" in status.source_error
    assert status.to_json()["conditions"][0]["reason"] == NOTHING_FETCHED
    assert recorder.published == []  # no commit known: nothing to annotate


def test_a_damaged_mirror_is_reported_after_it_was_fetched_afresh(tmp_path: Path) -> None:
    remote = make_remote(tmp_path / "remote")
    daemon, _ = make_daemon(tmp_path, str(remote.origin), [NOW])
    try:
        head = daemon.reconcile("test").revision
    finally:
        daemon.close()
    (tmp_path / "state" / "repo.git" / "HEAD").unlink()
    daemon, _ = make_daemon(tmp_path, str(remote.origin), [NOW])
    try:
        status = daemon.reconcile("start")
    finally:
        daemon.close()
    assert status.revision == head and status.source_error is None
    recovery = status.to_json()["sourceRecovery"]
    assert recovery is not None and "HEAD is missing" in recovery and "afresh" in recovery


def test_a_manifest_over_the_size_limit_is_a_file_error_not_a_crash(tmp_path: Path) -> None:
    remote = make_remote(tmp_path / "remote")
    remote.commit({"data/huge.yaml": "# x\n" * 2**20}, "4 MiB of YAML")
    daemon, _ = make_daemon(tmp_path, str(remote.origin), [NOW])
    try:
        status = daemon.reconcile("test")
    finally:
        daemon.close()
    assert status.last_pass["result"] != "failed"
    assert any(e.startswith("data/huge.yaml: file is 4 MiB, over the 1 MiB limit") for e in status.errors)
