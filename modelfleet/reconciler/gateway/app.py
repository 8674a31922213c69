"""The gateway as an ASGI app: lifecycle, which path goes where, and who may call what (the bearer token).

``/models/...`` goes to the proxy; ``/healthz`` and ``/metrics`` are open; ``/routes`` (the table
being served, with each backend's outstanding requests and each serverless deployment's activation
settings and held requests) and ``/models/`` need the token when one is configured.

With a ``control_plane`` (the daemon's API URL), the gateway reports its demand there
(``demand_client``); the activator and the load meter are shared by the proxy and the reporter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.types import Receive, Scope, Send

from modelfleet.reconciler.gateway.activator import Activator
from modelfleet.reconciler.gateway.balancer import Balancer
from modelfleet.reconciler.gateway.demand_client import DemandReporter, default_gateway_id
from modelfleet.reconciler.gateway.executions import ExecutionRecorder
from modelfleet.reconciler.gateway.follower import RouteFeed, RouteFollower, TableFeed
from modelfleet.reconciler.gateway.load import LoadMeter
from modelfleet.reconciler.gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from modelfleet.reconciler.gateway.metrics import GatewayMetrics
from modelfleet.reconciler.gateway.overflow import OverflowRouter
from modelfleet.reconciler.gateway.pool import DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT, UpstreamPool
from modelfleet.reconciler.gateway.proxy import HOLD_BODY_LIMIT, RETRY_BUFFER_LIMIT, DirectRequest, Proxy
from modelfleet.reconciler.gateway.remote_routes import RemoteRouteFeed
from modelfleet.reconciler.gateway.responses import send_error, send_json
from modelfleet.reconciler.gateway.routes import RouteTable, route_key
from modelfleet.reconciler.gateway.tokens import TokenLedger
from modelfleet.reconciler.secrets import GatewaySecrets, bearer_token_matches, redact_url
from modelfleet.state.demand import REPORT_INTERVAL

log = logging.getLogger("modelfleet.gateway")

DEFAULT_POLL_INTERVAL = 0.1


class Gateway:
    """The gateway as an ASGI application (HTTP and lifespan scopes)."""

    def __init__(
        self,
        state_dir: str | Path,
        *,
        token: str | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        retry_buffer_limit: int = RETRY_BUFFER_LIMIT,
        metrics: GatewayMetrics | None = None,
        parser: str = "auto",
        hold_body_limit: int = HOLD_BODY_LIMIT,
        control_plane: str | None = None,
        control_plane_token: str | None = None,
        gateway_id: str | None = None,
        location: str | None = None,
        report_interval: float = REPORT_INTERVAL,
        follow: str = "stateDir",
        cache_dir: str | Path | None = None,
        continent: str | None = None,
    ) -> None:
        """``control_plane``: the daemon's API URL to send demand reports to (none sent without it).

        ``follow``: ``stateDir`` (routes.db in ``state_dir``, a gateway on the daemon's machine) or
        ``controlPlane`` (long-polled from ``control_plane``, cached in ``cache_dir``). ``location``
        (and its ``continent``, when the table does not say): the replicas this gateway prefers.
        """
        self.balancer = Balancer()
        self.metrics = metrics if metrics is not None else GatewayMetrics()
        self.load = LoadMeter()
        self.overflow = OverflowRouter(self.metrics.registry)  # deployments with an on-prem endpoint
        self.routes: TableFeed
        self.gateway_secret: Callable[[str, str], str | None]
        if follow == "controlPlane":
            if not control_plane:
                raise ValueError("following the control plane's route table needs its URL (gateway.controlPlane)")
            self.routes = RemoteRouteFeed(control_plane, cache_dir or Path(state_dir) / "gateway-cache", self.metrics,
                                          on_install=self._installed, token=control_plane_token, location=location,
                                          continent=continent)
            self.gateway_secret = self._secret_from_table  # a remote machine has not the daemon's key
        elif follow == "stateDir":
            # The deployments' secrets, from the daemon's key in the same stateDir (read, never made here).
            self.gateway_secret = GatewaySecrets(state_dir, create=False).for_deployment
            self.routes = RouteFeed(RouteFollower(state_dir), self.metrics, on_install=self._installed,
                                    location=location, continent=continent)
        else:
            raise ValueError(f"follow must be stateDir or controlPlane, not {follow!r}")
        self.activator = Activator(self.routes, self.metrics)
        gateway_id = gateway_id or default_gateway_id()
        self.executions = ExecutionRecorder(self.metrics, gateway_id=gateway_id, location=location,
                                            control_plane=control_plane, token=control_plane_token)
        self.tokens = TokenLedger(self.metrics)  # token counts and limits (maxToken policies)
        self.reporter: DemandReporter | None = None
        if control_plane:
            self.reporter = DemandReporter(control_plane, load=self.load, routes=self.routes,
                                           activator=self.activator, metrics=self.metrics,
                                           token=control_plane_token, gateway_id=gateway_id, location=location,
                                           interval=report_interval, overflow=self.overflow,
                                           tokens=self.tokens)
            self.activator.on_activate = self.reporter.kick
        self.hold_body_limit = hold_body_limit
        self.poll_interval = poll_interval
        self.retry_buffer_limit = retry_buffer_limit
        self._token = token.encode() if token else None
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._parser = parser
        self.upstream: UpstreamPool | None = None
        self.proxy: Proxy | None = None
        self._poller: asyncio.Task[None] | None = None

    def _secret_from_table(self, model: str, environment: str) -> str | None:
        return self.routes.table.secrets.get(route_key(model, environment))

    @property
    def table(self) -> RouteTable:
        """The route table being served."""
        return self.routes.table

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Read the route table and start following it; idempotent. Needs a running loop."""
        if self.upstream is not None:
            return
        self.upstream = UpstreamPool(connect_timeout=self.connect_timeout, read_timeout=self.read_timeout,
                                     parser=self._parser)
        self.proxy = Proxy(self.routes, self.balancer, self.upstream, self.metrics,
                           retry_buffer_limit=self.retry_buffer_limit, strip_authorization=self._token is not None,
                           activator=self.activator, load=self.load, hold_body_limit=self.hold_body_limit,
                           overflow=self.overflow, gateway_secret=self.gateway_secret,
                           executions=self.executions, tokens=self.tokens)
        self.routes.start()
        self.overflow.sync(self.routes.table.overflow)  # on the loop now: the health checks start
        self._poller = asyncio.ensure_future(self._poll_forever())
        self.executions.start()
        if self.reporter is not None:
            self.reporter.start()

    def begin_shutdown(self) -> None:
        """The server stops accepting connections: answer held requests now (503), hold no new ones."""
        self.activator.close()

    async def stop(self) -> None:
        self.begin_shutdown()
        if self.reporter is not None:
            await self.reporter.aclose()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        await self.overflow.aclose()
        await self.executions.aclose()
        if self.upstream is not None:
            await self.upstream.aclose()
        await self.routes.aclose()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                if self.upstream is not None:
                    self.upstream.purge()
                await self.routes.refresh()
            except Exception:  # keep following whatever happens
                log.exception("route table refresh failed")

    def _installed(self, table: RouteTable) -> None:
        self.balancer.forget(set(table.routes))
        self.metrics.forget_versions({b.spec_hash for backends in table.routes.values() for b in backends})
        self.load.sync(table.activation)
        self.overflow.sync(table.overflow)
        self.activator.installed(table)
        if self.reporter is not None:
            self.reporter.kick()  # the daemon learns at once that this gateway serves the new table

    # -- ASGI ------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if self.proxy is None:
                self.start()
            assert self.proxy is not None
            path: str = scope["path"]
            if path.startswith("/models/"):
                if self._token is not None and not self._authorized(scope):
                    await self._unauthorized(send)
                    return
                await self.proxy.handle(scope, receive, send)
            elif path == "/healthz":
                await send_json(send, 200, {"status": "ok", "route_table_version": self.routes.table.version,
                                            "pid": os.getpid()})
            elif path == "/metrics":
                payload = self.metrics.render()
                await send({"type": "http.response.start", "status": 200, "headers": [
                    (b"content-type", METRICS_CONTENT_TYPE.encode()),
                    (b"content-length", str(len(payload)).encode())]})
                await send({"type": "http.response.body", "body": payload})
            elif path == "/routes":
                if self._token is not None and not self._authorized(scope):
                    await self._unauthorized(send)
                    return
                await send_json(send, 200, self.describe_routes())
            else:
                await send_error(send, 404, "NotFound",
                                 f"no such path {path}; inference is served under /models/<model>/")
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1003})

    def direct(self, request: DirectRequest) -> bool:
        """The gateway's server offers each request whose body is all here: True when the proxy
        forwards it without a task (Proxy.direct); False: the server calls the app as usual."""
        proxy = self.proxy
        if proxy is None:
            return False
        scope = request.scope
        if not scope["path"].startswith("/models/"):
            return False
        if self._token is not None and not self._authorized(scope):
            return False
        return proxy.direct(request)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self.start()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- auth ------------------------------------------------------------------------------------

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                return bearer_token_matches(value, self._token)
        return False

    @staticmethod
    async def _unauthorized(send: Send) -> None:
        await send_error(send, 401, "Unauthorized", "a valid 'Authorization: Bearer <token>' is required",
                         [(b"www-authenticate", b'Bearer realm="modelfleet"')])

    # -- /routes ---------------------------------------------------------------------------------

    def describe_routes(self) -> dict[str, Any]:
        table = self.routes.table
        now = time.time()
        outstanding = self.balancer.outstanding
        return {
            "version": table.version,
            "published_at": table.published_at or None,
            "age_seconds": round(now - table.published_at, 3) if table.published_at else None,
            "loaded_at": self.routes.loaded_at or None,
            "source": self.routes.source,
            "location": self.routes.location,
            "error": self.routes.error,
            "upstream": {"parser": self.upstream.parser if self.upstream else None,
                         "connections": self.upstream.connections if self.upstream else 0,
                         # requests answered from the protocols' callbacks, and those handed to a task
                         "direct": {"answered": self.proxy.direct_answered if self.proxy else 0,
                                    "handed_over": self.proxy.direct_handed_over if self.proxy else 0}},
            "routes": {key: [{"url": b.url, "container": b.container, "host": b.host,
                              "outstanding": outstanding.get(b.url, 0)} for b in backends]
                       for key, backends in sorted(table.routes.items())},
            # the serverless deployments: how requests are held while they have no ready replica
            "activation": {key: {"queue": a.queue, "timeout": a.timeout, "held": self.activator.held(key)}
                           for key, a in sorted(table.activation.items())},
            # deployments with an on-prem endpoint: where their traffic goes now, and why
            "overflow": self.overflow.describe(asyncio.get_running_loop().time()),
            "demand": None if self.reporter is None else {
                "url": redact_url(self.reporter.url), "gateway": self.reporter.gateway_id,
                "sent": self.reporter.sent, "failing": self.reporter.failures},
        }
