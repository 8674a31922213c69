"""The proxy: forward one inference request to a ready backend and stream the response back.

``/models/<model>/<sub-path>?environment=<env>`` (default environment ``production``) goes to one of
the deployment's ready backends, chosen by the balancer. The sub-path and the query string (less
``environment``) are forwarded; method, headers (less hop-by-hop headers and ``Host``, plus
``X-Forwarded-For``/``-Proto``/``-Host``) and bodies are streamed both ways. A backend that fails
before sending any response byte (refused, reset, closed a kept-alive connection) is retried once,
preferably on another backend, after re-reading the route table, as long as the request body can
be replayed: bodies of up to ``retry_buffer_limit`` bytes (1 MiB) are buffered for that, larger ones
are streamed and are only retried when the failure came before any of their bytes was read. This
makes a blue-green switch lossless even when the old replica goes away a few milliseconds before
the gateway's next poll of the route table.

A request for a serverless deployment (one with activation settings in the route table) that has no
ready replica is held until one is published (``activator``): its body is read into memory first
(up to ``hold_body_limit``, 16 MiB; 413 beyond), so that it can be sent once a replica is there.
Serverless deployments are also metered (``load``) for the demand reports; for every other
deployment the proxy does one dictionary lookup more than it would without them.

A deployment with overflow settings (an on-prem endpoint, ``overflow``) sends its requests to that
endpoint first, with their bodies read into memory (up to ``hold_body_limit``) so that one refused
by the endpoint before any response byte is sent to the pool instead; the pool's requests (beyond
``maxConcurrency``, the steady ``percentage``, while the endpoint is unhealthy, failovers) take the
ordinary path (held at zero, metered). For a route table without any overflow settings the proxy
tests one empty dictionary more.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, MutableMapping
from typing import Any, Protocol
from urllib.parse import unquote, unquote_plus

from starlette.types import Receive, Scope, Send

from modelfleet.reconciler.gateway.activator import Activator, Outcome
from modelfleet.reconciler.gateway.balancer import Balancer
from modelfleet.reconciler.gateway.connections import UpstreamError, UpstreamResponse
from modelfleet.reconciler.gateway.executions import ExecutionRecorder
from modelfleet.reconciler.gateway.follower import TableFeed
from modelfleet.reconciler.gateway.frontend import DISCONNECT_EXTENSION
from modelfleet.reconciler.gateway.load import KeyLoad, LoadMeter
from modelfleet.reconciler.gateway.metrics import GatewayMetrics, LiveCount
from modelfleet.reconciler.gateway.overflow import FAILOVER, EndpointState, OverflowRouter
from modelfleet.reconciler.gateway.pool import UpstreamPool
from modelfleet.reconciler.gateway.responses import send_error, send_json
from modelfleet.reconciler.gateway.routes import Activation, Backend, Overflow, route_key
from modelfleet.reconciler.gateway.tokens import ResponseTokens, TokenLedger
from modelfleet.reconciler.gateway.tokens import estimate as estimate_tokens
from modelfleet.reconciler.gateway.tokens import refusal_body as token_refusal_body
from modelfleet.runtimes.contract import GATEWAY_SECRET_HEADER
from modelfleet.state.executions import valid_request_id
from modelfleet.state.token_limits import TokenVerdict

log = logging.getLogger("modelfleet.gateway")

DEFAULT_ENVIRONMENT = "production"
MODELS_PREFIX = b"/models/"
RETRY_BUFFER_LIMIT = 1 << 20
# The largest request body held (in memory) while a serverless deployment starts a replica.
HOLD_BODY_LIMIT = 16 << 20
# Retry-After of the 503s of activation: a full queue or a replica slower than the timeout (a cold
# start takes seconds), and a gateway shutting down (another one, or this one restarted, takes over).
ACTIVATION_RETRY_AFTER = [(b"retry-after", b"5")]
SHUTDOWN_RETRY_AFTER = [(b"retry-after", b"1")]
# Model names in paths (without ?environment=) whose route key the direct path keeps.
NAMES_CACHED = 4096
# How long a request runs before the gateway starts watching for its client going away.
WATCH_DELAY = 0.05

_HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
    b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade",
})
# Replaced by the gateway's own values (it is the edge), set by the upstream client (framing) or
# handled by the gateway itself (Expect).
# The deployment secret header is the gateway's to add, never a client's to pass on.
_SECRET_HEADER = GATEWAY_SECRET_HEADER.encode()
# X-Request-Id is set once per request by the gateway (the client's, when valid).
_REQUEST_DROP = _HOP_BY_HOP | {b"host", b"expect", b"x-forwarded-proto", b"x-forwarded-host",
                               b"content-length", b"x-request-id", _SECRET_HEADER}
_REQUEST_ID = b"x-request-id"
_CONTENT_TYPE = b"content-type"
_RESPONSE_DROP = _HOP_BY_HOP
# An empty body message: the gateway's server writes a response head with the first body message
# (one write for most responses), or at this one.
_FLUSH = {"type": "http.response.body", "body": b"", "more_body": True}


class _ClientGone(Exception):
    """The client disconnected while its request body was being read."""


class Proxy:
    """Forwards ``/models/`` requests; the app has already decided that the caller may send them.

    ``strip_authorization``: drop the client's ``Authorization`` header (it carried the gateway's
    own token, which is not the backend's business).
    """

    def __init__(self, routes: TableFeed, balancer: Balancer, upstream: UpstreamPool, metrics: GatewayMetrics,
                 *, retry_buffer_limit: int = RETRY_BUFFER_LIMIT, strip_authorization: bool = False,
                 activator: Activator | None = None, load: LoadMeter | None = None,
                 hold_body_limit: int = HOLD_BODY_LIMIT, overflow: OverflowRouter | None = None,
                 gateway_secret: Callable[[str, str], str | None] | None = None,
                 executions: ExecutionRecorder | None = None, tokens: TokenLedger | None = None) -> None:
        self.routes = routes
        self.balancer = balancer
        self.upstream = upstream
        self.metrics = metrics
        self.retry_buffer_limit = retry_buffer_limit
        self.strip_authorization = strip_authorization
        self.activator = activator if activator is not None else Activator(routes, metrics)
        self.load = load if load is not None else LoadMeter()
        self._meters = self.load.keys  # route key -> KeyLoad, serverless deployments only
        self.hold_body_limit = max(hold_body_limit, retry_buffer_limit)
        self.overflow = overflow if overflow is not None else OverflowRouter()
        self.gateway_secret = gateway_secret  # (model, environment) -> the secret our runtimes require
        self.executions = executions if executions is not None else ExecutionRecorder(metrics)
        self.tokens = tokens if tokens is not None else TokenLedger(metrics)
        self._names: dict[bytes, tuple[str, str, str]] = {}  # model in the path -> (model, environment, key)
        # Requests answered on the direct path without a task, and those it handed over to one.
        self.direct_answered = 0
        self.direct_handed_over = 0

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        model_raw, _, sub_path = raw_path[len(MODELS_PREFIX):].partition(b"/")
        model = unquote(model_raw.decode("latin-1"))
        environment, query = split_query(scope.get("query_string", b""))
        key = route_key(model, environment)
        table = self.routes.table
        backends = table.routes.get(key)
        activation = None
        if table.tokens:
            limits = table.tokens.get(key)
            if limits is not None:
                verdict = self.tokens.verdict(key, limits)
                if verdict is not None:
                    await self._token_limited(send, model, environment, verdict, started)
                    return
        if table.overflow and backends is not None:
            overflow = table.overflow.get(key)
            if overflow is not None:
                await self._handle_overflow(scope, receive, send, model, environment, key, overflow,
                                            b"/" + sub_path + (b"?" + query if query else b""), started)
                return
        if not backends:
            if backends is None:
                await _deployment_not_found(send, model, environment)
                self.metrics.observe("", "", 404, time.perf_counter() - started)
                return
            activation = table.activation.get(key)
            if activation is None:
                await _no_ready_backend(send, model, environment)
                seconds = time.perf_counter() - started
                self.metrics.observe(model, environment, 503, seconds)
                self.executions.record(self.executions.ids.new(), model, environment, 503, seconds, 0, 0, None,
                                       False, False, False)
                return
        meter = self._meters.get(key)  # None unless the deployment is serverless
        if meter is not None:
            meter.arrive(started)
        exchange = _Exchange(scope)
        in_flight = self.metrics.in_flight_of(model, environment)
        in_flight.inc()
        status = 499  # nginx's "client closed request" when nothing else is known
        try:
            status = await self._exchange(scope, receive, send, exchange, model, environment, key, backends,
                                          b"/" + sub_path + (b"?" + query if query else b""), activation, meter,
                                          started)
        except _ClientGone:
            status = 499
        except asyncio.CancelledError:
            task = exchange.task
            if not exchange.client_gone or task is None or task.uncancel() > 0:
                raise
            status = 499
        finally:
            self._finish(exchange, model, environment, status, started, meter, in_flight)

    def _finish(self, exchange: _Exchange, model: str, environment: str, status: int, started: float,
                meter: KeyLoad | None, in_flight: LiveCount) -> None:
        """A forwarded request is over: its metrics and its execution record."""
        exchange.close()
        in_flight.dec()
        ended = time.perf_counter()
        if meter is not None:
            meter.leave(ended)
        self.metrics.observe(model, environment, status, ended - started)
        self._record(exchange, model, environment, status, ended - started)

    # -- the direct path -------------------------------------------------------------------------

    def direct(self, request: DirectRequest) -> bool:
        """Forward a request whose body is all here from the protocols' callbacks: no task, no ASGI
        messages. Taken when nothing about the request needs waiting: the deployment has ready
        backends, no overflow endpoint and no token limit reached, the body is small enough to be
        replayed. The response is relayed as it comes (a whole one in one write); what needs waiting
        (no idle connection to the chosen backend, a failure to retry or answer, a client slower than
        the backend) goes on as the request's task on the ordinary path (:meth:`_resume`,
        :meth:`_resume_relay`), where the same code decides. False: nothing was done, :meth:`handle`
        takes the request."""
        scope = request.scope
        started = time.perf_counter()
        raw_path: bytes = scope["raw_path"]
        model_raw, _, sub_path = raw_path[len(MODELS_PREFIX):].partition(b"/")
        query = scope["query_string"]
        names = self._names.get(model_raw) if b"environment" not in query else None
        if names is None:
            model = unquote(model_raw.decode("latin-1"))
            environment, query = split_query(query)
            names = (model, environment, route_key(model, environment))
            if environment == DEFAULT_ENVIRONMENT and len(self._names) < NAMES_CACHED:
                self._names[model_raw] = names
        model, environment, key = names
        table = self.routes.table
        backends = table.routes.get(key)
        if not backends or (table.overflow and key in table.overflow):
            return False
        if table.tokens:
            limits = table.tokens.get(key)
            if limits is not None and self.tokens.verdict(key, limits) is not None:
                return False  # the 429
        if request.body_size > self.retry_buffer_limit:
            return False
        backend = self.balancer.pick(key, backends, None)
        url = backend.url
        exchange = _Exchange(None)
        headers, _ = self._request_headers(scope, exchange)  # the body is all here: len(body) is its length
        secret = self.gateway_secret(model, environment) if self.gateway_secret is not None else None
        if secret is not None:
            headers.append((_SECRET_HEADER, secret.encode()))
        body = request.take_body()
        meter = self._meters.get(key)
        if meter is not None:
            meter.arrive(started)
        in_flight = self.metrics.in_flight_of(model, environment)
        in_flight.inc()
        exchange.backend = backend
        self.balancer.acquire(url)
        if meter is not None:
            meter.acquire(url, time.perf_counter())
        forward = _Direct(self, request, exchange, model, environment, key, backends,
                          b"/" + sub_path + (b"?" + query if query else b""), body, backend, meter, in_flight,
                          started)
        request.notify_disconnect(forward.client_gone)
        conn = self.upstream.take(url)
        if conn is not None:
            forward.response = self.upstream.send_on(conn, scope["method"].encode(), forward.target, headers, body,
                                                     forward)
        if forward.response is None:  # no connection to reuse (or the request cannot be written): the
            forward.hand_over(self._resume(forward))  # ordinary path connects (or says why)
        return True

    async def _resume(self, forward: _Direct) -> None:
        """The ordinary path from where the direct one stopped: the request was sent (or could not
        be) to ``forward.backend``; its response failed, or streams."""
        exchange = forward.exchange
        model, environment = forward.model, forward.environment
        request = forward.request
        body = _RequestBody(request.receive, exchange)
        body.prefill(forward.body)
        status = 499
        try:
            status = await self._exchange(request.scope, request.receive, request.send, exchange, model, environment,
                                          forward.key, forward.backends, forward.target, None, forward.meter,
                                          forward.started, body, (forward.backend, forward.response))
        except _ClientGone:
            status = 499
        except asyncio.CancelledError:
            task = exchange.task
            if not exchange.client_gone or task is None or task.uncancel() > 0:
                raise
            status = 499
        finally:
            self._finish(exchange, model, environment, status, forward.started, forward.meter, forward.in_flight)

    async def _resume_relay(self, forward: _Direct) -> None:
        """The rest of a response that the direct path began to relay, for a client that reads it
        slower than the backend sends it (each body message waits for the client to take it)."""
        exchange = forward.exchange
        response = forward.response
        assert response is not None
        send = forward.request.send
        status = 499
        try:
            try:
                await send(_FLUSH)  # what was written is taken first
                await _relay_body(send, response, exchange, forward.release)
            except UpstreamError as exc:
                self.metrics.backend_error(forward.model, forward.environment, "stream")
                log.warning("backend %s of %s failed mid-response: %s", forward.backend.url, forward.key, exc)
            finally:
                response.close()
            status = response.status
        except asyncio.CancelledError:
            task = exchange.task
            if not exchange.client_gone or task is None or task.uncancel() > 0:
                raise
        finally:
            forward.release()
            self._finish(exchange, forward.model, forward.environment, status, forward.started, forward.meter,
                         forward.in_flight)

    def _record(self, exchange: _Exchange, model: str, environment: str, status: int, seconds: float) -> None:
        if exchange.finished_body and 200 <= status < 300:
            response = exchange.response_tokens
            counts = response.usage() if response is not None else None
            key = route_key(model, environment)
            limited = key in self.routes.table.tokens
            if counts is None and limited:  # estimated only where a limit needs it
                counts = estimate_tokens(exchange.request_bytes, response, exchange.sent)
            if counts is not None:
                self.tokens.count(key, model, environment, exchange.backend, counts, limited)
        self.executions.record(exchange.request_id or "-", model, environment, status, seconds, exchange.request_bytes,
                               exchange.sent, exchange.backend, exchange.cold_start, exchange.overflow,
                               exchange.retried)

    async def _token_limited(self, send: Send, model: str, environment: str, verdict: TokenVerdict,
                             started: float) -> None:
        """429 in OpenAI's shape: the deployment used up its token limits (its maxToken policies)."""
        sent = await send_json(send, 429, token_refusal_body(verdict),
                               [(b"retry-after", str(verdict.retry_after).encode())])
        seconds = time.perf_counter() - started
        self.metrics.token_limited.labels(model, environment).inc()
        self.metrics.observe(model, environment, 429, seconds)
        self.executions.record(self.executions.ids.new(), model, environment, 429, seconds, 0, sent, None,
                               False, False, False)

    async def _handle_overflow(self, scope: Scope, receive: Receive, send: Send, model: str, environment: str,
                               key: str, settings: Overflow, target: bytes, started: float) -> None:
        """A deployment with an on-prem endpoint: there first, else (or on failure) to the pool."""
        state = self.overflow.state(key, settings)
        loop_now = asyncio.get_running_loop().time()
        reason = state.choose(loop_now)
        exchange = _Exchange(scope)
        status = 499
        meter: KeyLoad | None = None
        in_flight = self.metrics.in_flight_of(model, environment)
        in_flight.inc()
        try:
            body: _RequestBody | None = None
            if reason is None:
                headers, content_length = self._request_headers(scope, exchange)
                body = _RequestBody(receive, exchange)
                if not await body.read_all(content_length, self.hold_body_limit):
                    status = 413
                    await send_error(send, 413, "RequestTooLarge",
                                     f'deployment "{model}" in environment "{environment}" sends requests to its '
                                     f"overflow endpoint with their bodies buffered, of at most "
                                     f"{self.hold_body_limit} bytes; send a smaller body")
                    return
                answered = await self._to_endpoint(send, exchange, state, scope["method"].encode(), target,
                                                   headers, body, content_length, model, environment, key)
                if answered is not None:
                    status = answered
                    return
                reason = FAILOVER
            state.sent_to_pool(reason)
            table = self.routes.table
            backends = table.routes.get(key)
            if backends is None:
                status = 404
                await _deployment_not_found(send, model, environment)
                return
            activation = None
            if not backends:
                activation = table.activation.get(key)
                if activation is None:
                    status = 503
                    await _no_ready_backend(send, model, environment)
                    return
            meter = self._meters.get(key)
            if meter is not None:
                meter.arrive(time.perf_counter())
            status = await self._exchange(scope, receive, send, exchange, model, environment, key, backends, target,
                                          activation, meter, started, body)
        except _ClientGone:
            status = 499
        except asyncio.CancelledError:
            task = exchange.task
            if not exchange.client_gone or task is None or task.uncancel() > 0:
                raise
            status = 499
        finally:
            exchange.close()
            in_flight.dec()
            ended = time.perf_counter()
            if meter is not None:
                meter.leave(ended)
            self.metrics.observe(model, environment, status, ended - started)
            self._record(exchange, model, environment, status, ended - started)

    def _request_headers(self, scope: Scope, exchange: _Exchange) -> tuple[list[tuple[bytes, bytes]], int | None]:
        """The headers to forward, with the request's id (decided at the first call for a request)."""
        headers, content_length, client_id = forward_headers(scope, self.strip_authorization)
        if exchange.request_id is None:
            exchange.request_id = (client_id is not None and valid_request_id(client_id)) or self.executions.ids.new()
            exchange.request_bytes = content_length or 0
        headers.append((_REQUEST_ID, exchange.request_id.encode()))
        return headers, content_length

    async def _to_endpoint(self, send: Send, exchange: _Exchange, state: EndpointState, method: bytes,
                           target: bytes, headers: list[tuple[bytes, bytes]], body: _RequestBody,
                           content_length: int | None, model: str, environment: str, key: str) -> int | None:
        """Forward to the overflow endpoint: the status sent, or None when the pool should take it
        (the endpoint failed before any response byte)."""
        state.in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                state.in_flight -= 1

        try:
            try:
                response = await self.upstream.request(state.url, method, state.prefix + target, state.headers(headers),
                                                       body.content(), content_length)
            except UpstreamError as exc:
                state.failed(asyncio.get_running_loop().time(), str(exc))
                self.metrics.backend_error(model, environment, exc.kind)
                if exc.retryable and body.replayable:
                    log.info("overflow endpoint %s of %s failed before responding (%s); sending to the pool",
                             state.url, key, exc)
                    return None
                log.warning("overflow endpoint %s of %s failed: %s", state.url, key, exc)
                if exc.kind == "timeout":
                    await send_error(send, 504, "GatewayTimeout", f"overflow endpoint of {key} did not answer in time")
                    return 504
                await send_error(send, 502, "BadGateway", f"overflow endpoint of {key} failed: {exc}")
                return 502
            state.answered(response.status, asyncio.get_running_loop().time())
            exchange.overflow = True
            try:
                await _relay(send, response, exchange, release)
            except UpstreamError as exc:
                self.metrics.backend_error(model, environment, "stream")
                log.warning("overflow endpoint %s of %s failed mid-response: %s", state.url, key, exc)
            finally:
                response.close()
            return response.status
        finally:
            release()

    async def _exchange(self, scope: Scope, receive: Receive, send: Send, exchange: _Exchange, model: str,
                        environment: str, key: str, backends: tuple[Backend, ...], target: bytes,
                        activation: Activation | None, meter: KeyLoad | None, started: float,
                        body: _RequestBody | None = None,
                        sent: tuple[Backend, UpstreamResponse | None] | None = None) -> int:
        """Forward the request; returns the status code sent to the client.

        ``activation``: set when the deployment has no backend yet: the request is held first.
        ``body``: the request body, already read whole (a failover from an overflow endpoint).
        ``sent``: the backend of the first attempt, picked and acquired by the direct path, and the
        response to the request it sent there (None: it could not write it).
        """
        upstream = self.upstream
        headers, content_length = self._request_headers(scope, exchange)
        secret = self.gateway_secret(model, environment) if self.gateway_secret is not None else None
        if secret is not None:
            headers.append((_SECRET_HEADER, secret.encode()))
        read = body is not None
        if body is None:
            body = _RequestBody(receive, exchange)
        if activation is not None:
            held = await self._hold(send, body, content_length, model, environment, key, activation, started,
                                    read_body=not read)
            if isinstance(held, int):
                return held
            backends = held
            exchange.cold_start = True
        elif not read:
            await body.prefetch(content_length, self.retry_buffer_limit)
        method: bytes = scope["method"].encode()
        balancer = self.balancer
        avoid: str | None = None
        for attempt in (0, 1):
            if attempt:
                # The retry: re-read the route table first (the failed backend is likely gone from it).
                self.metrics.retry(model, environment)
                exchange.retried = True
                await self.routes.refresh()
                table = self.routes.table
                # Every backend, not only the nearest ones: those may be what failed.
                retry_backends = table.fallback.get(key) or table.routes.get(key)
                if retry_backends is None:
                    await _deployment_not_found(send, model, environment)
                    return 404
                if not retry_backends:
                    # Its last replica went away (scaled to zero?): a serverless deployment holds the
                    # request, if it has its whole body, until another one is ready.
                    activation = self.routes.table.activation.get(key)
                    if activation is None or body.more:
                        await _no_ready_backend(send, model, environment)
                        return 503
                    held = await self._hold(send, body, content_length, model, environment, key, activation,
                                            started, read_body=False)
                    if isinstance(held, int):
                        return held
                    retry_backends = held
                    exchange.cold_start = True
                backends = retry_backends
            first: UpstreamResponse | None = None
            if sent is not None:
                backend, first = sent
                sent = None
                url = backend.url
            else:
                backend = balancer.pick(key, backends, avoid)
                exchange.backend = backend
                url = backend.url
                balancer.acquire(url)
                if meter is not None:
                    meter.acquire(url, time.perf_counter())
            released = False

            def release() -> None:
                nonlocal released
                if not released:
                    released = True
                    balancer.release(url)  # noqa: B023 - only called within this iteration
                    if meter is not None:
                        meter.release(url, time.perf_counter())  # noqa: B023

            try:
                try:
                    if first is not None:
                        response = first
                        try:
                            await response.wait_head()
                        except BaseException:
                            response.close()
                            raise
                    else:
                        response = await upstream.request(url, method, target, headers, body.content(),
                                                          content_length)
                except UpstreamError as exc:
                    self.metrics.backend_error(model, environment, exc.kind)
                    if exc.retryable and attempt == 0 and body.replayable:
                        log.info("backend %s of %s failed before responding (%s); retrying", url, key, exc)
                        avoid = url
                        continue  # to the retry, after `finally` released the backend
                    log.warning("backend %s of %s failed: %s", url, key, exc)
                    if exc.kind == "timeout":
                        await send_error(send, 504, "GatewayTimeout", f"backend of {key} did not answer in time")
                        return 504
                    await send_error(send, 502, "BadGateway", f"backend of {key} failed: {exc}")
                    return 502
                try:
                    await _relay(send, response, exchange, release)
                except UpstreamError as exc:
                    # The status line is gone already: all we can do is cut the response short.
                    self.metrics.backend_error(model, environment, "stream")
                    log.warning("backend %s of %s failed mid-response: %s", url, key, exc)
                finally:
                    response.close()
                return response.status
            finally:
                release()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _hold(self, send: Send, body: _RequestBody, content_length: int | None, model: str,
                    environment: str, key: str, activation: Activation, started: float,
                    read_body: bool = True) -> tuple[Backend, ...] | int:
        """Hold the request until the deployment has a ready backend: its backends, or the status sent."""
        activator = self.activator
        waiting = activator.admit(key, activation, model, environment)
        if waiting is None:
            if activator.closing:
                await _shutting_down(send, model, environment)
                return 503
            self.metrics.activation_rejected(model, environment)
            await send_error(send, 503, "ActivationQueueFull",
                             f'deployment "{model}" in environment "{environment}" is starting a replica and '
                             f"already holds {activation.queue} requests (its serverless.queue) at this gateway; "
                             "retry later, or raise serverless.queue in its manifest", ACTIVATION_RETRY_AFTER)
            return 503
        try:  # the place is given back before any answer (the client may send the next request at once)
            deadline = asyncio.get_running_loop().time() + activation.timeout
            outcome: Outcome | None = None
            backends: tuple[Backend, ...] = ()
            if not read_body or await body.read_all(content_length, self.hold_body_limit):
                outcome, backends = await activator.wait(waiting, key, deadline)
        finally:
            activator.leave(waiting, key)
        if outcome is None:
            await send_error(send, 413, "RequestTooLarge",
                             f'deployment "{model}" in environment "{environment}" has no ready replica yet and '
                             f"the gateway holds request bodies of at most {self.hold_body_limit} bytes while "
                             "one starts; send a smaller body, or retry once the deployment is ready "
                             "(then bodies of any size are streamed)")
            return 413
        if outcome is Outcome.READY:
            self.metrics.held_for(model, environment, time.perf_counter() - started)
            return backends
        if outcome is Outcome.TIMEOUT:
            self.metrics.activation_timeout(model, environment)
            log.warning("held request for %s timed out after %gs without a ready replica", key, activation.timeout)
            await send_error(send, 503, "ActivationTimeout",
                             f'waited {activation.timeout:g}s for a replica of model "{model}" in environment '
                             f'"{environment}" to become ready; it is still starting (or failing to: see '
                             "`modelfleet status`); retry later, or raise serverless.activationTimeout in its "
                             "manifest", ACTIVATION_RETRY_AFTER)
            return 503
        if outcome is Outcome.GONE:
            await _deployment_not_found(send, model, environment)
            return 404
        if outcome is Outcome.SHUTDOWN:
            await _shutting_down(send, model, environment)
            return 503
        await _no_ready_backend(send, model, environment)
        return 503


