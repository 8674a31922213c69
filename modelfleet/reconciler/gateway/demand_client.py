"""The demand reporter: the gateway's load, sent to the control plane (``POST /api/v1/demand``).

Every ``REPORT_INTERVAL`` (2 s) a :class:`~modelfleet.state.demand.DemandReport` goes to the daemon's
API (``gateway.controlPlane``, with ``Authorization: Bearer`` and the token in
``gateway.controlPlaneTokenFile`` when one is set): the load of the serverless deployments active in
the last minute (``load.LoadMeter``), or none (a heartbeat). A report also goes at once, without
waiting for the tick, when a deployment starts holding requests: that is what starts its replica.

A failed report (daemon down or restarting, refused token) is logged at warning, at most once a
minute, and the next tick simply sends fresh figures; serving never depends on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time

import httpx

from modelfleet.reconciler.gateway.activator import Activator
from modelfleet.reconciler.gateway.follower import TableFeed
from modelfleet.reconciler.gateway.load import LoadMeter
from modelfleet.reconciler.gateway.metrics import GatewayMetrics
from modelfleet.reconciler.gateway.overflow import OverflowRouter
from modelfleet.reconciler.gateway.tokens import TokenLedger
from modelfleet.reconciler.secrets import redact_url
from modelfleet.state.demand import REPORT_INTERVAL, DemandReply, DemandReport, DeploymentTraffic
from modelfleet.state.routes import route_key

log = logging.getLogger("modelfleet.gateway")

DEMAND_PATH = "/api/v1/demand"
REPORT_TIMEOUT = 1.0
WARN_EVERY = 60.0  # seconds between two warnings about failing reports
# Tokens counted for a deployment with token limits are reported this soon (seconds), batched: so
# that every gateway (and gateway worker) learns of the others' use within a fraction of a second.
TOKEN_SYNC_DELAY = 0.25


def default_gateway_id() -> str:
    """``<hostname>:<pid>``: unique among running gateways, not stable across restarts."""
    suffix = f":{os.getpid()}"
    return (socket.gethostname() or "gateway")[: 200 - len(suffix)] + suffix


def demand_url(control_plane: str) -> str:
    return control_plane.rstrip("/") + DEMAND_PATH


class DemandReporter:
    """Sends the gateway's demand reports; :meth:`start` and :meth:`aclose` run on the event loop."""

    def __init__(self, control_plane: str, *, load: LoadMeter, routes: TableFeed, activator: Activator,
                 metrics: GatewayMetrics, token: str | None = None, gateway_id: str | None = None,
                 location: str | None = None, interval: float = REPORT_INTERVAL,
                 timeout: float = REPORT_TIMEOUT, overflow: OverflowRouter | None = None,
                 tokens: TokenLedger | None = None) -> None:
        self.url = demand_url(control_plane)
        self.overflow = overflow  # deployments with an on-prem endpoint: where their requests went
        self.tokens = tokens  # the tokens counted here; the daemon answers with every gateway's sums
        if tokens is not None:
            tokens.on_limited_count = self.sync_tokens
        self._token_sync: asyncio.TimerHandle | None = None
        self.load = load
        self.routes = routes
        self.activator = activator
        self.metrics = metrics
        self.gateway_id = gateway_id or default_gateway_id()
        self.location = location
        self.interval = interval
        self.timeout = timeout
        self._headers = {"content-type": "application/json"}
        if token:
            self._headers["authorization"] = f"Bearer {token}"
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._kicked: asyncio.Event | None = None
        self.sent = 0  # reports the control plane accepted
        self.failures = 0  # consecutive failed reports
        self._last_warning: float | None = None
        self._ok = self.metrics.demand_reports.labels("ok")
        self._failed = self.metrics.demand_reports.labels("failed")

    def start(self) -> None:
        if self._task is not None:
            return
        self._client = httpx.AsyncClient(trust_env=False, timeout=self.timeout, follow_redirects=False)
        self._kicked = asyncio.Event()
        self._task = asyncio.ensure_future(self._run())

    def kick(self, key: str | None = None) -> None:
        """Send a report now (a deployment started holding requests); cheap, callable from the hot path."""
        if self._kicked is not None:
            self._kicked.set()

    def sync_tokens(self) -> None:
        """Report the tokens just counted within TOKEN_SYNC_DELAY (one report for all counted meanwhile)."""
        if self._kicked is None or self._token_sync is not None:
            return
        self._token_sync = asyncio.get_running_loop().call_later(TOKEN_SYNC_DELAY, self._sync_now)

    def _sync_now(self) -> None:
        self._token_sync = None
        self.kick()

    async def aclose(self) -> None:
        if self._token_sync is not None:
            self._token_sync.cancel()
            self._token_sync = None
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def build(self, *, reset: bool) -> DemandReport:
        """The report of now; ``reset``: it ends the current interval (the tick), else a peek (the kick)."""
        table = self.routes.table
        interval, deployments = self.load.report(table, self.activator.counts(), reset=reset)
        if self.overflow is not None and self.overflow.states:
            deployments = self.overflow.add_to(deployments, asyncio.get_running_loop().time(), self.load,
                                               reset=reset)
        traffic = {}
        for (model, environment), (requests, errors) in list(self.metrics.traffic.items()):
            key = route_key(model, environment)
            if key in table.routes:  # a deployment of the table served (the rest: gone, or never known)
                traffic[key] = DeploymentTraffic(requests=requests, errors=errors)
        tokens = self.tokens.report() if self.tokens is not None else {}
        return DemandReport(gateway=self.gateway_id, location=self.location, interval=interval,
                            table_version=table.version, deployments=deployments, traffic=traffic, tokens=tokens)

    async def send(self, *, reset: bool) -> bool:
        """Build and send one report; False when it did not reach the control plane (logged, never raised)."""
        client = self._client
        if client is None:
            return False
        try:
            payload = self.build(reset=reset).model_dump_json()
        except Exception:  # a bug in the figures must not stop the reports (nor serving)
            log.exception("cannot build the demand report")
            return False
        try:
            response = await client.post(self.url, content=payload, headers=self._headers)
        except httpx.HTTPError as exc:
            self._failure(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            return False
        if response.is_success:
            self._success()
            self._answered(response)
            return True
        self._failure(_refusal(response))
        return False

    def _answered(self, response: httpx.Response) -> None:
        if self.tokens is None:
            return
        try:
            reply = DemandReply.model_validate_json(response.content)
        except ValueError:  # an older daemon's reply, without token sums: keep counting here
            self.tokens.not_answered()
            return
        self.tokens.answered(reply.tokens)

    async def _run(self) -> None:
        assert self._kicked is not None
        kicked = self._kicked
        loop = asyncio.get_running_loop()
        next_tick = loop.time() + self.interval
        while True:
            tick = True
            try:
                async with asyncio.timeout_at(next_tick):
                    await kicked.wait()
                tick = False
            except TimeoutError:
                pass
            kicked.clear()
            if tick:
                # Fixed cadence; after a long stall, the next tick is a full interval away.
                next_tick = max(next_tick + self.interval, loop.time() + self.interval / 2)
            try:
                await self.send(reset=tick)
            except Exception:  # keep reporting whatever happens
                log.exception("demand report failed")

    def _success(self) -> None:
        self._ok.inc()
        self.sent += 1
        if self.failures:
            log.info("demand reports reach %s again (after %d failed)", redact_url(self.url), self.failures)
        self.failures = 0
        self._last_warning = None

    def _failure(self, reason: str) -> None:
        if self.tokens is not None:
            self.tokens.not_answered()
        self._failed.inc()
        self.failures += 1
        now = time.monotonic()
        if self._last_warning is None or now - self._last_warning >= WARN_EVERY:
            self._last_warning = now
            log.warning("demand report to %s failed: %s (%d in a row; retrying every %gs, serving is not affected; "
                        "until they get through, serverless deployments are not activated nor scaled)",
                        redact_url(self.url), redact_url(reason), self.failures, self.interval)


def _refusal(response: httpx.Response) -> str:
    status = response.status_code
    if status in (401, 403):
        return (f"HTTP {status}: the control plane refused the token; set gateway.controlPlaneTokenFile to a file "
                "holding the daemon's API token (its api.tokenFile)")
    if status == 404:
        return (f"HTTP 404: the control plane has no {DEMAND_PATH}; is gateway.controlPlane the daemon's API "
                "(api.listen), and the daemon as recent as the gateway?")
    detail = response.text[:200].strip().replace("\n", " ")
    return f"HTTP {status}" + (f": {detail}" if detail else "")
