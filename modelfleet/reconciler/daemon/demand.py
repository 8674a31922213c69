"""The load reports of every gateway, summed per deployment: what the autoscaler reads.

Gateways POST a ``DemandReport`` every ~2 s (``/api/v1/demand``). The book keeps each gateway's
reports of the last ``KEEP`` seconds, stamped with the daemon's monotonic clock on arrival, and
turns them into one ``LoadSample`` per deployment and report tick, summed over the gateways that
are still reporting. It lives in memory: after a restart the gateways' next reports refill it
within seconds, and ``watching_since`` tells the autoscaler how long it has been watching (it never
scales down on what it has not seen).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from modelfleet.state.demand import (
    REPORT_INTERVAL,
    REPORT_STALE_AFTER,
    DemandReport,
    LoadSample,
    OverflowLoad,
    TrafficRate,
    traffic_rates,
)

KEEP = 120.0  # seconds of reports kept: more than any stable window needs


@dataclass(frozen=True)
class _Received:
    at: float
    report: DemandReport


class DemandBook:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.watching_since = clock()
        self._lock = threading.Lock()
        self._reports: dict[str, deque[_Received]] = {}
        self._table_versions: dict[str, int] = {}

    def record(self, report: DemandReport) -> set[str]:
        """Keep a report; returns the route keys that have requests held for activation in it."""
        now = self.clock()
        with self._lock:
            queue = self._reports.setdefault(report.gateway, deque())
            queue.append(_Received(now, report))
            while queue and now - queue[0].at > KEEP:
                queue.popleft()
            self._table_versions[report.gateway] = report.table_version
        return {key for key, load in report.deployments.items() if load.queued}

    def acknowledged(self) -> dict[str, int]:
        """The live gateways (heard from within REPORT_STALE_AFTER) -> the route table version each serves."""
        now = self.clock()
        with self._lock:
            return {gateway: queue[-1].report.table_version for gateway, queue in self._reports.items()
                    if queue and now - queue[-1].at <= REPORT_STALE_AFTER}

    def gateways(self) -> dict[str, dict[str, object]]:
        """The gateways heard from recently: when last, the table version they serve, where they are."""
        now = self.clock()
        with self._lock:
            result: dict[str, dict[str, object]] = {}
            for gateway, queue in self._reports.items():
                if queue and now - queue[-1].at <= REPORT_STALE_AFTER:
                    last = queue[-1].report
                    result[gateway] = {"lastReportSecondsAgo": round(now - queue[-1].at, 3),
                                       "tableVersion": last.table_version, "location": last.location}
            return result

    def samples(self) -> dict[str, list[LoadSample]]:
        """Per route key, the load summed over gateways, one sample per report tick, oldest first.

        Reports of different gateways are summed by tick (the arrival time rounded down to the
        report interval); within a tick a gateway's latest report counts. A gateway silent for
        longer than REPORT_STALE_AFTER no longer counts: its load is not known, not zero.
        """
        now = self.clock()
        with self._lock:
            snapshot = {g: list(q) for g, q in self._reports.items() if q and now - q[-1].at <= REPORT_STALE_AFTER}
        ticks: dict[str, dict[int, dict[str, _Received]]] = {}
        for gateway, received in snapshot.items():
            for item in received:
                tick = int(item.at // REPORT_INTERVAL)
                for key in item.report.deployments:
                    ticks.setdefault(key, {}).setdefault(tick, {})[gateway] = item
        result: dict[str, list[LoadSample]] = {}
        for key, by_tick in ticks.items():
            samples = []
            for tick in sorted(by_tick):
                items = by_tick[tick]
                loads = [(item.at, item.report.deployments[key]) for item in items.values()]
                idle = [load.idle_seconds for _, load in loads if load.idle_seconds is not None]
                overflows = [load.overflow for _, load in loads if load.overflow is not None]
                samples.append(LoadSample(
                    at=max(at for at, _ in loads),
                    concurrency=sum(load.concurrency for _, load in loads),
                    rps=sum(load.rps for _, load in loads),
                    queued=sum(load.queued for _, load in loads),
                    in_flight=sum(load.in_flight for _, load in loads),
                    idle_seconds=min(idle) if idle else None,
                    overflow=OverflowLoad(endpoint_healthy=all(o.endpoint_healthy for o in overflows),
                                          to_endpoint=sum(o.to_endpoint for o in overflows),
                                          to_pool=sum(o.to_pool for o in overflows)) if overflows else None,
                ))
            result[key] = samples
        return result

    def traffic(self) -> dict[str, TrafficRate]:
        """Per route key, requests and 5xx answers per second at the gateways still reporting
        (state/demand.traffic_rates over their recent reports' cumulative counters)."""
        now = self.clock()
        with self._lock:
            reports = {g: [(item.at, item.report.traffic) for item in q] for g, q in self._reports.items()
                       if q and now - q[-1].at <= REPORT_STALE_AFTER}
        return traffic_rates(reports)

    def in_flight(self) -> Mapping[str, float]:
        """Backend URL -> requests in flight at the gateways per their latest reports (for draining)."""
        now = self.clock()
        totals: dict[str, float] = {}
        with self._lock:
            for queue in self._reports.values():
                if not queue or now - queue[-1].at > REPORT_STALE_AFTER:
                    continue
                for load in queue[-1].report.deployments.values():
                    for url, value in load.per_replica.items():
                        totals[url] = totals.get(url, 0.0) + value
        return totals
