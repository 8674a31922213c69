"""The tokens every deployment used, summed over every gateway: what token limits are checked against.

Each gateway's demand report carries its cumulative token counts per deployment; the book counts
the difference with that gateway's previous report (a counter that went down: the gateway
restarted, it counts from zero) into the current window of each granularity, on the daemon's
clock, and answers the report with each limited deployment's usage (``DemandReply.tokens``). A
gateway adds what it counted since to decide on its own between two reports.

The counts are kept in the store (a fact, written at most every ``SAVE_EVERY`` seconds) so that a
daemon restart neither forgives what was used nor counts a gateway's whole history twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from modelfleet.reconciler.errors import ModelfleetError
from modelfleet.state.demand import TokensCounted, WindowUsage
from modelfleet.state.token_limits import GRANULARITIES, TokenCounts, Usage, add_usage, current, window_start

log = logging.getLogger("modelfleet.daemon")

FACT = "token_usage"
SAVE_EVERY = 2.0


class TokenBook:
    def __init__(self, load: Callable[[], Any] | None = None, save: Callable[[Any], None] | None = None,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.monotonic = monotonic
        self._save = save
        self._lock = threading.Lock()
        self._usage: dict[str, dict[str, tuple[float, TokenCounts]]] = {}
        self._counters: dict[str, dict[str, TokenCounts]] = {}  # gateway -> route key -> its last cumulative
        self._dirty = False
        self._saved_at = 0.0
        if load is not None:
            self._restore(load())

    def record(self, gateway: str, tokens: Mapping[str, TokensCounted]) -> None:
        """Count a gateway's report (its cumulative counts per route key)."""
        if not tokens:
            return
        now = self.clock()
        with self._lock:
            last = self._counters.setdefault(gateway, {})
            for key, counted in tokens.items():
                before = last.get(key, TokenCounts())
                delta = TokenCounts(counted.input - before.input, counted.output - before.output)
                if delta.input < 0 or delta.output < 0:  # the gateway restarted: its counters began again
                    delta = TokenCounts(counted.input, counted.output)
                last[key] = TokenCounts(counted.input, counted.output)
                if delta.total:
                    self._usage[key] = add_usage(self._usage.get(key, {}), delta, now)
                    self._dirty = True
        self._maybe_save()

    def usage(self, key: str) -> Usage:
        with self._lock:
            return dict(self._usage.get(key, {}))

    def reply(self, keys: Iterable[str]) -> dict[str, dict[str, WindowUsage]]:
        """The current windows of ``keys`` (the deployments with token limits), as a report's reply."""
        now = self.clock()
        result: dict[str, dict[str, WindowUsage]] = {}
        with self._lock:
            for key in keys:
                usage = self._usage.get(key, {})
                windows = {}
                for granularity in GRANULARITIES:
                    counts = current(usage, granularity, now)
                    windows[granularity] = WindowUsage(window=window_start(granularity, now), input=counts.input,
                                                       output=counts.output)
                result[key] = windows
        return result

    def flush(self) -> None:
        self._maybe_save(force=True)

    def _maybe_save(self, force: bool = False) -> None:
        if self._save is None:
            return
        now = self.monotonic()
        with self._lock:
            if not self._dirty or (not force and now - self._saved_at < SAVE_EVERY):
                return
            snapshot = {
                "usage": {key: {g: [start, c.input, c.output] for g, (start, c) in usage.items()}
                          for key, usage in self._usage.items()},
                "counters": {gw: {key: [c.input, c.output] for key, c in counters.items()}
                             for gw, counters in self._counters.items()},
            }
            self._dirty = False
            self._saved_at = now
        try:
            self._save(snapshot)
        except ModelfleetError as exc:  # a full disk: counting goes on in memory, saved at the next chance
            with self._lock:
                self._dirty = True
            log.warning("cannot save the token counts (they are kept in memory): %s", exc)

    def _restore(self, data: Any) -> None:
        if not isinstance(data, dict):
            return
        try:
            for key, usage in (data.get("usage") or {}).items():
                self._usage[str(key)] = {str(g): (float(v[0]), TokenCounts(int(v[1]), int(v[2])))
                                         for g, v in usage.items() if g in GRANULARITIES}
            for gateway, counters in (data.get("counters") or {}).items():
                self._counters[str(gateway)] = {str(k): TokenCounts(int(v[0]), int(v[1])) for k, v in counters.items()}
        except (TypeError, ValueError, IndexError, AttributeError) as exc:
            log.warning("ignoring unreadable saved token counts: %s", exc)
            self._usage, self._counters = {}, {}
