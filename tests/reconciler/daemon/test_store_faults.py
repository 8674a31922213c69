"""Faults of the daemon's own store: a full disk, a corrupt or deleted modelfleet.db.

The full disk is SQLite's own SQLITE_FULL (``PRAGMA max_page_count`` caps the file where it is, so
a write that needs a new page fails exactly as on a full filesystem, SQLite rolling the transaction
back by itself), or, where a test needs every write to fail, a connection whose COMMIT fails the way
SQLite's does on a full disk. The whole daemon on a really full tmpfs is
tests/integration/test_faults_state.py.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelfleet.reconciler.config import parse_config
from modelfleet.reconciler.daemon import store as store_module
from modelfleet.reconciler.daemon.store import DB_FILE, Store
from modelfleet.reconciler.statedir import SQLITE_BUSY, SQLITE_FULL, SQLITE_IOERR, StoreError
from modelfleet.state.actual import ObservedReplica
from modelfleet.state.inventory import InventoryChanges

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@localhost", "GIT_CONFIG_NOSYSTEM": "1"}
BIG = "x" * 20000  # a value that needs new pages (overflow pages) in any table


def _cap_at_current_size(store: Store) -> None:
    """From now on, a write that needs one more page fails with SQLITE_FULL."""
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count={pages}")


def _uncap(store: Store) -> None:
    store._db.execute("PRAGMA max_page_count=1073741823")


def _sqlite_error(message: str, code: int) -> sqlite3.OperationalError:
    error = sqlite3.OperationalError(message)
    error.sqlite_errorcode = code
    error.sqlite_errorname = "SQLITE_" + message
    return error


class FailingCommits:
    """A connection whose COMMITs fail. ``auto_rollback``: as SQLite does on SQLITE_FULL and I/O
    errors (the transaction is gone when the error arrives); otherwise it stays open (SQLITE_BUSY)."""

    def __init__(self, db: sqlite3.Connection, error: sqlite3.OperationalError, auto_rollback: bool = True) -> None:
        self._real = db
        self.error = error
        self.auto_rollback = auto_rollback
        self.failing = True
        self.rollbacks = 0

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT" and self.failing:
            if self.auto_rollback:
                self._real.execute("ROLLBACK")
            raise self.error
        if sql == "ROLLBACK":
            self.rollbacks += 1
        return self._real.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _passes(state_dir: Path) -> int:
    db = sqlite3.connect(state_dir / DB_FILE)
    try:
        return int(db.execute("SELECT count(*) FROM passes").fetchone()[0])
    finally:
        db.close()


def _integrity(state_dir: Path) -> list[str]:
    db = sqlite3.connect(state_dir / DB_FILE)
    try:
        return [row[0] for row in db.execute("PRAGMA integrity_check").fetchall()]
    finally:
        db.close()


def _replica(name: str, index: int) -> ObservedReplica:
    return ObservedReplica("h1", f"id-{name}", name, "echo", "production", index, "hash", "rev", True)


# --- disk full --------------------------------------------------------------------------------


def test_a_write_on_a_full_disk_is_a_clear_store_error_and_the_next_write_after_space_returns_works(
        tmp_path: Path) -> None:
    store = Store(tmp_path)
    first = store.begin_pass("startup")
    _cap_at_current_size(store)
    with pytest.raises(StoreError) as caught:
        store.begin_pass(BIG)
    error = caught.value
    assert error.disk_full
    assert str(tmp_path / DB_FILE) in error.message and "disk full" in error.message
    assert "bytes free" in error.message and "free space under stateDir" in error.message
    assert not store._db.in_transaction  # rolled back, not left open for the next write to trip on
    assert store.health() == {"path": str(tmp_path / DB_FILE), "ok": False, "error": error.message,
                              "recovered": None}
    _uncap(store)
    second = store.begin_pass("retry")
    assert second > first and store.health()["ok"] and store.health()["error"] is None
    assert [p["trigger"] for p in store.recent_passes()] == ["retry", "startup"]
    store.close()
    assert _integrity(tmp_path) == ["ok"]


def test_a_failed_write_leaves_all_or_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.record_intent("h1", "keep", "echo", "production", 0, "hash", "rev")
    before = store.inventory()
    _cap_at_current_size(store)
    many = tuple(_replica(f"mf-{i}-{BIG[:200]}", i) for i in range(200))
    with pytest.raises(StoreError, match="disk full"):
        store.write_changes(InventoryChanges(forget=(("h1", "keep"),), adopt=many))
    assert store.inventory() == before  # neither the forget nor any adoption happened
    _uncap(store)
    store.close()
    assert [r.name for r in Store(tmp_path).inventory()] == ["keep"]


def test_a_fact_that_could_not_be_written_is_not_remembered(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.set_fact("last_attempted_revision", "a" * 40)
    _cap_at_current_size(store)
    with pytest.raises(StoreError):
        store.set_fact("last_attempted_revision", BIG)
    assert store.fact("last_attempted_revision") == "a" * 40
    _uncap(store)
    store.set_fact("last_attempted_revision", BIG)  # not skipped as "unchanged"
    store.close()
    assert Store(tmp_path).fact("last_attempted_revision") == BIG


@pytest.mark.parametrize(("error", "auto_rollback", "words"), [
    (_sqlite_error("database or disk is full", SQLITE_FULL), True, "disk full"),
    (_sqlite_error("disk I/O error", SQLITE_IOERR), True, "disk I/O error"),
    (_sqlite_error("database is locked", SQLITE_BUSY), False, "locked by another process"),
])
def test_a_failed_commit_is_rolled_back_exactly_once_whoever_undoes_it(
        tmp_path: Path, error: sqlite3.OperationalError, auto_rollback: bool, words: str) -> None:
    store = Store(tmp_path)
    store.record_intent("h1", "keep", "echo", "production", 0, "hash", "rev")
    failing = FailingCommits(store._db, error, auto_rollback)
    store._db = failing  # type: ignore[assignment]
    with pytest.raises(StoreError, match=words):
        store.forget("h1", "keep")
    assert not failing.in_transaction
    assert failing.rollbacks == (0 if auto_rollback else 1)  # never "cannot rollback - no transaction"
    failing.failing = False
    assert [r.name for r in store.inventory()] == ["keep"]
    store.forget("h1", "keep")
    assert store.inventory() == []


def test_an_error_that_is_not_the_disks_keeps_its_type_and_rolls_back(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(ZeroDivisionError), store._tx() as db:
        db.execute("INSERT INTO facts (key, value) VALUES ('k', '1')")
        raise ZeroDivisionError
    assert not store._db.in_transaction
    with pytest.raises(sqlite3.IntegrityError), store._tx() as db:  # a bug is not "the disk is full"
        db.execute("INSERT INTO facts (key, value) VALUES ('k', NULL)")
    assert store._db.execute("SELECT count(*) FROM facts").fetchone()[0] == 0


# --- the daemon on a full store ---------------------------------------------------------------


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **GIT_ENV}, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def daemon(tmp_path: Path) -> Any:
    work = tmp_path / "work"
    work.mkdir()
    _git(work, "init", "-q", "-b", "main")
    (work / "environments.yaml").write_text(yaml.safe_dump(
        {"apiVersion": "modelfleet.dev/v1alpha1", "kind": "Environment", "metadata": {"name": "production"}}))
    _git(work, "add", "-A")
    _git(work, "commit", "-qm", "init")
    config = parse_config(yaml.safe_dump({"repo": {"url": str(work)}, "stateDir": str(tmp_path / "state"),
                                          "status": {"provider": "none"}}))
    from modelfleet.reconciler.daemon.reconcile import Daemon  # the store tests above need none of it

    daemon = Daemon(config)
    yield daemon
    daemon.close()


def test_a_pass_on_a_full_store_fails_cleanly_and_the_next_one_after_space_returns_succeeds(daemon: Any) -> None:
    assert daemon.reconcile("startup").last_pass["result"] == "ok"
    recorded = _passes(daemon.state_dir)
    failing = FailingCommits(daemon.store._db, _sqlite_error("database or disk is full", SQLITE_FULL))
    daemon.store._db = failing
    status = daemon.reconcile("poll")  # begin_pass fails: no exception out of reconcile
    last = status.last_pass
    assert last["result"] == "failed" and last["id"] == 0
    assert "disk full" in last["error"] and "free space under stateDir" in last["error"]
    assert last["store"]["ok"] is False and "disk full" in last["store"]["error"]
    assert status.to_json()["lastPass"]["store"]["ok"] is False
    assert "disk full" in (status.source_error or "")
    failing.failing = False  # space is freed
    status = daemon.reconcile("retry")
    assert status.last_pass["result"] == "ok" and status.last_pass["store"] == {
        "path": str(daemon.store.path), "ok": True, "error": None, "recovered": None}
    assert _passes(daemon.state_dir) == recorded + 1 and _integrity(daemon.state_dir) == ["ok"]


def test_a_store_that_fills_up_during_the_pass_does_not_end_the_loop(daemon: Any) -> None:
    inner = daemon._reconcile_inner
    failing = FailingCommits(daemon.store._db, _sqlite_error("database or disk is full", SQLITE_FULL))
    failing.failing = False

    def fill_up(*args: Any) -> Any:
        summary = inner(*args)
        failing.failing = True  # finish_pass, in the outer finally, hits the full disk
        return summary

    daemon._reconcile_inner = fill_up
    daemon.store._db = failing
    status = daemon.reconcile("poll")
    assert status.last_pass["result"] == "failed" and "disk full" in status.last_pass["error"]
    failing.failing = False
    daemon._reconcile_inner = inner
    assert daemon.reconcile("retry").last_pass["result"] == "ok"


def test_the_daemon_refuses_to_start_on_a_store_it_cannot_open_with_a_clear_message(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    config = parse_config(yaml.safe_dump({"repo": {"url": str(tmp_path / "nowhere")},
                                          "stateDir": str(tmp_path / "state"), "status": {"provider": "none"}}))

    def full(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        raise _sqlite_error("database or disk is full", SQLITE_FULL)

    from modelfleet.reconciler.daemon import service

    monkeypatch.setattr(store_module.sqlite3, "connect", full)
    assert service.run_daemon(config, str(tmp_path / "modelfleet.yaml")) == 3
    assert "cannot start" in caplog.text and "disk full" in caplog.text


# --- corrupt, deleted, replaced ---------------------------------------------------------------


def _seeded(state_dir: Path) -> None:
    store = Store(state_dir)
    store.begin_pass("startup")
    store.record_intent("h1", "mf-production-echo-0-aaaaaaaa", "echo", "production", 0, "hash", "rev")
    store.close()


def _corrupt_files(state_dir: Path) -> list[str]:
    return sorted(p.name for p in state_dir.iterdir() if ".corrupt-" in p.name)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "bad-pages"])
def test_a_corrupt_store_is_moved_aside_and_recreated(tmp_path: Path, damage: str) -> None:
    _seeded(tmp_path)
    path = tmp_path / DB_FILE
    sound = path.read_bytes()
    damaged = {"garbage": os.urandom(len(sound)), "truncated": sound[: len(sound) // 2],
               "bad-pages": sound[:100] + os.urandom(len(sound) - 100)}[damage]
    path.write_bytes(damaged)
    (tmp_path / f"{DB_FILE}-wal").write_bytes(os.urandom(5000))  # a WAL must never be replayed onto the new file
    store = Store(tmp_path)
    assert store.inventory() == [] and store.recovery is not None
    assert "corrupt" in store.recovery and "never removed" in store.recovery
    moved = _corrupt_files(tmp_path)
    assert moved[0].startswith(f"{DB_FILE}.corrupt-") and f"{moved[0]}-wal" in moved
    assert (tmp_path / moved[0]).read_bytes() == damaged  # kept for a post-mortem, byte for byte
    assert store.health()["recovered"] == store.recovery
    store.begin_pass("after")
    store.close()
    assert _integrity(tmp_path) == ["ok"]
    again = Store(tmp_path)  # a sound store is not moved aside again
    assert again.recovery is None and _corrupt_files(tmp_path) == moved


def test_a_store_that_cannot_be_opened_for_a_full_disk_is_not_thrown_away(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _seeded(tmp_path)

    def full(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        raise _sqlite_error("database or disk is full", SQLITE_FULL)

    monkeypatch.setattr(store_module.sqlite3, "connect", full)
    with pytest.raises(StoreError, match="disk full"):
        Store(tmp_path)
    monkeypatch.undo()
    assert _corrupt_files(tmp_path) == []
    assert [r.name for r in Store(tmp_path).inventory()] == ["mf-production-echo-0-aaaaaaaa"]


def test_a_missing_store_next_to_earlier_daemon_state_is_reported(tmp_path: Path) -> None:
    assert Store(tmp_path / "fresh").recovery is None  # a first start says nothing
    state = tmp_path / "lost"
    (state / "repo.git").mkdir(parents=True)
    (state / "repo.git" / "HEAD").write_text("ref: refs/heads/main\n")
    store = Store(state)
    assert store.recovery is not None and "missing" in store.recovery and "never removed" in store.recovery


def test_a_store_deleted_while_the_daemon_runs_is_written_back_without_loss(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.begin_pass("startup")
    store.record_intent("h1", "mf-production-echo-0-aaaaaaaa", "echo", "production", 0, "hash", "rev")
    store.set_fact("last_applied_revision", "b" * 40)
    for leftover in tmp_path.glob(f"{DB_FILE}*"):
        leftover.unlink()
    store.begin_pass("next")  # notices, writes the open database back, then records the pass
    assert store.recovery is not None and "deleted" in store.recovery and "nothing lost" in store.recovery
    store.close()
    reopened = Store(tmp_path)
    assert [r.name for r in reopened.inventory()] == ["mf-production-echo-0-aaaaaaaa"]
    assert reopened.fact("last_applied_revision") == "b" * 40
    assert [p["trigger"] for p in reopened.recent_passes()] == ["next", "startup"]
    assert _integrity(tmp_path) == ["ok"]


def test_only_the_main_file_deleted_leaves_no_foreign_wal_behind(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.record_intent("h1", "a", "echo", "production", 0, "hash", "rev")
    (tmp_path / DB_FILE).unlink()  # the WAL of the open database stays
    store.begin_pass("next")
    store.record_intent("h1", "b", "echo", "production", 1, "hash", "rev")
    store.close()
    assert [r.name for r in Store(tmp_path).inventory()] == ["a", "b"]
    assert _integrity(tmp_path) == ["ok"]


def test_a_file_put_in_place_of_the_store_while_running_is_moved_aside_and_ours_restored(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.record_intent("h1", "a", "echo", "production", 0, "hash", "rev")
    (tmp_path / "other.db").write_bytes(os.urandom(8192))
    os.replace(tmp_path / "other.db", tmp_path / DB_FILE)
    store.begin_pass("next")
    replaced = [p.name for p in tmp_path.iterdir() if ".replaced-" in p.name]
    assert len(replaced) == 1 and (tmp_path / replaced[0]).stat().st_size == 8192
    assert [r.name for r in store.inventory()] == ["a"]
    store.close()
    assert [r.name for r in Store(tmp_path).inventory()] == ["a"]
    assert _integrity(tmp_path) == ["ok"]


def test_reading_a_corrupt_store_read_only_gives_none(tmp_path: Path) -> None:
    (tmp_path / DB_FILE).write_bytes(os.urandom(8192))
    assert Store.open_read_only(tmp_path) is None
    assert _corrupt_files(tmp_path) == []  # `modelfleet plan` never moves the daemon's files
