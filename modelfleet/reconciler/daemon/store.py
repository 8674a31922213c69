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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class InventoryRow:
    host: str
    name: str
    container_id: str | None
    model: str
    environment: str
    replica: int
    spec_hash: str
    revision: str
    phase: str
    ready: bool
    url: str | None
    probe_url: str | None


class Store:
    def __init__(self, state_dir: str | Path) -> None:
        path = Path(state_dir)
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / DB_FILE
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
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

    def adopt(self, host: str, name: str, container_id: str) -> None:
        """A container found on a host for a write-ahead row: now we know its id."""
        with self._tx() as db:
            db.execute("UPDATE inventory SET container_id=?, phase=CASE phase WHEN 'creating' THEN 'active'"
                       " ELSE phase END, updated_at=? WHERE host=? AND name=?",
                       (container_id, time.time(), host, name))

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
        with self._tx() as db:
            db.execute("INSERT INTO facts (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET"
                       " value=excluded.value", (key, json.dumps(value, default=str)))

    def fact(self, key: str, default: Any = None) -> Any:
        with self._lock:
            row = self._db.execute("SELECT value FROM facts WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default