async def _relay(send: Send, response: UpstreamResponse, exchange: _Exchange,
                 complete: Callable[[], None]) -> None:
    """Stream the response to the client; ``complete()`` runs once the backend sent it all."""
    headers = _response_headers(response, exchange)
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    if not response.readable:  # the backend sent its head alone: the client gets it now, not with the body
        await send(_FLUSH)
    await _relay_body(send, response, exchange, complete)


async def _relay_body(send: Send, response: UpstreamResponse, exchange: _Exchange,
                      complete: Callable[[], None]) -> None:
    """The body part of :func:`_relay`."""
    tokens = exchange.response_tokens
    while True:
        chunk, last = await response.read()
        exchange.sent += len(chunk)
        if tokens is not None:
            tokens.feed(chunk)
        if last:
            complete()
            exchange.finished = True
            await send({"type": "http.response.body", "body": chunk, "more_body": False})
            exchange.finished_body = True
            return
        if chunk:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})


def _response_headers(response: UpstreamResponse, exchange: _Exchange) -> list[tuple[bytes, bytes]]:
    """The response headers for the client; sets ``exchange.response_tokens`` (its usage is read once
    it is sent: token counts)."""
    drop = _RESPONSE_DROP
    headers = []
    has_id = False
    tokens: ResponseTokens | None = None
    for name, value in response.headers:
        lower = name.lower()
        if lower not in drop:
            headers.append((name, value))
            has_id = has_id or lower == _REQUEST_ID
            if lower == _CONTENT_TYPE:
                tokens = ResponseTokens.for_content_type(value)
    if not has_id and exchange.request_id is not None:  # the client learns the id its request is logged under
        headers.append((_REQUEST_ID, exchange.request_id.encode()))
    exchange.response_tokens = tokens
    return headers


