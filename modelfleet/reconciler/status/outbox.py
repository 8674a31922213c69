"""The status outbox: forge commit statuses written in the background, never during a pass.

A pass only *enqueues* what it wants each context of a commit to say (``publish`` returns at once);
one thread writes the queue to the forge, in order. Entries are keyed by (commit, context): a new
state for a key still waiting supersedes the old one in place (the latest state wins, the forge
never sees a stale one after a newer one), and a state equal to what is queued or was last written
is not queued again (forges are rate-limited).

When a write fails transiently (connection refused, timeouts, 5xx, 429 or GitHub's exhausted rate
limit) the head of the queue stays where it is and the whole queue waits -- one forge, one
backoff: exponential from ``base_delay`` to ``max_delay`` with ±20 % jitter, and never less than
the ``Retry-After`` the forge asked for. A status the forge refuses for good (401, 404, 422) is
dropped and forgotten, so the next pass that wants it queues it again. At most ``max_pending``
entries wait; beyond that the oldest is dropped (a later pass re-queues what is still current).

The queue lives in memory: a restart forgets it, and the first pass publishes every context again.
Error texts come from the writers, which keep tokens out of them.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from modelfleet.reconciler.secrets import redact_url
from modelfleet.reconciler.status import CommitStatus, StatusError, StatusWriter

log = logging.getLogger("modelfleet.status.outbox")

Key = tuple[str, str]  # (commit, context)
_Signature = tuple[str, str, str | None]
_WRITTEN_MEMORY = 4096  # (commit, context) pairs whose last written state is remembered


@dataclass(frozen=True)
class _Entry:
    revision: str
    status: CommitStatus


def _signature(status: CommitStatus) -> _Signature:
    return status.state, status.description, status.target_url


def _iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class StatusOutbox:
    """A StatusWriter that queues, around one that writes (``writer``, e.g. a forge writer)."""

    def __init__(self, writer: StatusWriter, *, max_pending: int = 1000, base_delay: float = 1.0,
                 max_delay: float = 120.0, max_retry_after: float = 900.0,
                 registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
                 jitter: Callable[[], float] = random.random) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self.writer = writer
        self.max_pending = max_pending
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.max_retry_after = max_retry_after
        self._clock, self._wall, self._jitter = clock, wall_clock, jitter
        self._pending: OrderedDict[Key, _Entry] = OrderedDict()
        self._written: OrderedDict[Key, _Signature] = OrderedDict()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._in_flight: _Entry | None = None
        self._closing = False
        self._close_deadline = 0.0
        self._failures = 0  # transient failures in a row
        self._retry_at: float | None = None  # monotonic: when the head is tried again
        self.last_error: str | None = None
        self.last_error_at: float | None = None  # wall clock, for display
        self.retrying_since: float | None = None  # wall clock: the first failure of the current streak
        self._writes = Counter("modelfleet_status_writes_total",
                               "Commit status writes by result (written, retried: a transient failure, "
                               "failed: refused by the forge, superseded by a newer state before "
                               "written, dropped: the queue was full)", ["result"], registry=registry) \
            if registry is not None else None
        if registry is not None:
            Gauge("modelfleet_status_pending", "Commit statuses waiting to be written",
                  registry=registry).set_function(lambda: len(self._pending))

    def __repr__(self) -> str:
        return f"StatusOutbox({self.writer!r}, pending={len(self._pending)})"

    # -- StatusWriter: what a pass calls --------------------------------------------------------

    def publish(self, revision: str, statuses: list[CommitStatus]) -> None:
        """Queue the statuses (never waits for the forge, never raises for the forge's faults)."""
        with self._cond:
            if self._closing:
                return
            for status in statuses:
                key, wanted = (revision, status.context), _signature(status)
                queued = self._pending.get(key)
                if queued is not None:
                    if _signature(queued.status) != wanted:
                        self._pending[key] = _Entry(revision, status)  # in place: keeps its turn
                        if queued is not self._in_flight:  # (that one is being written anyway)
                            self._count("superseded")
                    continue
                if self._written.get(key) == wanted:
                    continue
                self._pending[key] = _Entry(revision, status)
            while len(self._pending) > self.max_pending:
                (sha, context), _ = self._pending.popitem(last=False)
                self._count("dropped")
                log.warning("status queue full (%d waiting): dropped the oldest, %r on %s",
                            self.max_pending, context, sha[:12])
            if self._pending:
                self._ensure_thread()
                self._cond.notify_all()

    # -- what the API shows ----------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self._pending)

    def to_json(self) -> dict[str, Any]:
        """``/api/v1/status`` ``statusWriter``: queue length, the last error and since when the
        forge fails (null while it does not), and in how many seconds the next attempt is."""
        with self._cond:
            retry_in = max(0.0, self._retry_at - self._clock()) if self._retry_at is not None else None
            return {"pending": len(self._pending), "lastError": self.last_error,
                    "lastErrorAt": _iso(self.last_error_at), "retryingSince": _iso(self.retrying_since),
                    "nextAttemptIn": round(retry_in, 1) if retry_in is not None else None}

    # -- lifecycle -------------------------------------------------------------------------------

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the queue to empty (tests, ``run --once``). True if it did."""
        deadline = self._clock() + timeout
        with self._cond:
            while self._pending:
                left = deadline - self._clock()
                if left <= 0:
                    return False
                self._cond.wait(timeout=min(left, 0.05))
            return True

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued for up to ``timeout`` seconds (no backoff beyond it), then stop."""
        with self._cond:
            self._closing = True
            self._close_deadline = self._clock() + timeout
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=timeout + 1.0)
        if self._pending:
            log.warning("%d commit status(es) not written at shutdown (the next start publishes them again)",
                        len(self._pending))
        closer = getattr(self.writer, "close", None)
        if callable(closer):
            closer()

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="modelfleet-status-outbox", daemon=True)
            self._thread.start()

    # -- the writer thread -----------------------------------------------------------------------

    def _next(self) -> tuple[Key, _Entry] | None:
        """The head of the queue once it may be tried; None when the thread should end."""
        with self._cond:
            while True:
                now = self._clock()
                if self._closing and (not self._pending or now >= self._close_deadline):
                    return None
                if not self._pending:
                    self._cond.wait()
                    continue
                if self._retry_at is not None and now < self._retry_at:
                    if self._closing and self._retry_at >= self._close_deadline:
                        return None  # shutting down: no waiting past the deadline
                    self._cond.wait(timeout=self._retry_at - now)
                    continue
                key, entry = next(iter(self._pending.items()))
                self._in_flight = entry
                return key, entry

    def _run(self) -> None:
        while (item := self._next()) is not None:
            key, entry = item
            try:
                self.writer.publish(entry.revision, [entry.status])
            except StatusError as exc:
                self._failed(key, entry, str(exc), exc.transient, exc.retry_after)
            except Exception as exc:  # a writer bug must not end the thread (no traceback: it may hold a URL)
                self._failed(key, entry, f"{type(exc).__name__}: {redact_url(str(exc))}", True, None)
            else:
                self._written_ok(key, entry)

    def _written_ok(self, key: Key, entry: _Entry) -> None:
        with self._cond:
            if self._pending.get(key) is entry:
                del self._pending[key]
            self._written[key] = _signature(entry.status)
            self._written.move_to_end(key)
            while len(self._written) > _WRITTEN_MEMORY:
                self._written.popitem(last=False)
            if self.retrying_since is not None:
                log.info("commit statuses are written again (%d waiting)", len(self._pending))
            self._failures, self._retry_at, self.retrying_since = 0, None, None
            self._count("written")
            self._cond.notify_all()

    def _failed(self, key: Key, entry: _Entry, message: str, transient: bool, retry_after: float | None) -> None:
        with self._cond:
            self.last_error, self.last_error_at = message, self._wall()
            self._written.pop(key, None)
            if not transient:
                # Refused for good: drop it (the next pass that still wants it queues it again).
                if self._pending.get(key) is entry:
                    del self._pending[key]
                self._count("failed")
                log.warning("commit status not written (not retried): %s", message)
                self._cond.notify_all()
                return
            self._failures += 1
            delay = min(self.max_delay, self.base_delay * 2 ** (self._failures - 1)) * (0.8 + 0.4 * self._jitter())
            if retry_after is not None:
                delay = max(delay, min(retry_after, self.max_retry_after))
            self._retry_at = self._clock() + delay
            if self.retrying_since is None:
                self.retrying_since = self.last_error_at
                log.warning("commit statuses cannot be written (%d waiting), retrying in %.1fs: %s",
                            len(self._pending), delay, message)
            else:
                log.debug("status write failed again (%d in a row), retrying in %.1fs: %s",
                          self._failures, delay, message)
            self._count("retried")
            self._cond.notify_all()

    def _count(self, result: str) -> None:
        if self._writes is not None:
            self._writes.labels(result).inc()


def queued(writer: StatusWriter | None, *, registry: CollectorRegistry | None = None) -> StatusWriter | None:
    """``writer`` behind an outbox if it writes to a remote API (declares ``background = True``: the
    forge writers), with its own retries turned off (the outbox retries); other writers unchanged."""
    if writer is None or not getattr(writer, "background", False):
        return writer
    if hasattr(writer, "attempts"):
        setattr(writer, "attempts", 1)  # noqa: B010 (not part of the StatusWriter protocol)
    return StatusOutbox(writer, registry=registry)
