"""The route table: which ready replicas serve each deployment.

The daemon publishes it; gateways follow it. It lives in its own SQLite file in WAL mode so that a
gateway reads a consistent, versioned table without ever blocking the daemon, and keeps serving the
last table when the daemon is away. Publishing is one transaction: readers see the old table or
the new one, never half of each.

Besides the backends, a table carries the activation settings of each serverless deployment
(:class:`Activation`): a gateway holds a request for such a deployment while it has no ready
replica, instead of answering 503, until the daemon publishes one. They are stored in the
``activation`` column (added to an older ``routes.db`` when missing; a table without it has no
activation settings).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from modelfleet.reconciler.statedir import rollback, translated
from modelfleet.state.routes import route_key

ROUTES_DB = "routes.db"


@dataclass(frozen=True)
class Backend:
    url: str  # http://address:port of a ready replica
    container: str
    host: str


DEFAULT_ACTIVATION_QUEUE = 100
DEFAULT_ACTIVATION_TIMEOUT = 60.0


@dataclass(frozen=True)
class Activation:
    """How a gateway holds requests for a serverless deployment that has no ready replica.

    ``queue``: requests held at most per gateway (more get 503 ``ActivationQueueFull``), from the
    manifest's ``serverless.queue``; ``timeout``: seconds a request is held at most (then 503
    ``ActivationTimeout``), from ``serverless.activationTimeout``.
    """

    queue: int = DEFAULT_ACTIVATION_QUEUE
    timeout: float = DEFAULT_ACTIVATION_TIMEOUT

    def __post_init__(self) -> None:
        if isinstance(self.queue, bool) or not isinstance(self.queue, int) or self.queue < 0:
            raise ValueError(f"activation queue must be an integer >= 0, got {self.queue!r}")
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, int | float) or not self.timeout >= 0:
            raise ValueError(f"activation timeout must be a number of seconds >= 0, got {self.timeout!r}")


@dataclass(frozen=True)
class RouteTable:
    version: int
    # route_key(model, environment) -> ready backends (may be empty: deployment known but nothing ready)
    routes: dict[str, tuple[Backend, ...]] = field(default_factory=dict)
    published_at: float = 0.0
    # route_key -> activation settings, for the serverless deployments among `routes`
    activation: dict[str, Activation] = field(default_factory=dict)

    def backends(self, model: str, environment: str) -> tuple[Backend, ...] | None:
        """None: no such deployment. Empty: the deployment exists but no replica is ready."""
        return self.routes.get(route_key(model, environment))

    def to_json(self) -> str:
        return json.dumps({k: [b.__dict__ for b in v] for k, v in sorted(self.routes.items())},
                          sort_keys=True)

    def activation_json(self) -> str | None:
        """The ``activation`` column: None when no deployment has activation settings."""
        if not self.activation:
            return None
        return json.dumps({k: {"queue": a.queue, "timeout": a.timeout} for k, a in sorted(self.activation.items())},
                          sort_keys=True)

    @staticmethod
    def from_json(version: int, text: str, published_at: float = 0.0,
                  activation: str | None = None) -> RouteTable:
        """``text``: the routes (:meth:`to_json`); ``activation``: :meth:`activation_json`, if any."""
        data = json.loads(text)
        settings = json.loads(activation) if activation else {}
        return RouteTable(version, {k: tuple(Backend(**b) for b in v) for k, v in data.items()},
                          published_at, {k: Activation(int(a["queue"]), float(a["timeout"]))
                                         for k, a in settings.items()})


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
            " version INTEGER PRIMARY KEY AUTOINCREMENT, published_at REAL NOT NULL, routes TEXT NOT NULL,"
            " activation TEXT)"
        )
        self._has_activation = self._ensure_activation_column()
        # (version, routes json, activation json) this process last published
        self._last: tuple[int, str, str | None] | None = None

    def _ensure_activation_column(self) -> bool:
        """Add the ``activation`` column to a routes.db written before it existed; False if it cannot be.

        A reader that cannot add it (read-only file, locked) reads the tables without activation settings.
        """
        if self._columns() >= {"activation"}:
            return True
        # Fails when another process added it first, or the file is read-only.
        with contextlib.suppress(sqlite3.OperationalError):
            self._db.execute("ALTER TABLE route_tables ADD COLUMN activation TEXT")
        return "activation" in self._columns()

    def _columns(self) -> set[str]:
        return {str(row[1]) for row in self._db.execute("PRAGMA table_info(route_tables)")}

    def publish(self, routes: dict[str, tuple[Backend, ...]], activation: dict[str, Activation] | None = None) -> int:
        """Store a new table if it differs from the latest; returns the current version.

        ``activation``: route key -> activation settings of the serverless deployments (keys that are
        not in ``routes`` are ignored), stored in the same transaction as the routes.
        """
        activation = {k: a for k, a in (activation or {}).items() if k in routes}
        table = RouteTable(0, routes, activation=activation)
        text = table.to_json()
        settings = table.activation_json()
        if settings is not None and not self._has_activation:
            self._has_activation = self._ensure_activation_column()
            if not self._has_activation:
                raise sqlite3.OperationalError(f"{self.path}: cannot add the activation column to route_tables")
        if (self._last is not None and self._last[1:] == (text, settings)
                and self._last[0] == self.latest_version()):
            return self._last[0]  # unchanged, and nobody else published since: nothing to write
        latest = self.latest()
        if latest is not None and latest.to_json() == text and latest.activation_json() == settings:
            self._last = (latest.version, text, settings)
            return latest.version
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if self._has_activation:
                cursor = self._db.execute(
                    "INSERT INTO route_tables (published_at, routes, activation) VALUES (?, ?, ?)",
                    (time.time(), text, settings))
            else:
                cursor = self._db.execute("INSERT INTO route_tables (published_at, routes) VALUES (?, ?)",
                                          (time.time(), text))
            version = int(cursor.lastrowid or 0)
            # Keep a short history for debugging; the gateway only needs the latest.
            self._db.execute("DELETE FROM route_tables WHERE version < ?", (version - 50,))
            self._db.execute("COMMIT")
        except BaseException as exc:
            rollback(self._db)  # only if still open: SQLite rolls back by itself on a full disk
            error = translated(self.path, exc, "the route table")
            if error is exc:
                raise
            raise error from exc
        self._last = (version, text, settings)
        return version

    def latest_version(self) -> int:
        row = self._db.execute("SELECT MAX(version) FROM route_tables").fetchone()
        return int(row[0] or 0)

    def latest(self) -> RouteTable | None:
        if not self._has_activation:  # a reader that could not add the column: has the daemon since?
            self._has_activation = "activation" in self._columns()
        columns = "version, routes, published_at, activation" if self._has_activation else \
            "version, routes, published_at"
        row = self._db.execute(f"SELECT {columns} FROM route_tables ORDER BY version DESC LIMIT 1").fetchone()
        if row is None:
            return None
        return RouteTable.from_json(int(row[0]), row[1], float(row[2]), row[3] if len(row) > 3 else None)

    def close(self) -> None:
        self._db.close()


# route_key is the pure core's (modelfleet.state.routes), re-exported with the table it keys.
__all__ = ["DEFAULT_ACTIVATION_QUEUE", "DEFAULT_ACTIVATION_TIMEOUT", "ROUTES_DB", "Activation", "Backend",
           "RouteStore", "RouteTable", "route_key"]
