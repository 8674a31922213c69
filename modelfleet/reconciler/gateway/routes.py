"""The route table: which ready replicas serve each deployment.

The daemon publishes it; gateways follow it. It lives in its own SQLite file in WAL mode so that a
gateway reads a consistent, versioned table without ever blocking the daemon, and keeps serving the
last table when the daemon is away. Publishing is one transaction: readers see the old table or
the new one, never half of each.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from modelfleet.state.routes import route_key

ROUTES_DB = "routes.db"


@dataclass(frozen=True)
class Backend:
    url: str  # http://address:port of a ready replica
    container: str
    host: str


@dataclass(frozen=True)
class RouteTable:
    version: int
    # route_key(model, environment) -> ready backends (may be empty: deployment known but nothing ready)
    routes: dict[str, tuple[Backend, ...]] = field(default_factory=dict)
    published_at: float = 0.0

    def backends(self, model: str, environment: str) -> tuple[Backend, ...] | None:
        """None: no such deployment. Empty: the deployment exists but no replica is ready."""
        return self.routes.get(route_key(model, environment))

    def to_json(self) -> str:
        return json.dumps({k: [b.__dict__ for b in v] for k, v in sorted(self.routes.items())},
                          sort_keys=True)

    @staticmethod
    def from_json(version: int, text: str, published_at: float = 0.0) -> RouteTable:
        data = json.loads(text)
        return RouteTable(version, {k: tuple(Backend(**b) for b in v) for k, v in data.items()},
                          published_at)


class RouteStore:
    """Versioned route tables in ``<stateDir>/routes.db``."""

    def __init__(self, state_dir: str | Path) -> None:
        path = Path(state_dir)
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / ROUTES_DB
        self._db = sqlite3.connect(self.path, timeout=5, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS route_tables ("
            " version INTEGER PRIMARY KEY AUTOINCREMENT, published_at REAL NOT NULL, routes TEXT NOT NULL)"
        )
        self._last: tuple[int, str] | None = None  # (version, json) this process last published

    def publish(self, routes: dict[str, tuple[Backend, ...]]) -> int:
        """Store a new table if it differs from the latest; returns the current version."""
        table = RouteTable(0, routes)
        text = table.to_json()
        if self._last is not None and self._last[1] == text and self._last[0] == self.latest_version():
            return self._last[0]  # unchanged, and nobody else published since: nothing to write
        latest = self.latest()
        if latest is not None and latest.to_json() == text:
            self._last = (latest.version, text)
            return latest.version
        self._db.execute("BEGIN IMMEDIATE")
        try:
            cursor = self._db.execute("INSERT INTO route_tables (published_at, routes) VALUES (?, ?)",
                                      (time.time(), text))
            version = int(cursor.lastrowid or 0)
            # Keep a short history for debugging; the gateway only needs the latest.
            self._db.execute("DELETE FROM route_tables WHERE version < ?", (version - 50,))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._last = (version, text)
        return version

    def latest_version(self) -> int:
        row = self._db.execute("SELECT MAX(version) FROM route_tables").fetchone()
        return int(row[0] or 0)

    def latest(self) -> RouteTable | None:
        row = self._db.execute(
            "SELECT version, routes, published_at FROM route_tables ORDER BY version DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return None
        return RouteTable.from_json(int(row[0]), row[1], float(row[2]))

    def close(self) -> None:
        self._db.close()


# route_key is the pure core's (modelfleet.state.routes), re-exported with the table it keys.
__all__ = ["ROUTES_DB", "Backend", "RouteStore", "RouteTable", "route_key"]