async def _deployment_not_found(send: Send, model: str, environment: str) -> None:
    await send_error(send, 404, "DeploymentNotFound",
                     f'no deployment of model "{model}" in environment "{environment}"')


async def _no_ready_backend(send: Send, model: str, environment: str) -> None:
    await send_error(send, 503, "NoReadyBackend",
                     f'deployment "{model}" in environment "{environment}" has no ready replica',
                     [(b"retry-after", b"1")])


async def _shutting_down(send: Send, model: str, environment: str) -> None:
    await send_error(send, 503, "GatewayShuttingDown",
                     f'the gateway is shutting down before a replica of model "{model}" in environment '
                     f'"{environment}" became ready; retry (another gateway, or this one once restarted, '
                     "will serve it)", SHUTDOWN_RETRY_AFTER)


def split_query(query: bytes) -> tuple[str, bytes]:
    """(environment, the query string without ``environment``)."""
    if b"environment" not in query:
        return DEFAULT_ENVIRONMENT, query
    environment = ""
    found = False
    kept: list[bytes] = []
    for part in query.split(b"&"):
        name, _, value = part.partition(b"=")
        if unquote_plus(name.decode("latin-1")) == "environment":
            if not found:
                environment = unquote_plus(value.decode("latin-1"))
                found = True
            continue
        kept.append(part)
    return environment or DEFAULT_ENVIRONMENT, b"&".join(kept)


