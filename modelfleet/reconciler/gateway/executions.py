"""Every execution observable: one record per inference request, logged, counted and sent to the daemon.

The proxy calls :meth:`ExecutionRecorder.record` once per request; that only appends a tuple, so
the hot path pays a few hundred nanoseconds. Every ``FLUSH_INTERVAL`` the recorder hands what
accumulated to a thread of its own (the event loop never formats nor writes a line), which turns it
into:

- one log line per request on the logger ``modelfleet.executions`` (with ``logging.format: json``,
  the fields of :class:`modelfleet.state.executions.Execution` are keys of the JSON object);
- the per-version and per-location metrics (``GatewayMetrics.execution``);
- a batch for the daemon (``POST /api/v1/executions``), when the gateway has a control plane.
  While the daemon does not answer, batches are tried less often (up to every ``MAX_SHIP_DELAY``)
  and at most ``MAX_PENDING`` records wait; older ones are dropped
  and counted (the next batch says how many).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from modelfleet.reconciler.gateway.metrics import GatewayMetrics
from modelfleet.reconciler.gateway.routes import Backend
from modelfleet.reconciler.logs import EXECUTIONS_LOGGER, ExecutionHandler
from modelfleet.reconciler.secrets import redact_url
from modelfleet.state.executions import MAX_BATCH, describe

log = logging.getLogger("modelfleet.gateway")
execution_log = logging.getLogger(EXECUTIONS_LOGGER)

EXECUTIONS_PATH = "/api/v1/executions"
FLUSH_INTERVAL = 0.5
# Records formatted between two offers of the GIL to the event loop (~1 ms of this thread's work):
# a thread that keeps the GIL makes the loop wait for Python's switch interval (5 ms) each time,
# which is what the gateway's p99 latency was made of while a batch of thousands was written.
SLICE = 128
# Records logged and counted between two offers of the GIL (~0.1 ms of this thread's work): each
# slice is as long as the event loop may wait for the GIL during a flush, which with thousands of
# records every half second was what made the gateway's p99 at light load.
FLUSH_SLICE = 16
MAX_SHIP_DELAY = 10.0  # after failed batches, the next try waits up to this long (records are kept)
MAX_PENDING = 20000  # records kept for the daemon while it does not answer
WARN_EVERY = 60.0

# The order of a record tuple (what `record` appends).
_FIELDS = ("time", "request_id", "model", "environment", "status", "duration_ms", "request_bytes",
           "response_bytes", "spec_hash", "revision", "host", "location", "replica", "container", "cold_start",
           "overflow", "retry")


def encode_batch(body: dict[str, Any], executions: list[dict[str, Any]]) -> str:
    """``json.dumps({**body, "executions": executions})``, encoded SLICE records at a time with the GIL
    offered to the event loop in between (json's C encoder keeps it for the whole call)."""
    parts = []
    for start in range(0, len(executions), SLICE):
        if start:
            time.sleep(0)
        parts.append(json.dumps(executions[start:start + SLICE])[1:-1])
    head = json.dumps(body)[:-1] + ", " if body else "{"
    return head + '"executions": [' + ", ".join(p for p in parts if p) + "]}"


class RequestIds:
    """Request ids the gateway makes: a random prefix per process and a counter (unique, cheap)."""

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._counter = itertools.count(1)

    def new(self) -> str:
        return f"{self._prefix}-{next(self._counter):x}"


class ExecutionRecorder:
    def __init__(self, metrics: GatewayMetrics, *, gateway_id: str = "", location: str | None = None,
                 control_plane: str | None = None, token: str | None = None,
                 flush_interval: float = FLUSH_INTERVAL, max_pending: int = MAX_PENDING) -> None:
        self.metrics = metrics
        self.gateway_id = gateway_id
        self.location = location
        self.url = control_plane.rstrip("/") + EXECUTIONS_PATH if control_plane else None
        self.flush_interval = flush_interval
        self.ids = RequestIds()
        self._headers = {"content-type": "application/json"}
        if token:
            self._headers["authorization"] = f"Bearer {token}"
        self._new: list[tuple[Any, ...]] = []
        self._pending: deque[dict[str, Any]] = deque(maxlen=max_pending)
        self.dropped = 0  # records dropped since the last batch the daemon accepted
        self.shipped = 0
        self.failures = 0
        self._last_warning: float | None = None
        self._next_ship = 0.0  # loop time before which no batch is tried (after failures)
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        self._executor: ThreadPoolExecutor | None = None

    # -- the hot path ----------------------------------------------------------------------------

    def record(self, request_id: str, model: str, environment: str, status: int, seconds: float,
               request_bytes: int, response_bytes: int, backend: Backend | None, cold_start: bool,
               overflow: bool, retry: bool) -> None:
        now = time.time()
        if backend is None:
            where: tuple[Any, ...] = ("", "", "", "", None, "")
        else:
            where = (backend.spec_hash, backend.revision, backend.host, backend.location, backend.replica,
                     backend.container)
        self._new.append((now - seconds, request_id, model, environment, status, round(seconds * 1000, 3),
                          request_bytes, response_bytes, *where, cold_start, overflow, retry))

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-executions")
            if self.url is not None:
                self._client = httpx.AsyncClient(trust_env=False, timeout=2.0, follow_redirects=False)
            self._task = asyncio.ensure_future(self._run())

    async def aclose(self) -> None:
        """Flush what was recorded (logged and, within a short wait, sent) and stop."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.metrics.sync()  # what the hot path counted last, before the process ends
        if self._executor is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self.flush)
            self._executor.shutdown(wait=True)
            self._executor = None
        else:
            self.flush()
        if self._client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ship(), 2.0)
            await self._client.aclose()
            self._client = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.flush_interval)
            try:
                self.metrics.sync()  # the hot path's request counts, to prometheus_client
                await loop.run_in_executor(self._executor, self.flush)
                if loop.time() >= self._next_ship and not await self.ship():
                    # The daemon is away: try again later, not every flush (each try encodes a batch).
                    delay = min(self.flush_interval * 2 ** min(self.failures, 10), MAX_SHIP_DELAY)
                    self._next_ship = loop.time() + delay
            except Exception:  # never fatal: serving goes on
                log.exception("execution records could not be flushed")

    # -- off the hot path ------------------------------------------------------------------------

    def flush(self) -> list[dict[str, Any]]:
        """Log and count what was recorded since the last flush; returns the records (the recorder's
        thread, or the caller's when it was not started)."""
        new, self._new = self._new, []
        if not new:
            return []
        gateway, location = self.gateway_id, self.location or ""
        records = []
        logging_on = execution_log.isEnabledFor(logging.INFO)
        # One write for the whole batch where the handler is ours (setup_logging), else a record each.
        handlers = execution_log.handlers
        batch_handler = handlers[0] if len(handlers) == 1 and isinstance(handlers[0], ExecutionHandler) else None
        lines: list[tuple[str, dict[str, Any]]] = []
        execution = self.metrics.execution
        extra = {"gateway": gateway, "gateway_location": location}
        for index, row in enumerate(new):
            if index and not index % FLUSH_SLICE:
                if lines:
                    batch_handler.emit_batch(lines)  # type: ignore[union-attr]  # lines only with it
                    lines = []
                time.sleep(0)  # the GIL to the event loop, if it waits for it (see FLUSH_SLICE)
            record = dict(zip(_FIELDS, row, strict=True))
            record.update(extra)
            records.append(record)
            # model, environment, spec_hash, location, status, duration, cold_start (see _FIELDS)
            execution(row[2], row[3], row[8], row[11], row[4], row[5] / 1000, row[14])
            if not logging_on:
                continue
            if batch_handler is not None:
                lines.append((describe(record), record))
            else:
                execution_log.info(describe(record), extra={"mf_fields": record})
        self.metrics.apply_executions()
        if batch_handler is not None and lines:
            batch_handler.emit_batch(lines)
        if self.url is not None:
            if len(self._pending) + len(records) > (self._pending.maxlen or 0):
                self.dropped += len(self._pending) + len(records) - (self._pending.maxlen or 0)
            self._pending.extend(records)
        return records

    async def ship(self) -> bool:
        """Send the pending records to the daemon, in batches; False when it did not take them all."""
        client = self._client
        if client is None or self.url is None:
            return True
        loop = asyncio.get_running_loop()
        while self._pending:
            batch = list(itertools.islice(self._pending, MAX_BATCH))
            body = {"gateway": self.gateway_id or "gateway", "location": self.location, "dropped": self.dropped}
            payload = await loop.run_in_executor(self._executor, encode_batch, body, batch)
            try:
                response = await client.post(self.url, content=payload, headers=self._headers)
            except httpx.HTTPError as exc:
                self._failure(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
                return False
            if not response.is_success:
                self._failure(f"HTTP {response.status_code}: {response.text[:200].strip()}")
                return False
            for _ in range(len(batch)):
                self._pending.popleft()
            self.shipped += len(batch)
            self.dropped = 0
            if self.failures:
                log.info("execution records reach %s again (after %d failed batches)", redact_url(self.url),
                         self.failures)
            self.failures = 0
            self._last_warning = None
        return True

    def _failure(self, reason: str) -> None:
        self.failures += 1
        now = time.monotonic()
        if self._last_warning is None or now - self._last_warning >= WARN_EVERY:
            self._last_warning = now
            log.warning("execution records to %s failed: %s (%d pending, kept up to %d; serving is not affected)",
                        redact_url(self.url or ""), redact_url(reason), len(self._pending), self._pending.maxlen)
