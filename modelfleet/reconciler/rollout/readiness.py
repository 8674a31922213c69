"""Readiness probes: readiness means the replica answers its probe path with 2xx, not merely
'the process started'. The plan says what to probe and state/readiness.py what the answers mean;
this module only asks, and between passes asks again (the readiness monitor)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import httpx

from modelfleet.reconciler.daemon.store import FACT_PROBE_FAILURES, Store
from modelfleet.state.inventory import InventoryChanges
from modelfleet.state.readiness import ReadinessCheck, ReadinessVerdict, failures_after, judge, refreshed

log = logging.getLogger("modelfleet.readiness")
# The monitor probes a replica at most this often, whatever its readinessProbe.period (Kubernetes'
# minimum period is 1 s): probes must not become the replicas' load.
MIN_PERIOD = 0.5
MAX_TICK = 5.0


class ReadinessProber:
    def __init__(self) -> None:
        self._client = httpx.Client(follow_redirects=False, trust_env=False)

    def probe(self, url: str, timeout: float) -> bool:
        try:
            response = self._client.get(url, timeout=timeout)
            return 200 <= response.status_code < 300
        except httpx.HTTPError:
            return False

    def probe_all(self, checks: Sequence[ReadinessCheck],
                  timeout: float | None = None) -> dict[tuple[str, str], bool]:
        """Each check's answer, keyed by (host, container name): the plan's ``probe_results``.
        ``timeout``: for every probe; None: each check's readinessProbe.timeout."""
        if not checks:
            return {}

        def one(check: ReadinessCheck) -> tuple[tuple[str, str], bool]:
            return (check.host, check.name), self.probe(check.probe_url, timeout or check.timeout)

        with ThreadPoolExecutor(max_workers=min(16, len(checks))) as pool:
            return dict(pool.map(one, checks))

    def close(self) -> None:
        self._client.close()


class Prober(Protocol):
    def probe_all(self, checks: Sequence[ReadinessCheck]) -> dict[tuple[str, str], bool]: ...


class ReadinessMonitor:
    """Between passes: the replicas the last plan checked (those that run on reachable hosts),
    each probed again every readinessProbe.period; the answers are judged by state/readiness.py
    (a ready replica leaves the routes after failureThreshold failures in a row, one that answers
    comes back), the changes and the failure counts written to the store. No decision here.

    ``lock``: the pass holds it while it reads and writes the same facts (plan → write), so the
    monitor and the pass never count the same failures twice or lose one."""

    def __init__(self, store: Store, checks: Callable[[], Sequence[ReadinessCheck]],
                 on_change: Callable[[ReadinessVerdict], None], prober: Callable[[], Prober],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.checks = checks
        self.on_change = on_change
        self.prober = prober
        self.clock = clock
        self.lock = threading.Lock()
        self._due: dict[str, float] = {}  # failure_key -> when it is probed next (clock)

    def step(self, only: Sequence[ReadinessCheck] | None = None) -> ReadinessVerdict | None:
        """Probe once: ``only`` these checks (the pass's second chance after apply; waits for the
        lock, and leaves routes and statuses to the pass), else those of the last plan that are
        due (skipped while a pass holds the lock). None when nothing was probed."""
        if only is not None:
            if not only:
                return None
            self.lock.acquire()
        elif not self.lock.acquire(blocking=False):
            return None
        try:
            rows = self.store.inventory()
            failures: dict[str, int] = dict(self.store.fact(FACT_PROBE_FAILURES, {}))
            checks = refreshed(only if only is not None else self.checks(), rows, failures)
            if only is None:
                now = self.clock()
                self._due = {c.key: self._due.get(c.key, now) for c in checks}  # forget the gone ones
                checks = [c for c in checks if self._due[c.key] <= now]
                for c in checks:
                    self._due[c.key] = now + max(MIN_PERIOD, c.period)
            if not checks:
                return None
            verdict = judge(checks, self.prober().probe_all(checks))
            self.store.write_changes(InventoryChanges(unready=verdict.unready, ready=verdict.ready))
            self.store.set_fact(FACT_PROBE_FAILURES, failures_after(failures, checks, verdict, rows))
        finally:
            self.lock.release()
        if only is None and verdict.changed:
            self.on_change(verdict)
        return verdict

    def tick(self) -> float:
        """How long to sleep until the next check is due."""
        if not self._due:
            return 1.0
        return min(MAX_TICK, max(0.05, min(self._due.values()) - self.clock()))

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.step()
            except Exception:  # never let the monitor die: the next pass probes anyway
                if stop.is_set():
                    return  # shutting down: the store may be closed under us
                log.exception("readiness monitor step failed")
                stop.wait(1.0)
            stop.wait(self.tick())

    def start(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(stop,), name="modelfleet-readiness", daemon=True)
        thread.start()
        return thread