def forward_headers(scope: Scope, strip_authorization: bool
                    ) -> tuple[list[tuple[bytes, bytes]], int | None, bytes | None]:
    """Headers to forward, the request's Content-Length (None when absent or chunked) and the
    client's X-Request-Id (None when it sent none; the caller adds the one to forward)."""
    headers: list[tuple[bytes, bytes]] = []
    request_id: bytes | None = None
    forwarded_for = b""
    host = b""
    content_length: int | None = None
    chunked = False
    drop = _REQUEST_DROP
    connection_tokens: set[bytes] | None = None
    for name, value in scope["headers"]:
        if name in drop:
            if name == b"host":
                host = value
            elif name == b"connection":
                connection_tokens = {t.strip().lower() for t in value.split(b",")}
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"content-length":
                try:  # noqa: SIM105 - not contextlib.suppress: an object per request
                    content_length = int(value)
                except ValueError:
                    pass
            elif name == _REQUEST_ID:
                request_id = value
            continue
        if name == b"x-forwarded-for":
            forwarded_for = value if not forwarded_for else forwarded_for + b", " + value
            continue
        if strip_authorization and name == b"authorization":
            continue
        headers.append((name, value))
    if connection_tokens:
        connection_tokens -= {b"close", b"keep-alive", b"content-length"}
        headers = [(n, v) for n, v in headers if n not in connection_tokens]
    client = scope.get("client")
    if client:
        address = client[0].encode()
        forwarded_for = forwarded_for + b", " + address if forwarded_for else address
    if forwarded_for:
        headers.append((b"x-forwarded-for", forwarded_for))
    headers.append((b"x-forwarded-proto", scope.get("scheme", "http").encode()))
    if host:
        headers.append((b"x-forwarded-host", host))
    return headers, None if chunked else content_length, request_id


