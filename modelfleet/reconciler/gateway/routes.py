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

Deployments with an on-prem endpoint also carry their overflow settings (:class:`Overflow`, the
``overflow`` column, added the same way): where the endpoint is, how to check its health, when
requests go to the replicas instead. The path of the endpoint's token file is published, never the
token: each gateway reads it from its own machine.

Deployments with ``maxToken`` policies carry their token limits (``tokens`` column, added the same
way): the budgets the gateway checks each request against (state/token_limits.py).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from modelfleet.reconciler.statedir import rollback, translated
from modelfleet.state.routes import prefer_nearby, route_key
from modelfleet.state.token_limits import TokenLimits

ROUTES_DB = "routes.db"


@dataclass(frozen=True)
class Backend:
    url: str  # http://address:port of a ready replica
    container: str
    host: str
    # What the execution records and per-version metrics say about the replica that answered, and
    # where it is (a gateway with gateway.location prefers its own location, then its continent).
    replica: int | None = None
    spec_hash: str = ""
    revision: str = ""
    location: str = ""
    continent: str = ""


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
class Overflow:
    """Where a gateway sends a deployment's requests first: an endpoint outside the pool (on-prem).

    The manifest's ``overflow`` (state/manifests.py ``Overflow``), flattened: requests go to
    ``endpoint`` unless ``max_concurrency`` are in flight there already, one in every
    ``100 / percentage`` (a steady share), or the endpoint is unhealthy (active checks of
    ``health_path``, or ejected for ``ejection_time`` after ``consecutive_failures`` failed requests):
    those go to the deployment's replicas.
    """

    endpoint: str
    token_file: str | None = None
    health_path: str = "/"
    health_period: float = 5.0
    health_timeout: float = 2.0
    failure_threshold: int = 2
    max_concurrency: int | None = None
    percentage: float = 0.0
    consecutive_failures: int = 5
    ejection_time: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.endpoint, str) or not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"overflow endpoint must be an http(s) URL, got {self.endpoint!r}")
        if not 0 <= self.percentage <= 100:
            raise ValueError(f"overflow percentage must be within 0..100, got {self.percentage!r}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"overflow maxConcurrency must be at least 1, got {self.max_concurrency!r}")
        if self.health_period <= 0 or self.health_timeout <= 0 or self.ejection_time <= 0:
            raise ValueError("overflow health period, timeout and ejection time must be more than 0")
        if self.failure_threshold < 1 or self.consecutive_failures < 1:
            raise ValueError("overflow failure thresholds must be at least 1")

    def to_dict(self) -> dict[str, object]:
        return {"endpoint": self.endpoint, "tokenFile": self.token_file, "healthPath": self.health_path,
                "healthPeriod": self.health_period, "healthTimeout": self.health_timeout,
                "failureThreshold": self.failure_threshold, "maxConcurrency": self.max_concurrency,
                "percentage": self.percentage, "consecutiveFailures": self.consecutive_failures,
                "ejectionTime": self.ejection_time}

    @staticmethod
    def from_dict(data: dict[str, object]) -> Overflow:
        def number(name: str, default: float) -> float:
            value = data.get(name, default)
            return float(value) if isinstance(value, int | float) else default

        def count(name: str, default: int) -> int:
            value = data.get(name, default)
            return int(value) if isinstance(value, int | float) else default

        token_file = data.get("tokenFile")
        max_concurrency = data.get("maxConcurrency")
        return Overflow(
            endpoint=str(data["endpoint"]), token_file=str(token_file) if token_file else None,
            health_path=str(data.get("healthPath") or "/"), health_period=number("healthPeriod", 5.0),
            health_timeout=number("healthTimeout", 2.0), failure_threshold=count("failureThreshold", 2),
            max_concurrency=int(max_concurrency) if isinstance(max_concurrency, int | float) else None,
            percentage=number("percentage", 0.0), consecutive_failures=count("consecutiveFailures", 5),
            ejection_time=number("ejectionTime", 30.0))


@dataclass(frozen=True)
class RouteTable:
    version: int
    # route_key(model, environment) -> ready backends (may be empty: deployment known but nothing ready)
    routes: dict[str, tuple[Backend, ...]] = field(default_factory=dict)
    published_at: float = 0.0
    # route_key -> activation settings, for the serverless deployments among `routes`
    activation: dict[str, Activation] = field(default_factory=dict)
    # route_key -> overflow settings, for the deployments among `routes` with an on-prem endpoint
    overflow: dict[str, Overflow] = field(default_factory=dict)
    # route_key -> token limits (maxToken policies), for the deployments among `routes` that have any
    tokens: dict[str, TokenLimits] = field(default_factory=dict)
    # Only in tables followed over HTTP (`to_payload`), never in routes.db: route_key -> the
    # deployment's gateway secret (a gateway on another machine has not the daemon's key), and
    # location name -> continent of the pool's hosts (where a gateway's own location is).
    secrets: dict[str, str] = field(default_factory=dict)
    locations: dict[str, str] = field(default_factory=dict)
    # Set by `preferring`: route_key -> every backend, where `routes` holds the preferred ones only.
    fallback: dict[str, tuple[Backend, ...]] = field(default_factory=dict)

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

    def overflow_json(self) -> str | None:
        """The ``overflow`` column: None when no deployment has overflow settings."""
        if not self.overflow:
            return None
        return json.dumps({k: o.to_dict() for k, o in sorted(self.overflow.items())}, sort_keys=True)

    def tokens_json(self) -> str | None:
        """The ``tokens`` column: None when no deployment has token limits."""
        if not self.tokens:
            return None
        return json.dumps({k: t.to_dict() for k, t in sorted(self.tokens.items())}, sort_keys=True)

    @staticmethod
    def from_json(version: int, text: str, published_at: float = 0.0,
                  activation: str | None = None, overflow: str | None = None,
                  tokens: str | None = None) -> RouteTable:
        """``text``: the routes (:meth:`to_json`); ``activation``: :meth:`activation_json`, ``overflow``:
        :meth:`overflow_json`, ``tokens``: :meth:`tokens_json`, if any."""
        data = json.loads(text)
        settings = json.loads(activation) if activation else {}
        overflows = json.loads(overflow) if overflow else {}
        limits = json.loads(tokens) if tokens else {}
        return RouteTable(version, {k: tuple(Backend(**b) for b in v) for k, v in data.items()},
                          published_at, {k: Activation(int(a["queue"]), float(a["timeout"]))
                                         for k, a in settings.items()},
                          {k: Overflow.from_dict(o) for k, o in overflows.items()},
                          {k: TokenLimits.from_dict(t) for k, t in limits.items()})


    def to_payload(self) -> dict[str, object]:
        """The table as ``GET /api/v1/routes`` sends it (and a remote gateway caches it)."""
        return {"version": self.version, "published_at": self.published_at,
                "routes": {k: [b.__dict__ for b in v] for k, v in sorted(self.routes.items())},
                "activation": {k: {"queue": a.queue, "timeout": a.timeout} for k, a in sorted(self.activation.items())},
                "overflow": {k: o.to_dict() for k, o in sorted(self.overflow.items())},
                "tokens": {k: t.to_dict() for k, t in sorted(self.tokens.items())},
                "secrets": dict(sorted(self.secrets.items())), "locations": dict(sorted(self.locations.items()))}

    @staticmethod
    def from_payload(data: dict[str, Any]) -> RouteTable:
        """The inverse of :meth:`to_payload`; raises ValueError/KeyError/TypeError on a malformed one."""
        if not isinstance(data, dict) or not isinstance(data.get("routes"), dict):
            raise ValueError("not a route table: no routes")
        return RouteTable(
            int(data["version"]),
            {str(k): tuple(Backend(**b) for b in v) for k, v in data["routes"].items()},
            float(data.get("published_at") or 0.0),
            {str(k): Activation(int(a["queue"]), float(a["timeout"]))
             for k, a in (data.get("activation") or {}).items()},
            {str(k): Overflow.from_dict(o) for k, o in (data.get("overflow") or {}).items()},
            {str(k): TokenLimits.from_dict(t) for k, t in (data.get("tokens") or {}).items()},
            {str(k): str(v) for k, v in (data.get("secrets") or {}).items()},
            {str(k): str(v) for k, v in (data.get("locations") or {}).items()})

    def preferring(self, location: str | None, continent: str | None = None) -> RouteTable:
        """The table as a gateway in ``location`` serves it: each deployment's backends in that
        location if it has any, else those on its continent, else all of them (the rest stay in
        ``fallback``, for a retry when every preferred one fails). ``continent`` defaults to that
        of ``location`` among ``locations``."""
        if not location:
            return self
        continent = continent or self.locations.get(location)
        routes: dict[str, tuple[Backend, ...]] = {}
        fallback: dict[str, tuple[Backend, ...]] = {}
        for key, backends in self.routes.items():
            preferred = prefer_nearby(backends, location, continent, lambda b: (b.location, b.continent))
            routes[key] = preferred
            if len(preferred) != len(backends):
                fallback[key] = backends
        return replace(self, routes=routes, fallback=fallback)


class RouteStore:
    """Versioned route tables in ``<stateDir>/routes.db``."""

    # The settings columns, added to a routes.db written before they existed.
    SETTINGS = ("activation", "overflow", "tokens")

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
            " activation TEXT, overflow TEXT, tokens TEXT)"
        )
        self._has = {name: self._ensure_column(name) for name in self.SETTINGS}
        # (version, (routes json, then each settings column's json)) this process last published
        self._last: tuple[int, tuple[str | None, ...]] | None = None
        # The last table as given, to skip serializing an unchanged one (every pass publishes).
        self._last_given: tuple[int, tuple[object, ...]] | None = None

    def _ensure_column(self, name: str) -> bool:
        """Add the column ``name`` (one of SETTINGS) to a routes.db written before it existed;
        False if it cannot be.

        A reader that cannot add it (read-only file, locked) reads the tables without those settings.
        """
        if name in self._columns():
            return True
        # Fails when another process added it first, or the file is read-only.
        with contextlib.suppress(sqlite3.OperationalError):
            self._db.execute(f"ALTER TABLE route_tables ADD COLUMN {name} TEXT")
        return name in self._columns()

    def _columns(self) -> set[str]:
        return {str(row[1]) for row in self._db.execute("PRAGMA table_info(route_tables)")}

    def publish(self, routes: dict[str, tuple[Backend, ...]], activation: dict[str, Activation] | None = None,
                overflow: dict[str, Overflow] | None = None, tokens: dict[str, TokenLimits] | None = None) -> int:
        """Store a new table if it differs from the latest; returns the current version.

        ``activation``: route key -> activation settings of the serverless deployments; ``overflow``:
        route key -> overflow settings; ``tokens``: route key -> token limits (keys that are not in
        ``routes`` are ignored), stored in the same transaction as the routes.
        """
        given = (dict(routes), dict(activation or {}), dict(overflow or {}), dict(tokens or {}))
        if self._last_given is not None and self._last_given[1] == given \
                and self._last_given[0] == self.latest_version():
            return self._last_given[0]  # the same objects as last time, and nobody else published since
        version = self._publish(routes, activation, overflow, tokens)
        self._last_given = (version, given)
        return version

    def _publish(self, routes: dict[str, tuple[Backend, ...]], activation: dict[str, Activation] | None,
                 overflow: dict[str, Overflow] | None, tokens: dict[str, TokenLimits] | None) -> int:
        table = RouteTable(0, routes, activation={k: a for k, a in (activation or {}).items() if k in routes},
                           overflow={k: o for k, o in (overflow or {}).items() if k in routes},
                           tokens={k: t for k, t in (tokens or {}).items() if k in routes})
        text = table.to_json()
        settings = {"activation": table.activation_json(), "overflow": table.overflow_json(),
                    "tokens": table.tokens_json()}
        for name, value in settings.items():
            if value is not None and not self._has[name]:
                self._has[name] = self._ensure_column(name)
                if not self._has[name]:
                    raise sqlite3.OperationalError(f"{self.path}: cannot add the {name} column to route_tables")
        content: tuple[str | None, ...] = (text, *settings.values())
        if self._last is not None and self._last[1] == content and self._last[0] == self.latest_version():
            return self._last[0]  # unchanged, and nobody else published since
        latest = self.latest()
        if latest is not None and (latest.to_json(), latest.activation_json(), latest.overflow_json(),
                                   latest.tokens_json()) == content:
            self._last = (latest.version, content)
            return latest.version
        self._db.execute("BEGIN IMMEDIATE")
        try:
            columns: list[str] = ["published_at", "routes"]
            values: list[object] = [time.time(), text]
            for name, value in settings.items():
                if self._has[name]:
                    columns.append(name)
                    values.append(value)
            cursor = self._db.execute(
                f"INSERT INTO route_tables ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})",
                values)
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
        self._last = (version, content)
        return version

    def latest_version(self) -> int:
        row = self._db.execute("SELECT MAX(version) FROM route_tables").fetchone()
        return int(row[0] or 0)

    def latest(self) -> RouteTable | None:
        if not all(self._has.values()):
            # a reader that could not add a column: has the daemon since?
            present = self._columns()
            self._has = {name: name in present for name in self.SETTINGS}
        columns = "version, routes, published_at, " + ", ".join(name if self._has[name] else "NULL"
                                                                 for name in self.SETTINGS)
        row = self._db.execute(f"SELECT {columns} FROM route_tables ORDER BY version DESC LIMIT 1").fetchone()
        if row is None:
            return None
        return RouteTable.from_json(int(row[0]), row[1], float(row[2]), row[3], row[4], row[5])

    def close(self) -> None:
        self._db.close()


# route_key is the pure core's (modelfleet.state.routes), re-exported with the table it keys.
__all__ = ["DEFAULT_ACTIVATION_QUEUE", "DEFAULT_ACTIVATION_TIMEOUT", "ROUTES_DB", "Activation", "Backend",
           "Overflow", "RouteStore", "RouteTable", "route_key"]
