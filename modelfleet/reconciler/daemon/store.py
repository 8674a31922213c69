"""The daemon's durable memory (SQLite in WAL mode under stateDir).

* inventory: every container we created or are about to create (write-ahead: the row exists
  before the container does), so a kill at any point converges and only what we own is pruned;
* history of passes and of actions, for status and debugging;
* small key/value facts (last attempted/applied revision, deployment conditions).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from modelfleet.state.inventory import InventoryChanges, InventoryRow

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


class Store:
    def __init__(self, state_dir: str | Path, *, read_only: bool = False) -> None:
        path = Path(state_dir)
        self.path = path / DB_FILE
        self.read_only = read_only
        self._lock = threading.RLock()
        if read_only:
            # `modelfleet plan` reads the daemon's facts next to a running daemon: never write.
            self._db = sqlite3.connect(f"{self.path.as_uri()}?mode=ro", uri=True, timeout=10,
                                       isolation_level=None, check_same_thread=False)
        else:
            path.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        with self._lock:
            self._facts: dict[str, str] = dict(self._db.execute("SELECT key, value FROM facts").fetchall())
        # The inventory is read several times a pass and written rarely: cache it between writes.
        self._inventory_cache: list[InventoryRow] | None = None

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._inventory_cache = None  # any write may change the inventory
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    @staticmethod
    def open_read_only(state_dir: str | Path) -> Store | None:
        """The daemon's store for reading, or None when there is none (no daemon ran with this stateDir)."""
        if not (Path(state_dir) / DB_FILE).is_file():
            return None
        try:
            store = Store(state_dir, read_only=True)
            store.inventory()
        except sqlite3.Error:
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
            rows = self._db.execute(
                "SELECT host, name, container_id, model, environment, replica, spec_hash, revision, phase,"
                " ready, url, probe_url FROM inventory ORDER BY host, name").fetchall()
            self._inventory_cache = [InventoryRow(r[0], r[1], r[2], r[3], r[4], int(r[5]), r[6], r[7], r[8],
                                                  bool(r[9]), r[10], r[11]) for r in rows]
            return list(self._inventory_cache)

    # --- history --------------------------------------------------------------------------------

    def begin_pass(self, trigger: str) -> int:
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
        with self._lock:
            rows = self._db.execute("SELECT id, revision, trigger, started_at, finished_at, result, summary"
                                    " FROM passes ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [{"id": r[0], "revision": r[1], "trigger": r[2], "started_at": r[3], "finished_at": r[4],
                 "result": r[5], "summary": json.loads(r[6]) if r[6] else None} for r in rows]

    def recent_actions(self, limit: int = 50) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT id, pass_id, op, model, environment, host, replica, container,"
                                    " started_at, finished_at, result, error FROM actions ORDER BY id DESC"
                                    " LIMIT ?", (limit,)).fetchall()
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