class _Exchange:
    """Per-request state shared with the disconnect watcher."""

    __slots__ = ("_notify", "_timer", "backend", "client_gone", "cold_start", "finished", "finished_body",
                 "overflow", "request_bytes", "request_id", "response_tokens", "retried", "sent", "task", "watcher")

    def __init__(self, scope: Scope | None) -> None:
        """``scope`` None: the direct path's, which has no task (yet) and is told of a client that
        goes away by the server itself."""
        # What the execution record says (gateway/executions.py).
        self.request_id: str | None = None
        self.backend: Backend | None = None
        self.request_bytes = 0
        self.sent = 0
        self.cold_start = False
        self.overflow = False
        self.retried = False
        self.response_tokens: ResponseTokens | None = None
        self.finished_body = False  # the whole response reached the client (its tokens count)
        self.finished = False
        self.client_gone = False
        self.watcher: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._notify: Callable[[Callable[[], None]], None] | None = None
        if scope is None:
            self.task: asyncio.Task[Any] | None = None
            return
        self.task = asyncio.current_task()
        # The gateway's own server tells when the client goes away (gateway/frontend.py); under
        # another ASGI server, a watcher task waits for http.disconnect.
        extensions = scope.get("extensions")
        if extensions:
            self._notify = extensions.get(DISCONNECT_EXTENSION)

    def watch(self, receive: Receive) -> None:
        """Cancel the request's task if the client goes away (call once the request body is read).

        Most requests are over in a few milliseconds: the watcher task only starts after
        WATCH_DELAY, which keeps its cost off the fast path.
        """
        if self._notify is not None:
            notify, self._notify = self._notify, None
            notify(self.client_went_away)
        elif self.watcher is None and self._timer is None and self.task is not None:
            self._timer = asyncio.get_running_loop().call_later(WATCH_DELAY, self._start_watch, receive)

    def client_went_away(self) -> None:
        if not self.finished and self.task is not None:
            self.client_gone = True
            self.task.cancel()

    def _start_watch(self, receive: Receive) -> None:
        self._timer = None
        if not self.finished:
            self.watcher = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.client_went_away()
                return

    def close(self) -> None:
        self.finished = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.watcher is not None:
            self.watcher.cancel()


