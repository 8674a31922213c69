"""The daemon's durable memory (SQLite in WAL mode under stateDir).

* inventory: every container we created or are about to create (write-ahead: the row exists
  before the container does), so a kill at any point converges and only what we own is pruned;
* history of passes and of actions, for status and debugging;
* small key/value facts (last attempted/applied revision, deployment conditions).

Faults of the file itself (see reconciler/statedir.py): a write that fails (disk full, I/O error)
rolls its transaction back and raises a StoreError the pass reports; the store is never left half
written. A store that is corrupt at start (``PRAGMA quick_check``, or a file that is not a
database) is moved aside to ``modelfleet.db.corrupt-<UTC time>`` with its WAL, and recreated empty;
a store deleted while the daemon runs is written back from the still-open database. An empty
store next to other daemon state (the Git mirror) is reported too: the pass then adopts the
managed containers that are exactly a desired replica and never removes one it does not own.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from modelfleet.reconciler.statedir import StoreError, is_corrupt, sqlite_write, translated, write_failure
from modelfleet.state.inventory import InventoryChanges, InventoryRow

log = logging.getLogger("modelfleet.store")

DB_FILE = "modelfleet.db"
SCHEMA = """
CREATE TABLE IF NOT EXISTS inventory (
    host TEXT NOT NULL,
    name TEXT NOT NULL,
    container_id TEXT,
    model TEXT NOT NULL,
    environment TEXT NOT NULL,
    replica INTEGER NOT NULL,
    spec_hash TEXT NOT NULL,
    revision TEXT NOT NULL,
    phase TEXT NOT NULL,            -- creating | active | removing
    ready INTEGER NOT NULL DEFAULT 0,
    url TEXT,
    probe_url TEXT,
    updated_at REAL NOT NULL,
    PRIMARY KEY (host, name)
);
CREATE TABLE IF NOT EXISTS passes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    revision TEXT,
    trigger TEXT,
    started_at REAL NOT NULL,
    finished_at REAL,
    result TEXT,
    summary TEXT
);
CREATE TABLE IF NOT EXISTS actions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pass_id INTEGER,
    op TEXT NOT NULL,
    model TEXT NOT NULL,
    environment TEXT NOT NULL,
    host TEXT NOT NULL,
    replica INTEGER NOT NULL,
    container TEXT,
    started_at REAL NOT NULL,
    finished_at REAL,
    result TEXT,
    error TEXT
);
CREATE TABLE IF NOT EXISTS facts (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
HISTORY_KEEP = 2000


# Facts (key/value) the pass plans from; each lives here only, not also in a daemon field.
FACT_FAILED_ROLLOUTS = "failed_rollouts"  # failed_rollout_marker -> why
FACT_UNREACHABLE_SINCE = "unreachable_since"  # host -> wall-clock time it stopped answering
FACT_LAST_ATTEMPTED = "last_attempted_revision"
FACT_LAST_APPLIED = "last_applied_revision"
# {since, revision, reason} while fetches fail (state/source.py)
FACT_SOURCE_UNREACHABLE_SINCE = "source_unreachable_since"
FACT_CONFIRMED_DELETIONS = "confirmed_deletions"  # commits whose deletions `modelfleet confirm` confirmed
FACT_PROBE_FAILURES = "probe_failures"  # "host/container id" -> failed readiness probes in a row (state/readiness.py)


CORRUPT_SUFFIX = ".corrupt-"
REPLACED_SUFFIX = ".replaced-"
_SIDE_FILES = ("-wal", "-shm", "-journal")
# Other daemon state in stateDir: an empty store next to it was lost, not new.
_EARLIER_STATE = ("repo.git/HEAD",)


class Store:
    def __init__(self, state_dir: str | Path, *, read_only: bool = False) -> None:
        path = Path(state_dir)
        self.path = path / DB_FILE
        self.read_only = read_only
        self._lock = threading.RLock()
        # What happened to the file, for /api/v1/status: recreated or restored (kept for the
        # process's lifetime), and the last write that failed (cleared by the next one that works).
        self.recovery: str | None = None
        self.write_error: str | None = None
        if read_only:
            # `modelfleet plan` reads the daemon's facts next to a running daemon: never write.
            self._db = sqlite3.connect(f"{self.path.as_uri()}?mode=ro", uri=True, timeout=10,
                                       isolation_level=None, check_same_thread=False)
        else:
            path.mkdir(parents=True, exist_ok=True)
            self._db = self._open_checked(path)
        self._identity = self._file_identity()
        with self._lock:
            self._facts: dict[str, str] = dict(self._read(
                lambda db: db.execute("SELECT key, value FROM facts").fetchall()))
        # The inventory is read several times a pass and written rarely: cache it between writes.
        self._inventory_cache: list[InventoryRow] | None = None

    # --- opening, checking, recovering ------------------------------------------------------------

    def _check(self) -> None:
        """Raise sqlite3.DatabaseError when the existing file is not a sound database. Read-only, so
        that a damaged file and its WAL are moved aside exactly as they were found."""
        if not self.path.exists():
            return
        db = sqlite3.connect(f"{self.path.absolute().as_uri()}?mode=ro", uri=True, timeout=10, isolation_level=None)
        try:
            problems = [row[0] for row in db.execute("PRAGMA quick_check").fetchall()]
        finally:
            db.close()
        if problems != ["ok"]:
            raise sqlite3.DatabaseError("quick_check: " + "; ".join(str(p) for p in problems[:3]))

    def _connect(self) -> sqlite3.Connection:
        """Open the file read-write and make sure it is a sound database with our schema."""
        self._check()
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
            db.execute("SELECT count(*) FROM inventory").fetchone()
        except BaseException:
            db.close()
            raise
        return db

    def _open_checked(self, state_dir: Path) -> sqlite3.Connection:
        existed = self.path.exists()
        try:
            db = self._connect()
        except sqlite3.DatabaseError as exc:
            if not _corrupt(exc):
                # A full disk or an I/O error is no reason to throw a sound store away.
                raise write_failure(self.path, exc, verb="open") from exc
            moved = self._move_aside()
            self.recovery = (f"{DB_FILE} was corrupt ({exc}) and was moved aside to {moved.name}; started with an "
                             "empty store: managed containers that match the desired state are adopted, others are "
                             "left alone (never removed)")
            log.error("the store %s is corrupt (%s): moved it aside to %s and started with an empty one",
                      self.path, exc, moved)
            try:
                return self._connect()
            except sqlite3.DatabaseError as again:
                raise write_failure(self.path, again, verb="recreate") from again
        if not existed and any((state_dir / p).exists() for p in _EARLIER_STATE):
            self.recovery = (f"{DB_FILE} was missing (deleted?) though the daemon ran here before; started with an "
                             "empty store: managed containers that match the desired state are adopted, others are "
                             "left alone (never removed)")
            log.warning("the store %s was missing: started with an empty one", self.path)
        return db

    def _move_aside(self, suffix: str = CORRUPT_SUFFIX, side_files: bool = True) -> Path:
        """Rename the damaged file (and its WAL: never replay it onto a new file) out of the way."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.path.with_name(f"{DB_FILE}{suffix}{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.path.with_name(f"{DB_FILE}{suffix}{stamp}-{n}")
        for side in ("", *_SIDE_FILES) if side_files else ("",):
            with suppress(FileNotFoundError):
                os.replace(f"{self.path}{side}", f"{target}{side}")
        return target

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def check_file(self) -> None:
        """The file deleted (or replaced) under the running daemon: the open database still holds
        everything, so it is written back to its path; a file put in its place is moved aside to
        ``modelfleet.db.replaced-<UTC time>`` first (never opened while ours is: the WAL beside it
        is ours). Called at the start of each pass; one stat when nothing happened."""
        if self.read_only:
            return
        with self._lock:
            current = self._file_identity()
            if current is not None and current == self._identity:
                return
            if current is not None:
                moved = self._move_aside(REPLACED_SUFFIX, side_files=False)
                log.error("the store %s was replaced while the daemon ran: moved the new file to %s", self.path,
                          moved)
                self._restore(f"{DB_FILE} was replaced while the daemon ran; the new file was moved aside to "
                              f"{moved.name} and the daemon's store written back (nothing lost)")
            else:
                self._restore(f"{DB_FILE} was deleted while the daemon ran; it was written back from the open "
                              "database (nothing lost)")

    def _restore(self, why: str) -> None:
        temp = self.path.with_name(f".{DB_FILE}.restore")
        for side in ("", *_SIDE_FILES):
            with suppress(FileNotFoundError):
                os.unlink(f"{temp}{side}")
        try:
            copy = sqlite3.connect(temp, isolation_level=None)
            try:
                self._db.backup(copy)
            finally:
                copy.close()
            # Closing checkpoints our WAL into the deleted file and removes the WAL files, so the new
            # file at the path never sees a WAL that belongs to another file.
            self._db.close()
            os.replace(temp, self.path)
            db = self._connect()
        except (sqlite3.Error, OSError) as exc:
            with suppress(FileNotFoundError):
                os.unlink(temp)
            if self._db_closed():
                # The old connection is gone: carry on with a fresh store rather than with none.
                with suppress(sqlite3.Error):
                    self._swap(self._connect(), f"{DB_FILE} was deleted and could not be written back ({exc});"
                                                " started with an empty store")
            raise write_failure(self.path, exc, verb="restore") from exc
        log.warning("the store %s was written back from the open database: %s", self.path, why)
        self._swap(db, why)

    def _db_closed(self) -> bool:
        try:
            self._db.execute("SELECT 1")
        except sqlite3.ProgrammingError:
            return True
        except sqlite3.Error:
            return False
        return False

    def _swap(self, db: sqlite3.Connection, why: str) -> None:
        with suppress(sqlite3.Error):
            self._db.close()
        self._db = db
        self._identity = self._file_identity()
        self._inventory_cache = None
        self._facts = dict(db.execute("SELECT key, value FROM facts").fetchall())
        self.recovery = why

    def health(self) -> dict[str, Any]:
        """For /api/v1/status: whether the store takes writes, and what happened to its file."""
        return {"path": str(self.path), "ok": self.write_error is None, "error": self.write_error,
                "recovered": self.recovery}

    # --- transactions and reads -------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._inventory_cache = None  # any write may change the inventory
            try:
                with sqlite_write(self._db, self.path) as db:
                    yield db
            except StoreError as exc:
                self.write_error = exc.message
                raise
            self.write_error = None

    def _read(self, query: Any) -> Any:
        with self._lock:
            try:
                return query(self._db)
            except sqlite3.Error as exc:
                error = translated(self.path, exc, verb="read")
                if error is exc:
                    raise
                raise error from exc

    @staticmethod
    def open_read_only(state_dir: str | Path) -> Store | None:
        """The daemon's store for reading, or None when there is none (no daemon ran with this stateDir)."""
        if not (Path(state_dir) / DB_FILE).is_file():
            return None
        try:
            store = Store(state_dir, read_only=True)
            store.inventory()
        except (sqlite3.Error, StoreError):
            return None
        return store

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- inventory ------------------------------------------------------------------------------

    def record_intent(self, host: str, name: str, model: str, environment: str, replica: int,
                      spec_hash: str, revision: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO inventory (host, name, container_id, model, environment, replica, spec_hash,"
                " revision, phase, ready, url, updated_at) VALUES (?,?,NULL,?,?,?,?,?,'creating',0,NULL,?)"
                " ON CONFLICT(host, name) DO UPDATE SET phase='creating', ready=0, updated_at=excluded.updated_at",
                (host, name, model, environment, replica, spec_hash, revision, time.time()),
            )

    def record_created(self, host: str, name: str, container_id: str, url: str | None,
                       probe_url: str | None) -> None:
        with self._tx() as db:
            db.execute("UPDATE inventory SET container_id=?, url=?, probe_url=?, phase='active', updated_at=?"
                       " WHERE host=? AND name=?", (container_id, url, probe_url, time.time(), host, name))

    def set_ready(self, host: str, name: str, ready: bool, url: str | None = None) -> None:
        with self._tx() as db:
            if url is None:
                db.execute("UPDATE inventory SET ready=?, updated_at=? WHERE host=? AND name=?",
                           (int(ready), time.time(), host, name))
            else:
                db.execute("UPDATE inventory SET ready=?, url=?, updated_at=? WHERE host=? AND name=?",
                           (int(ready), url, time.time(), host, name))

    def mark_removing(self, host: str, name: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE inventory SET phase='removing', ready=0, updated_at=? WHERE host=? AND name=?",
                       (time.time(), host, name))

    def forget(self, host: str, name: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM inventory WHERE host=? AND name=?", (host, name))

    def write_changes(self, changes: InventoryChanges) -> None:
        """The plan's inventory writes, in one transaction (a kill leaves all or none of them)."""
        if not changes:
            return
        now = time.time()
        with self._tx() as db:
            for host, name in changes.forget:
                db.execute("DELETE FROM inventory WHERE host=? AND name=?", (host, name))
            for host, name, container_id in changes.container_ids:
                db.execute("UPDATE inventory SET container_id=?, phase=CASE phase WHEN 'creating' THEN 'active'"
                           " ELSE phase END, updated_at=? WHERE host=? AND name=?", (container_id, now, host, name))
            for host, name in changes.unready:
                db.execute("UPDATE inventory SET ready=0, updated_at=? WHERE host=? AND name=?", (now, host, name))
            for r in changes.adopt:
                db.execute(
                    "INSERT INTO inventory (host, name, container_id, model, environment, replica, spec_hash,"
                    " revision, phase, ready, url, updated_at) VALUES (?,?,?,?,?,?,?,?,'active',0,NULL,?)"
                    " ON CONFLICT(host, name) DO UPDATE SET container_id=excluded.container_id, phase='active'",
                    (r.host, r.name, r.container_id, r.model, r.environment, r.index, r.spec_hash, r.revision, now))
            for u in changes.ready:
                if u.fill_urls:
                    db.execute("UPDATE inventory SET ready=1, url=?, probe_url=?, updated_at=? WHERE host=? AND name=?",
                               (u.url, u.probe_url, now, u.host, u.name))
                else:
                    db.execute("UPDATE inventory SET ready=1, updated_at=? WHERE host=? AND name=?",
                               (now, u.host, u.name))

    def inventory(self) -> list[InventoryRow]:
        with self._lock:
            if self._inventory_cache is not None:
                return list(self._inventory_cache)
            rows = self._read(lambda db: db.execute(
                "SELECT host, name, container_id, model, environment, replica, spec_hash, revision, phase,"
                " ready, url, probe_url FROM inventory ORDER BY host, name").fetchall())
            self._inventory_cache = [InventoryRow(r[0], r[1], r[2], r[3], r[4], int(r[5]), r[6], r[7], r[8],
                                                  bool(r[9]), r[10], r[11]) for r in rows]
            return list(self._inventory_cache)

    # --- history --------------------------------------------------------------------------------

    def begin_pass(self, trigger: str) -> int:
        self.check_file()
        with self._tx() as db:
            cursor = db.execute("INSERT INTO passes (trigger, started_at) VALUES (?, ?)", (trigger, time.time()))
            pass_id = int(cursor.lastrowid or 0)
            db.execute("DELETE FROM passes WHERE id < ?", (pass_id - HISTORY_KEEP,))
            db.execute("DELETE FROM actions WHERE pass_id < ?", (pass_id - HISTORY_KEEP,))
        return pass_id

    def finish_pass(self, pass_id: int, revision: str | None, result: str, summary: dict[str, Any]) -> None:
        with self._tx() as db:
            db.execute("UPDATE passes SET revision=?, finished_at=?, result=?, summary=? WHERE id=?",
                       (revision, time.time(), result, json.dumps(summary, default=str), pass_id))

    def begin_action(self, pass_id: int, op: str, model: str, environment: str, host: str, replica: int,
                     container: str | None) -> int:
        with self._tx() as db:
            cursor = db.execute(
                "INSERT INTO actions (pass_id, op, model, environment, host, replica, container, started_at)"
                " VALUES (?,?,?,?,?,?,?,?)", (pass_id, op, model, environment, host, replica, container,
                                               time.time()))
            return int(cursor.lastrowid or 0)

    def finish_action(self, action_id: int, result: str, error: str | None = None) -> None:
        with self._tx() as db:
            db.execute("UPDATE actions SET finished_at=?, result=?, error=? WHERE id=?",
                       (time.time(), result, error, action_id))

    def recent_passes(self, limit: int = 20) -> list[dict[str, Any]]:
        rows = self._read(lambda db: db.execute("SELECT id, revision, trigger, started_at, finished_at, result,"
                                                " summary FROM passes ORDER BY id DESC LIMIT ?", (limit,)).fetchall())
        return [{"id": r[0], "revision": r[1], "trigger": r[2], "started_at": r[3], "finished_at": r[4],
                 "result": r[5], "summary": json.loads(r[6]) if r[6] else None} for r in rows]

    def recent_actions(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self._read(lambda db: db.execute("SELECT id, pass_id, op, model, environment, host, replica,"
                                                " container, started_at, finished_at, result, error FROM actions"
                                                " ORDER BY id DESC LIMIT ?", (limit,)).fetchall())
        keys = ("id", "pass_id", "op", "model", "environment", "host", "replica", "container", "started_at",
                "finished_at", "result", "error")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    # --- facts ----------------------------------------------------------------------------------

    def set_fact(self, key: str, value: Any) -> None:
        text = json.dumps(value, default=str)
        with self._lock:
            if self._facts.get(key) == text:
                return  # unchanged: no write (a no-op pass writes nothing)
            with self._tx() as db:
                db.execute("INSERT INTO facts (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET"
                           " value=excluded.value", (key, text))
            self._facts[key] = text

    def fact(self, key: str, default: Any = None) -> Any:
        """Facts are few and small: all are read once at open, then kept in step with each write."""
        text = self._facts.get(key)
        return json.loads(text) if text is not None else default


def _corrupt(exc: sqlite3.DatabaseError) -> bool:
    """Damage worth moving the file aside for: SQLite says so, or quick_check found problems."""
    return is_corrupt(exc) or str(exc).startswith("quick_check: ")
