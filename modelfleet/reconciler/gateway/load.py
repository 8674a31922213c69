"""The load meter: the load each serverless deployment sees at this gateway, for the demand reports.

Only deployments with activation settings in the route table (the serverless ones) are metered: the
proxy looks a request's meter up once (``LoadMeter.keys.get(key)``) and does nothing more for the
others. Per deployment it keeps requests in flight (held ones included) as a step function of time
and its integral, so that the mean over a report's interval is exact whatever the traffic pattern;
per backend URL the same for the requests that backend serves. Every update is O(1), on the event
loop (no locks); times come from a monotonic clock (``time.perf_counter``, which the proxy already
reads for its latency metrics, so that the hot path reads the clock no more than before).

Intervals: :meth:`LoadMeter.report` with ``reset=True`` (the reporter's tick) covers the time since
the previous tick and starts a new interval; with ``reset=False`` (a report sent at once, when a
deployment starts holding requests) it covers the previous interval and the current one so far,
and starts nothing: successive reports can overlap, each one is the gateway's latest view.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

from modelfleet.reconciler.gateway.routes import RouteTable
from modelfleet.state.demand import DeploymentLoad

# A deployment is reported while it has requests in flight or held, and for this long after its last request.
ACTIVE_WINDOW = 60.0
# Rates and means over a window that starts when the meter did (the gateway's start) are taken
# over at least this long: a report right after the start would otherwise turn one request into a
# huge rate (the gateway served nothing before it started, so the longer window is true).
MIN_WINDOW = 1.0
MAX_WINDOW = 3600.0  # DemandReport.interval's bound


class Level:
    """A count that changes over time (requests in flight) and its integral over time.

    ``area``: the integral since the current interval started; ``previous``: over the previous interval.
    """

    __slots__ = ("area", "previous", "since", "value")

    def __init__(self, now: float) -> None:
        self.value = 0
        self.area = 0.0
        self.previous = 0.0
        self.since = now

    def add(self, delta: int, now: float) -> None:
        if self.value:
            self.area += self.value * (now - self.since)
        self.since = now
        self.value += delta

    def integral(self, now: float) -> float:
        """Over the current interval, up to ``now``."""
        return self.area + self.value * max(0.0, now - self.since)

    def reset(self, now: float) -> None:
        self.previous = self.integral(now)
        self.area = 0.0
        self.since = now

    @property
    def idle(self) -> bool:
        """Nothing in flight now nor over the previous interval (a backend whose level can be forgotten)."""
        return not self.value and not self.previous and not self.area


class KeyLoad:
    """One deployment's load: requests in flight (held ones included), arrivals, per backend URL."""

    __slots__ = ("backends", "last_arrival", "level", "previous_requests", "requests")

    def __init__(self, now: float) -> None:
        self.level = Level(now)
        self.requests = 0  # arrivals in the current interval
        self.previous_requests = 0  # in the previous interval
        self.last_arrival: float | None = None
        self.backends: dict[str, Level] = {}

    # The proxy's calls, with the perf_counter() reading it already has.
    def arrive(self, now: float) -> None:
        self.level.add(1, now)
        self.requests += 1
        self.last_arrival = now

    def leave(self, now: float) -> None:
        self.level.add(-1, now)

    def acquire(self, url: str, now: float) -> None:
        level = self.backends.get(url)
        if level is None:
            level = self.backends[url] = Level(now)
        level.add(1, now)

    def release(self, url: str, now: float) -> None:
        level = self.backends.get(url)
        if level is not None:
            level.add(-1, now)

    @property
    def in_flight(self) -> int:
        return self.level.value


class LoadMeter:
    """The load of every metered deployment, keyed by route key (see the module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        # route key -> load; mutated in place (the proxy keeps a reference to the dict)
        self.keys: dict[str, KeyLoad] = {}
        self._created = clock()
        self._started = self._created  # the current interval's start
        self._previous_started = self._created  # the previous interval's start

    def sync(self, keys: Iterable[str], now: float | None = None) -> None:
        """Meter exactly ``keys`` (the route table's serverless deployments); the others are forgotten.

        A request still in flight for a forgotten key updates its own, detached, KeyLoad: harmless.
        """
        now = self.clock() if now is None else now
        wanted = set(keys)
        for key in [k for k in self.keys if k not in wanted]:
            del self.keys[key]
        for key in wanted:
            if key not in self.keys:
                self.keys[key] = KeyLoad(now)

    def report(self, table: RouteTable, queued: Mapping[str, int], *, reset: bool,
               now: float | None = None) -> tuple[float, dict[str, DeploymentLoad]]:
        """(interval, route key -> load) for the deployments active in the last ACTIVE_WINDOW.

        ``table``: the route table served (whose backends are listed per replica, at 0 when idle);
        ``queued``: requests held per route key now.
        """
        now = self.clock() if now is None else now
        start = self._started if reset else self._previous_started
        interval = max(now - start, MIN_WINDOW if start == self._created else 1e-6)
        deployments: dict[str, DeploymentLoad] = {}
        for key, load in self.keys.items():
            held = queued.get(key, 0)
            last = load.last_arrival
            idle = None if last is None else max(0.0, now - last)
            if not load.in_flight and not held and (idle is None or idle > ACTIVE_WINDOW):
                continue
            area = load.level.integral(now) + (0.0 if reset else load.level.previous)
            requests = load.requests + (0 if reset else load.previous_requests)
            per_replica = {url: 0.0 for url in (b.url for b in table.routes.get(key, ()))}
            for url, level in load.backends.items():
                mean = (level.integral(now) + (0.0 if reset else level.previous)) / interval
                if mean or url in per_replica:
                    per_replica[url] = _figure(mean)
            deployments[key] = DeploymentLoad(
                concurrency=_figure(area / interval), in_flight=load.in_flight, queued=held, requests=requests,
                rps=_figure(requests / interval), idle_seconds=None if idle is None else _figure(idle),
                per_replica=per_replica)
        if reset:
            self._previous_started, self._started = self._started, now
            for load in self.keys.values():
                load.level.reset(now)
                load.previous_requests, load.requests = load.requests, 0
                for url, level in list(load.backends.items()):
                    level.reset(now)
                    if level.idle:
                        del load.backends[url]
        return min(MAX_WINDOW, round(interval, 3)), deployments


def _figure(value: float) -> float:
    """Rounded for the wire, never negative (float error on a mean of zero)."""
    return max(0.0, round(value, 4))