class _RequestBody:
    """The request body: buffered when small (replayable), else streamed from ``receive``."""

    __slots__ = ("_exchange", "_prefix", "_receive", "consumed", "more")

    def __init__(self, receive: Receive, exchange: _Exchange) -> None:
        self._receive = receive
        self._exchange = exchange
        self._prefix = b""
        self.more = False  # more bytes remain in `receive` after the prefix
        self.consumed = False  # bytes were taken from `receive` by a stream: not replayable

    def prefill(self, body: bytes) -> None:
        """The whole body, read already (the direct path's)."""
        self._prefix = body
        self.more = False

    async def prefetch(self, content_length: int | None, limit: int) -> None:
        if content_length is not None and content_length > limit:
            self.more = True
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self._receive()
            if message["type"] != "http.request":
                raise _ClientGone
            chunk: bytes = message.get("body", b"")
            more: bool = message.get("more_body", False)
            if not chunks and not more:
                self._prefix = chunk
                self._exchange.watch(self._receive)
                return
            chunks.append(chunk)
            size += len(chunk)
            if not more or size > limit:
                self._prefix = b"".join(chunks)
                self.more = more
                if not more:
                    self._exchange.watch(self._receive)
                return

    async def read_all(self, content_length: int | None, limit: int) -> bool:
        """Read the whole body into memory; False (and the rest left unread) when it exceeds ``limit`` bytes."""
        if content_length is not None and content_length > limit:
            return False
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self._receive()
            if message["type"] != "http.request":
                raise _ClientGone
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return False
            chunks.append(chunk)
            if not message.get("more_body", False):
                self._prefix = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                self.more = False
                self._exchange.watch(self._receive)  # from now on, a client that goes away is noticed
                return True

    @property
    def replayable(self) -> bool:
        return not self.consumed

    def content(self) -> bytes | AsyncIterator[bytes] | None:
        if not self.more:
            return self._prefix or None
        return self._stream()

    async def _stream(self) -> AsyncIterator[bytes]:
        if self._prefix:
            yield self._prefix
        self.consumed = True
        while True:
            message = await self._receive()
            if message["type"] != "http.request":
                raise _ClientGone
            chunk: bytes = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                self._exchange.watch(self._receive)
                return


