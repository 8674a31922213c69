"""The daemon's journal of executions: the latest records the gateways sent, in memory.

Sequence numbers are the daemon's: a reader asks for what came after the last one it saw
(``modelfleet logs --follow``). At most ``KEEP`` records are kept over all deployments; the
gateways' log lines are the durable record.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque

from modelfleet.state.executions import Execution, ExecutionBatch, select

KEEP = 50000


class ExecutionJournal:
    def __init__(self, keep: int = KEEP) -> None:
        self._entries: deque[tuple[int, Execution]] = deque(maxlen=keep)
        self._sequence = itertools.count(1)
        self._lock = threading.Lock()
        self.dropped: dict[str, int] = {}  # gateway -> records it reported dropped

    def add(self, batch: ExecutionBatch) -> int:
        """Append a gateway's batch; returns the last sequence number."""
        with self._lock:
            if batch.dropped:
                self.dropped[batch.gateway] = self.dropped.get(batch.gateway, 0) + batch.dropped
            seq = 0
            for execution in batch.executions:
                seq = next(self._sequence)
                self._entries.append((seq, execution))
            return seq

    def last(self) -> int:
        with self._lock:
            return self._entries[-1][0] if self._entries else 0

    def read(self, model: str, environment: str | None, since: int = 0,
             limit: int = 100) -> list[tuple[int, Execution]]:
        with self._lock:
            entries = list(self._entries)
        return select(entries, model, environment, since, limit)