class DirectRequest(Protocol):
    """What the direct path needs of a request (the gateway's server's, gateway/frontend.py)."""

    scope: dict[str, Any]
    body_size: int

    async def receive(self) -> dict[str, Any]: ...

    async def send(self, message: MutableMapping[str, Any]) -> None: ...

    def take_body(self) -> bytes: ...

    def start(self, status: int, headers: Any) -> None: ...

    def write_body(self, body: bytes, more: bool) -> bool: ...

    def notify_disconnect(self, callback: Callable[[], None]) -> None: ...

    def run(self, coro: Any) -> None: ...

    @property
    def task(self) -> asyncio.Task[None] | None: ...

    def done(self) -> None: ...

    def fail(self, exc: BaseException) -> None: ...


class _Direct:
    """One request on the direct path: sent to its backend, relaying the response as it comes (its listener)."""

    __slots__ = ("backend", "backends", "body", "environment", "exchange", "in_flight", "key", "meter", "model",
                 "over", "proxy", "released", "request", "response", "started", "streaming", "target")

    def __init__(self, proxy: Proxy, request: DirectRequest, exchange: _Exchange, model: str, environment: str,
                 key: str, backends: tuple[Backend, ...], target: bytes, body: bytes, backend: Backend,
                 meter: KeyLoad | None, in_flight: LiveCount, started: float) -> None:
        self.proxy = proxy
        self.request = request
        self.exchange = exchange
        self.model = model
        self.environment = environment
        self.key = key
        self.backends = backends
        self.target = target
        self.body = body
        self.backend = backend
        self.meter = meter
        self.in_flight = in_flight
        self.started = started
        self.response: UpstreamResponse | None = None
        self.streaming = False  # the response head went to the client before the backend sent the whole body
        self.released = False
        self.over = False  # answered, handed over, or its client gone

    def release(self) -> None:
        """The backend sent its whole response (or is left): it no longer counts as busy with it."""
        if not self.released:
            self.released = True
            url = self.backend.url
            self.proxy.balancer.release(url)
            if self.meter is not None:
                self.meter.release(url, time.perf_counter())

    def upstream_event(self) -> None:
        """The response has news (ResponseListener): relayed as it comes; what needs waiting (a
        failure before the response, a client slower than the backend) goes on as a task."""
        response = self.response
        if self.over or response is None:
            return
        request = self.request
        exchange = self.exchange
        try:
            if not self.streaming:
                if not response.complete:
                    if response.error is not None:  # nothing was sent: retried, or answered, there
                        self.hand_over(self.proxy._resume(self))
                        return
                    if not response.head_received:
                        return
                    self.streaming = True  # the head now, as the ordinary path does, the body as it comes
                request.start(response.status, _response_headers(response, exchange))
            error = response.error
            if error is not None:  # the status line is gone already: all we can do is cut the response short
                self.proxy.metrics.backend_error(self.model, self.environment, "stream")
                log.warning("backend %s of %s failed mid-response: %s", self.backend.url, self.key, error)
                self._end(response.status)
                return
            body = response.take_body()
            exchange.sent += len(body)
            if exchange.response_tokens is not None:
                exchange.response_tokens.feed(body)
            if response.complete:
                self.release()
                exchange.finished = True
                request.write_body(body, False)
                exchange.finished_body = True
                self.proxy.direct_answered += 1
                self._end(response.status)
            elif request.write_body(body, True):  # the client takes less than the backend sends
                self.hand_over(self.proxy._resume_relay(self))
        except Exception as exc:  # as on the ordinary path: a 500 when nothing was sent, logged
            request.fail(exc)
            if not self.over:
                self._end(499)

    def _end(self, status: int) -> None:
        self.over = True
        response = self.response
        if response is not None:
            response.listener = None
            response.close()  # a connection still busy with the response is not reused
        self.release()
        self.proxy._finish(self.exchange, self.model, self.environment, status, self.started, self.meter,
                           self.in_flight)
        self.request.done()

    def hand_over(self, coro: Any) -> None:
        """On to a coroutine (Proxy._resume, Proxy._resume_relay), as the request's task."""
        if self.response is not None:
            self.response.listener = None
        request = self.request
        request.run(coro)
        self.over = True
        self.proxy.direct_handed_over += 1
        exchange = self.exchange
        exchange.task = request.task
        request.notify_disconnect(exchange.client_went_away)

    def client_gone(self) -> None:
        """The client went away before its response was written (the server's disconnect callback)."""
        if self.over:
            return
        self.exchange.client_gone = True
        self._end(499)
