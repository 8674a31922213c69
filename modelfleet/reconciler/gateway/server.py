"""The gateway: the data plane serving one inference endpoint per deployment (docs/architecture.md, "Public contract").

A separate process from the control loop: it follows the route table that the daemon publishes in
``<stateDir>/routes.db`` and keeps serving the last table it read when the daemon is away or the
file is missing or unreadable.

``/models/<model>/<sub-path>?environment=<env>`` (default environment ``production``) is proxied to
one of the deployment's ready backends, least outstanding requests first (ties round-robin). The
sub-path and the query string (less ``environment``) are forwarded; method, headers (less hop-by-hop
headers and ``Host``, plus ``X-Forwarded-For``/``-Proto``/``-Host``) and bodies are streamed both
ways. A backend that fails before sending any response byte (refused, reset, closed a kept-alive
connection) is retried once, preferably on another backend, after re-reading the route table, as
long as the request body can be replayed: bodies of up to ``retry_buffer_limit`` bytes (1 MiB) are
buffered for that, larger ones are streamed and are only retried when the failure came before any
of their bytes was read. This makes a blue-green switch lossless even when the old replica goes
away a few milliseconds before the gateway's next poll of the route table.

Backends are reached through :class:`UpstreamPool`, a small HTTP/1.1 client over asyncio protocols
with kept-alive connections per backend, parsing responses with httptools (llhttp) when it is
installed and h11 otherwise. It replaced httpx here because httpx/httpcore cost ~1 ms of CPU per
proxied request and degraded with concurrency (see benchmarks/bench_gateway.py), several times the
cost of everything else the gateway does.

Gateway endpoints: ``/healthz`` and ``/metrics`` (open), ``/routes`` (behind the token when one is
configured, like ``/models/``).

Public API: :class:`Gateway` (the ASGI app), :func:`build_server` (an uvicorn server bound to
``gateway.listen``) and :func:`run_gateway` (serve until SIGINT/SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import socket
import sqlite3
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, cast
from urllib.parse import unquote, unquote_plus, urlsplit

import h11
import uvicorn
from starlette.types import Receive, Scope, Send

from modelfleet.reconciler.config import Config
from modelfleet.reconciler.gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from modelfleet.reconciler.gateway.metrics import GatewayMetrics
from modelfleet.reconciler.gateway.routes import ROUTES_DB, Backend, RouteStore, RouteTable

log = logging.getLogger("modelfleet.gateway")

try:
    import httptools
except ImportError:  # pragma: no cover - depends on the installation
    httptools = None  # type: ignore[assignment]

DEFAULT_ENVIRONMENT = "production"
DEFAULT_CONNECT_TIMEOUT = 2.0
DEFAULT_READ_TIMEOUT = 300.0
DEFAULT_POLL_INTERVAL = 0.1
RETRY_BUFFER_LIMIT = 1 << 20
# Kept-alive connections to backends are dropped before the backends' own idle timeout (uvicorn's
# default is 5 s), so that the gateway rarely reuses a connection that the backend is closing.
BACKEND_KEEPALIVE_EXPIRY = 4.0
MAX_IDLE_PER_BACKEND = 256
# Response bytes buffered for a slow client before the gateway stops reading from the backend.
RESPONSE_BUFFER_HIGH = 512 * 1024
# How long a request runs before the gateway starts watching for its client going away.
WATCH_DELAY = 0.05

_HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
    b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade",
})
# Replaced by the gateway's own values (it is the edge), set by the upstream client (framing) or
# handled by the gateway itself (Expect).
_REQUEST_DROP = _HOP_BY_HOP | {b"host", b"expect", b"x-forwarded-proto", b"x-forwarded-host",
                               b"content-length"}
_RESPONSE_DROP = _HOP_BY_HOP
_NO_BODY_METHODS = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE", b"CONNECT"})
_JSON_HEADERS = [(b"content-type", b"application/json")]


class GatewayError(Exception):
    """The gateway cannot start (bad listen address, unreadable token file, port in use)."""


class _ClientGone(Exception):
    """The client disconnected while its request body was being read."""


class RouteFollower:
    """Reads the latest route table from ``<stateDir>/routes.db``; blocking, call from one thread.

    :meth:`poll` is cheap when nothing changed (a ``stat`` and ``SELECT MAX(version)``). The file is
    reopened when it is replaced (another inode), so a daemon that recreates it is followed; a
    missing or unreadable file leaves the caller with the table it already has.
    """

    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / ROUTES_DB
        self.error: str | None = None
        self._store: RouteStore | None = None
        self._ident: tuple[int, int] | None = None
        self._loaded: tuple[int, int, int] | None = None  # (device, inode, version) last returned

    def poll(self) -> RouteTable | None:
        """The latest table if it differs from the one returned last, else None."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            self._close()
            self._set_error(f"{self.path}: {exc.strerror or exc}")
            return None
        ident = (st.st_dev, st.st_ino)
        try:
            if self._store is None or ident != self._ident:
                self._close()
                self._store = RouteStore(self.state_dir)
                self._ident = ident
                # A new file may reuse the inode number of an old one and restart versions at 1:
                # after reopening, the table is read again whatever its version.
                self._loaded = None
            version = self._store.latest_version()
            if self._loaded == (*ident, version):
                self._set_error(None)
                return None
            table = self._store.latest()
        except (sqlite3.Error, ValueError, TypeError, KeyError, AttributeError) as exc:
            self._close()
            self._set_error(f"cannot read {self.path}: {exc}")
            return None
        if table is None:  # created but nothing published yet: keep what we have
            self._set_error(None)
            return None
        self._loaded = (*ident, table.version)
        self._set_error(None)
        return table

    def close(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._store is not None:
            with contextlib.suppress(sqlite3.Error):
                self._store.close()
        self._store = None
        self._ident = None

    def _set_error(self, error: str | None) -> None:
        if error != self.error:
            if error is None:
                log.info("route table readable again: %s", self.path)
            else:
                log.warning("%s; keeping the last route table", error)
        self.error = error


# -- upstream HTTP/1.1 client ---------------------------------------------------------------------


class UpstreamError(Exception):
    """A failed exchange with a backend.

    ``kind`` is ``connect``, ``protocol`` or ``timeout``; ``before_response`` tells that no byte of
    a response arrived, so that the request can be sent again (if its body can be replayed).
    """

    def __init__(self, message: str, kind: str, before_response: bool) -> None:
        super().__init__(message)
        self.kind = kind
        self.before_response = before_response

    @property
    def retryable(self) -> bool:
        return self.before_response and self.kind != "timeout"


class _Codec(Protocol):
    """Request serialisation and response parsing for one connection."""

    def head(self, method: bytes, target: bytes, host: bytes, headers: list[tuple[bytes, bytes]],
             length: int) -> bytes:
        """The request head; ``length`` -1 means a chunked body."""
        ...

    def data(self, chunk: bytes) -> bytes: ...

    def end(self) -> bytes: ...

    def feed(self, data: bytes) -> None: ...

    def feed_eof(self) -> None: ...

    def reusable(self) -> bool: ...


def _framing(method: bytes, length: int) -> tuple[bytes, bytes] | None:
    if length < 0:
        return (b"transfer-encoding", b"chunked")
    if length or method not in _NO_BODY_METHODS:
        return (b"content-length", b"%d" % length)
    return None


class _HttptoolsCodec:
    """Requests written by hand, responses parsed by llhttp (through httptools)."""

    def __init__(self, conn: _Connection) -> None:
        assert httptools is not None
        self._conn = conn
        self._parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[bytes, bytes]] = []
        self._chunked = False
        self._head_request = False
        self._informational = False
        self._in_body = False
        self._keep_alive = False

    def head(self, method: bytes, target: bytes, host: bytes, headers: list[tuple[bytes, bytes]],
             length: int) -> bytes:
        self._head_request = method == b"HEAD"
        self._chunked = length < 0
        self._keep_alive = False
        parts = [method, b" ", target, b" HTTP/1.1\r\nhost: ", host, b"\r\n"]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        framing = _framing(method, length)
        if framing is not None:
            parts += (framing[0], b": ", framing[1], b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def data(self, chunk: bytes) -> bytes:
        return b"%x\r\n%b\r\n" % (len(chunk), chunk) if self._chunked else chunk

    def end(self) -> bytes:
        return b"0\r\n\r\n" if self._chunked else b""

    def feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._conn.on_protocol_error("the backend switched protocols")
        except httptools.HttpParserError as exc:
            self._conn.on_protocol_error(f"invalid response: {exc}")

    def feed_eof(self) -> None:
        # A response framed by neither Content-Length nor chunked encoding ends with the connection.
        if self._in_body and not any(name.lower() in (b"content-length", b"transfer-encoding")
                                     for name, _ in self._headers):
            self._in_body = False
            self._conn.on_end()

    def reusable(self) -> bool:
        return self._keep_alive

    # llhttp callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # 100 Continue, 103 Early Hints: the response follows
            self._informational = True
            self._headers = []
            return
        self._keep_alive = self._parser.should_keep_alive() and not self._head_request
        self._in_body = True
        self._conn.on_head(status, self._headers)
        if self._head_request:  # llhttp cannot be told that no body follows: end here, then close
            self._in_body = False
            self._conn.on_end()

    def on_body(self, body: bytes) -> None:
        if self._in_body:
            self._conn.on_body(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        if self._in_body:
            self._in_body = False
            self._headers = []
            self._conn.on_end()


class _H11Codec:
    """The pure-Python fallback: h11 both ways."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._h11 = h11.Connection(h11.CLIENT)

    def head(self, method: bytes, target: bytes, host: bytes, headers: list[tuple[bytes, bytes]],
             length: int) -> bytes:
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
        all_headers = [(b"host", host), *headers]
        framing = _framing(method, length)
        if framing is not None:
            all_headers.append(framing)
        return self._h11.send(h11.Request(method=method, target=target, headers=all_headers)) or b""

    def data(self, chunk: bytes) -> bytes:
        return self._h11.send(h11.Data(data=chunk)) or b""

    def end(self) -> bytes:
        return self._h11.send(h11.EndOfMessage()) or b""

    def feed(self, data: bytes) -> None:
        self._h11.receive_data(data)
        self._events()

    def feed_eof(self) -> None:
        # Ends a body delimited by the connection's end; any other end is reported by connection_lost.
        with contextlib.suppress(h11.RemoteProtocolError):
            self._h11.receive_data(b"")
            self._events(report_errors=False)

    def reusable(self) -> bool:
        return self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE

    def _events(self, report_errors: bool = True) -> None:
        try:
            while True:
                event = self._h11.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                    return
                if isinstance(event, h11.Response):
                    self._conn.on_head(event.status_code, list(event.headers.raw_items()))
                elif isinstance(event, h11.Data):
                    self._conn.on_body(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    self._conn.on_end()
                    return
        except h11.RemoteProtocolError as exc:
            if not report_errors:
                raise
            self._conn.on_protocol_error(f"invalid response: {exc}")


class _Target:
    __slots__ = ("host", "host_header", "key", "port", "ssl")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamError(f"unsupported backend URL {url!r}", "connect", True)
        self.key = url
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.host_header = parts.netloc.rpartition("@")[2].encode("idna")


class UpstreamResponse:
    """A backend's response: status and headers, then the body with :meth:`read`."""

    __slots__ = ("_buffered", "_chunks", "_conn", "_error", "_loop", "_timeout", "_timer", "_waiter",
                 "complete", "head_received", "headers", "last_activity", "received", "status")

    def __init__(self, conn: _Connection, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False
        self.head_received = False
        self.received = False  # any byte from the backend
        self._conn: _Connection | None = conn
        self._loop = loop
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timeout = timeout
        self.last_activity = loop.time()
        self._timer: asyncio.TimerHandle | None = loop.call_at(self.last_activity + timeout, self._on_timer)

    # fed by the connection
    def set_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.headers = headers
        self.head_received = True
        self._wake()

    def feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > RESPONSE_BUFFER_HIGH and self._conn is not None:
            self._conn.pause_reading()
        self._wake()

    def finish(self) -> None:
        self.complete = True
        self._conn = None
        self._stop_timer()
        self._wake()

    def fail(self, error: UpstreamError) -> None:
        if not self.complete and self._error is None:
            self._error = error
            self._conn = None
            self._stop_timer()
            self._wake()

    # used by the gateway
    @property
    def error(self) -> UpstreamError | None:
        return self._error

    async def wait_head(self) -> None:
        while not self.head_received:
            if self._error is not None:
                raise self._error
            self._waiter = self._loop.create_future()
            await self._waiter

    async def read(self) -> tuple[bytes, bool]:
        """The body bytes buffered so far and whether they are the last ones; waits for bytes."""
        while True:
            chunks = self._chunks
            if chunks:
                chunk = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                if self._buffered > RESPONSE_BUFFER_HIGH and self._conn is not None:
                    self._conn.resume_reading()
                self._buffered = 0
                return chunk, self.complete
            if self.complete:
                return b"", True
            if self._error is not None:
                raise self._error
            self._waiter = self._loop.create_future()
            await self._waiter

    def close(self) -> None:
        """Done with the response: a connection still busy with it cannot be reused."""
        self._stop_timer()
        conn = self._conn
        if conn is not None and not self.complete:
            self._conn = None
            conn.abandon(self)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        conn = self._conn
        if self.complete or self._error is not None or conn is None:
            return
        now = self._loop.time()
        deadline = self.last_activity + self._timeout
        if conn.reading_paused:  # waiting for our client, not for the backend
            deadline = now + self._timeout
        if now < deadline:
            self._timer = self._loop.call_at(deadline, self._on_timer)
            return
        self.fail(UpstreamError(f"the backend sent nothing for {self._timeout:g}s", "timeout",
                                before_response=not self.received))
        conn.abort()


class _Connection(asyncio.Protocol):
    """One kept-alive connection to a backend; serves one request at a time."""

    def __init__(self, pool: UpstreamPool, target: _Target) -> None:
        self.pool = pool
        self.target = target
        self.codec: _Codec = pool.codec_factory(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.response: UpstreamResponse | None = None
        self.request_sent = False
        self.reading_paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        self.pool.opened(self)

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # a backend talking out of turn: this connection is not trustworthy
            self.abort()
            return
        response.received = True
        response.last_activity = self.pool.loop.time()
        self.codec.feed(data)

    def eof_received(self) -> bool:
        if self.response is not None:
            self.codec.feed_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.lost(self)
        self._wake_drain()
        response = self.response
        if response is not None:
            self.response = None
            reason = f": {exc}" if exc else ""
            if response.head_received:
                message = f"the backend closed the connection in the middle of the response{reason}"
            else:
                message = f"the backend closed the connection before responding{reason}"
            response.fail(UpstreamError(message, "protocol", before_response=not response.received))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.response is not None:
            self.response.last_activity = self.pool.loop.time()
        self._wake_drain()

    # codec callbacks
    def on_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if self.response is None:  # a second response to one request
            self.abort()
        else:
            self.response.set_head(status, headers)

    def on_body(self, chunk: bytes) -> None:
        if self.response is not None:
            self.response.feed(chunk)

    def on_end(self) -> None:
        response = self.response
        self.response = None
        if response is not None:
            response.finish()
        if self.request_sent and not self.closed and self.codec.reusable():
            self.pool.release(self)
        else:
            self.close()

    def on_protocol_error(self, message: str) -> None:
        response = self.response
        self.response = None
        if response is not None:
            response.fail(UpstreamError(message, "protocol", before_response=False))
        self.abort()

    # used by the pool and the response
    @property
    def write_paused(self) -> bool:
        return self._write_paused

    def write(self, data: bytes) -> None:
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    async def drain(self) -> None:
        while self._write_paused and not self.closed:
            self._drain_waiter = self.pool.loop.create_future()
            await self._drain_waiter

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def abandon(self, response: UpstreamResponse) -> None:
        if self.response is response:
            self.response = None
        self.abort()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _wake_drain(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)


class UpstreamPool:
    """Kept-alive HTTP/1.1 connections to backends, most recently used first."""

    def __init__(self, *, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 read_timeout: float = DEFAULT_READ_TIMEOUT, keepalive_expiry: float = BACKEND_KEEPALIVE_EXPIRY,
                 max_idle_per_backend: int = MAX_IDLE_PER_BACKEND, parser: str = "auto") -> None:
        if parser == "auto":
            parser = "httptools" if httptools is not None else "h11"
        if parser == "httptools" and httptools is None:
            raise GatewayError("httptools is not installed")
        self.parser = parser
        self.codec_factory: Callable[[_Connection], _Codec] = (
            _HttptoolsCodec if parser == "httptools" else _H11Codec)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive_expiry = keepalive_expiry
        self.max_idle = max_idle_per_backend
        self.loop = asyncio.get_running_loop()
        self._targets: dict[str, _Target] = {}
        self._idle: dict[str, list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._closing = False

    async def request(self, url: str, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                      body: bytes | AsyncIterator[bytes] | None, length: int | None = None) -> UpstreamResponse:
        """Send a request to the backend at ``url`` and wait for the response head.

        ``body`` is bytes (sent with a Content-Length), an async iterator (sent with ``length`` as
        Content-Length, chunked when None) or None. Raises :class:`UpstreamError`.
        """
        dest = self._targets.get(url)
        if dest is None:
            dest = self._targets[url] = _Target(url)
        conn = self._take_idle(dest) or await self._connect(dest)
        response = UpstreamResponse(conn, self.loop, self.read_timeout)
        conn.response = response
        conn.request_sent = False
        try:
            codec = conn.codec
            if body is None or isinstance(body, bytes):
                data = body or b""
                head = codec.head(method, target, dest.host_header, headers, len(data))
                conn.write(b"".join((head, codec.data(data), codec.end())) if data else head + codec.end())
                conn.request_sent = True
            else:
                conn.write(codec.head(method, target, dest.host_header, headers, -1 if length is None else length))
                cut_short = False
                async for chunk in body:
                    if conn.closed or response.head_received:  # gone, or answered early (413...)
                        cut_short = True
                        break
                    if chunk:
                        conn.write(codec.data(chunk))
                        response.last_activity = self.loop.time()
                        if conn.write_paused:
                            await conn.drain()
                if not cut_short:
                    conn.write(codec.end())
                # A connection whose request was cut short is not reused (see _Connection.on_end).
                conn.request_sent = not cut_short
            await response.wait_head()
        except h11.LocalProtocolError as exc:
            response.close()
            raise UpstreamError(f"cannot forward the request: {exc}", "protocol", before_response=False) from None
        except BaseException:
            response.close()
            raise
        return response

    def _take_idle(self, dest: _Target) -> _Connection | None:
        idle = self._idle.get(dest.key)
        if not idle:
            return None
        expired = self.loop.time() - self.keepalive_expiry
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if conn.idle_since < expired:
                conn.close()
                continue
            return conn
        return None

    async def _connect(self, dest: _Target) -> _Connection:
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: _Connection(self, dest), dest.host, dest.port, ssl=dest.ssl),
                self.connect_timeout)
        except TimeoutError:
            raise UpstreamError(f"connecting to {dest.key} timed out after {self.connect_timeout:g}s",
                                "connect", True) from None
        except OSError as exc:
            raise UpstreamError(f"cannot connect to {dest.key}: {exc.strerror or exc}", "connect", True) from None
        return conn

    def release(self, conn: _Connection) -> None:
        conn.resume_reading()
        idle = self._idle.setdefault(conn.target.key, [])
        if self._closing or len(idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = self.loop.time()
        idle.append(conn)

    def opened(self, conn: _Connection) -> None:
        self._open.add(conn)

    def lost(self, conn: _Connection) -> None:
        self._open.discard(conn)

    def purge(self) -> None:
        """Close expired idle connections and forget closed ones."""
        expired = self.loop.time() - self.keepalive_expiry
        for key, idle in list(self._idle.items()):
            keep = []
            for conn in idle:
                if conn.closed:
                    continue
                if conn.idle_since < expired:
                    conn.close()
                else:
                    keep.append(conn)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
                self._targets.pop(key, None)

    @property
    def connections(self) -> int:
        return len(self._open)

    async def aclose(self) -> None:
        self._closing = True
        for conn in list(self._open):
            conn.close()
        self._idle.clear()
        await asyncio.sleep(0)


class Balancer:
    """Least outstanding requests per backend URL; ties go round-robin."""

    def __init__(self) -> None:
        self.outstanding: dict[str, int] = {}
        self._next: dict[str, int] = {}

    def pick(self, key: str, backends: tuple[Backend, ...], avoid: str | None = None) -> Backend:
        """A backend of ``backends`` (non-empty); ``avoid`` is only chosen when it is the only one."""
        count = len(backends)
        if count == 1:
            return backends[0]
        start = self._next.get(key, 0)
        self._next[key] = (start + 1) % count
        outstanding = self.outstanding
        best = backends[start % count]
        best_load = 1 << 62
        for i in range(count):
            backend = backends[(start + i) % count]
            if backend.url == avoid:
                continue
            load = outstanding.get(backend.url, 0)
            if load < best_load:
                best, best_load = backend, load
                if load == 0:
                    break
        return best

    def acquire(self, url: str) -> None:
        self.outstanding[url] = self.outstanding.get(url, 0) + 1

    def release(self, url: str) -> None:
        left = self.outstanding.get(url, 1) - 1
        if left > 0:
            self.outstanding[url] = left
        else:
            self.outstanding.pop(url, None)

    def forget(self, keys: set[str]) -> None:
        for key in [k for k in self._next if k not in keys]:
            del self._next[key]


class _Exchange:
    """Per-request state shared with the disconnect watcher."""

    __slots__ = ("_timer", "client_gone", "finished", "task", "watcher")

    def __init__(self) -> None:
        self.task: asyncio.Task[Any] | None = asyncio.current_task()
        self.finished = False
        self.client_gone = False
        self.watcher: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, receive: Receive) -> None:
        """Cancel the request's task if the client goes away (call once the request body is read).

        Most requests are over in a few milliseconds: the watcher task only starts after
        WATCH_DELAY, which keeps its cost off the fast path.
        """
        if self.watcher is None and self._timer is None and self.task is not None:
            self._timer = asyncio.get_running_loop().call_later(WATCH_DELAY, self._start_watch, receive)

    def _start_watch(self, receive: Receive) -> None:
        self._timer = None
        if not self.finished:
            self.watcher = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not self.finished and self.task is not None:
                    self.client_gone = True
                    self.task.cancel()
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


def _split_query(query: bytes) -> tuple[str, bytes]:
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


async def _send_json(send: Send, status: int, body: dict[str, Any],
                     extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
    payload = json.dumps(body).encode()
    headers = [*_JSON_HEADERS, (b"content-length", str(len(payload)).encode())]
    if extra_headers:
        headers.extend(extra_headers)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


async def _send_error(send: Send, status: int, kind: str, message: str,
                      extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await _send_json(send, status, {"code": status, "type": kind, "message": message}, extra_headers)


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
    ) -> None:
        self.follower = RouteFollower(state_dir)
        self.table = RouteTable(0, {})
        self.loaded_at = 0.0
        self.balancer = Balancer()
        self.metrics = metrics if metrics is not None else GatewayMetrics()
        self.poll_interval = poll_interval
        self.retry_buffer_limit = retry_buffer_limit
        self._token = token.encode() if token else None
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._parser = parser
        self.upstream: UpstreamPool | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._poller: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._refresh_waiters: asyncio.Future[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Read the route table and start following it; idempotent. Needs a running loop."""
        if self.upstream is not None:
            return
        self.upstream = UpstreamPool(connect_timeout=self.connect_timeout, read_timeout=self.read_timeout,
                                     parser=self._parser)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-routes")
        table = self.follower.poll()
        if table is not None:
            self._install(table)
        self._poller = asyncio.ensure_future(self._poll_forever())

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        if self.upstream is not None:
            await self.upstream.aclose()
        if self._executor is not None:
            executor = self._executor
            self._executor = None
            executor.submit(self.follower.close)
            executor.shutdown(wait=True)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                if self.upstream is not None:
                    self.upstream.purge()
                await self.refresh_routes()
            except Exception:  # keep following whatever happens
                log.exception("route table refresh failed")

    async def refresh_routes(self) -> None:
        """Read the route table now; returns after a read that started after this call."""
        loop = asyncio.get_running_loop()
        if self._refresh_waiters is None:
            self._refresh_waiters = loop.create_future()
        waiters = self._refresh_waiters
        if self._refresher is None or self._refresher.done():
            self._refresher = loop.create_task(self._run_refreshes())
        await asyncio.shield(waiters)

    async def _run_refreshes(self) -> None:
        loop = asyncio.get_running_loop()
        while self._refresh_waiters is not None:
            waiters = self._refresh_waiters
            self._refresh_waiters = None
            try:
                table = await loop.run_in_executor(self._executor, self.follower.poll)
                if table is not None:
                    self._install(table)
                self.metrics.route_table_read_failing.set(0 if self.follower.error is None else 1)
            except Exception:  # never fatal: the current table stays
                log.exception("route table refresh failed")
            finally:
                if not waiters.done():
                    waiters.set_result(None)

    def _install(self, table: RouteTable) -> None:
        previous = self.table
        self.table = table  # the swap: requests read self.table once
        self.loaded_at = time.time()
        self.balancer.forget(set(table.routes))
        self.metrics.route_table_version.set(table.version)
        self.metrics.route_table_published.set(table.published_at)
        log.info("route table version %d (%d deployments, %d ready backends), was %d", table.version,
                 len(table.routes), sum(len(b) for b in table.routes.values()), previous.version)

    # -- ASGI ------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if self.upstream is None:
                self.start()
            path: str = scope["path"]
            if path.startswith("/models/"):
                if self._token is not None and not self._authorized(scope):
                    await self._unauthorized(send)
                    return
                await self._proxy(scope, receive, send)
            elif path == "/healthz":
                await _send_json(send, 200, {"status": "ok", "route_table_version": self.table.version})
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
                await _send_json(send, 200, self.describe_routes())
            else:
                await _send_error(send, 404, "NotFound",
                                  f"no such path {path}; inference is served under /models/<model>/")
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1003})

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

    def _authorized(self, scope: Scope) -> bool:
        assert self._token is not None
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self._token)
        return False

    @staticmethod
    async def _unauthorized(send: Send) -> None:
        await _send_error(send, 401, "Unauthorized", "a valid 'Authorization: Bearer <token>' is required",
                          [(b"www-authenticate", b'Bearer realm="modelfleet"')])

    def describe_routes(self) -> dict[str, Any]:
        table = self.table
        now = time.time()
        outstanding = self.balancer.outstanding
        return {
            "version": table.version,
            "published_at": table.published_at or None,
            "age_seconds": round(now - table.published_at, 3) if table.published_at else None,
            "loaded_at": self.loaded_at or None,
            "error": self.follower.error,
            "upstream": {"parser": self.upstream.parser if self.upstream else None,
                         "connections": self.upstream.connections if self.upstream else 0},
            "routes": {key: [{"url": b.url, "container": b.container, "host": b.host,
                              "outstanding": outstanding.get(b.url, 0)} for b in backends]
                       for key, backends in sorted(table.routes.items())},
        }

    # -- proxy -----------------------------------------------------------------------------------

    def _request_headers(self, scope: Scope) -> tuple[list[tuple[bytes, bytes]], int | None]:
        """Headers to forward and the request's Content-Length (None when absent or chunked)."""
        headers: list[tuple[bytes, bytes]] = []
        forwarded_for = b""
        host = b""
        content_length: int | None = None
        chunked = False
        drop = _REQUEST_DROP
        connection_tokens: set[bytes] | None = None
        strip_auth = self._token is not None
        for name, value in scope["headers"]:
            if name in drop:
                if name == b"host":
                    host = value
                elif name == b"connection":
                    connection_tokens = {t.strip().lower() for t in value.split(b",")}
                elif name == b"transfer-encoding":
                    chunked = True
                elif name == b"content-length":
                    with contextlib.suppress(ValueError):
                        content_length = int(value)
                continue
            if name == b"x-forwarded-for":
                forwarded_for = value if not forwarded_for else forwarded_for + b", " + value
                continue
            if strip_auth and name == b"authorization":
                continue  # the gateway's credential is not the backend's business
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
        return headers, None if chunked else content_length

    async def _proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        model_raw, _, sub_path = raw_path[len(b"/models/"):].partition(b"/")
        model = unquote(model_raw.decode("latin-1"))
        environment, query = _split_query(scope.get("query_string", b""))
        key = f"{model}/{environment}"
        backends = self.table.routes.get(key)
        if backends is None:
            await _send_error(send, 404, "DeploymentNotFound",
                              f'no deployment of model "{model}" in environment "{environment}"')
            self.metrics.observe("", "", 404, time.perf_counter() - started)
            return
        if not backends:
            await self._no_backend(send, model, environment)
            self.metrics.observe(model, environment, 503, time.perf_counter() - started)
            return
        exchange = _Exchange()
        status = 499  # nginx's "client closed request" when nothing else is known
        try:
            status = await self._exchange(scope, receive, send, exchange, model, environment, key, backends,
                                          b"/" + sub_path + (b"?" + query if query else b""))
        except _ClientGone:
            status = 499
        except asyncio.CancelledError:
            task = exchange.task
            if not exchange.client_gone or task is None or task.uncancel() > 0:
                raise
            status = 499
        finally:
            exchange.close()
            self.metrics.observe(model, environment, status, time.perf_counter() - started)

    async def _no_backend(self, send: Send, model: str, environment: str) -> None:
        await _send_error(send, 503, "NoReadyBackend",
                          f'deployment "{model}" in environment "{environment}" has no ready replica',
                          [(b"retry-after", b"1")])

    async def _exchange(self, scope: Scope, receive: Receive, send: Send, exchange: _Exchange, model: str,
                        environment: str, key: str, backends: tuple[Backend, ...], target: bytes) -> int:
        """Forward the request; returns the status code sent to the client."""
        upstream = self.upstream
        assert upstream is not None
        headers, content_length = self._request_headers(scope)
        body = _RequestBody(receive, exchange)
        await body.prefetch(content_length, self.retry_buffer_limit)
        method: bytes = scope["method"].encode()
        balancer = self.balancer
        avoid: str | None = None
        for attempt in (0, 1):
            if attempt:
                # The retry: re-read the route table first (the failed backend is likely gone from it).
                self.metrics.retry(model, environment)
                await self.refresh_routes()
                retry_backends = self.table.routes.get(key)
                if retry_backends is None:
                    await _send_error(send, 404, "DeploymentNotFound",
                                      f'no deployment of model "{model}" in environment "{environment}"')
                    return 404
                if not retry_backends:
                    await self._no_backend(send, model, environment)
                    return 503
                backends = retry_backends
            backend = balancer.pick(key, backends, avoid)
            url = backend.url
            balancer.acquire(url)
            released = False

            def release() -> None:
                nonlocal released
                if not released:
                    released = True
                    balancer.release(url)  # noqa: B023 - only called within this iteration

            try:
                try:
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
                        await _send_error(send, 504, "GatewayTimeout", f"backend of {key} did not answer in time")
                        return 504
                    await _send_error(send, 502, "BadGateway", f"backend of {key} failed: {exc}")
                    return 502
                try:
                    await self._relay(send, response, exchange, release)
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

    @staticmethod
    async def _relay(send: Send, response: UpstreamResponse, exchange: _Exchange,
                     complete: Callable[[], None]) -> None:
        """Stream the response to the client; ``complete()`` runs once the backend sent it all."""
        drop = _RESPONSE_DROP
        headers = [(name, value) for name, value in response.headers if name.lower() not in drop]
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        while True:
            chunk, last = await response.read()
            if last:
                complete()
                exchange.finished = True
                await send({"type": "http.response.body", "body": chunk, "more_body": False})
                return
            if chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` / ``:port`` -> (host, port)."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise GatewayError(f"gateway.listen: expected host:port, got {listen!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port_text)


def read_token(token_file: str | None) -> str | None:
    if not token_file:
        return None
    try:
        token = Path(token_file).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise GatewayError(f"gateway.tokenFile: cannot read {token_file}: {exc.strerror}") from None
    if not token:
        raise GatewayError(f"gateway.tokenFile: {token_file} is empty")
    return token


def bind_socket(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise GatewayError(f"gateway.listen: cannot resolve {host}:{port}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Inherited by accepted connections: no Nagle delay between a response's header and body writes.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if family == socket.AF_INET6:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise GatewayError(f"gateway.listen: cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def create_gateway(config: Config, *, read_timeout: float | None = None,
                   poll_interval: float = DEFAULT_POLL_INTERVAL) -> Gateway:
    """The ASGI app for ``config``: routes from ``<stateDir>/routes.db``, token from gateway.tokenFile.

    ``read_timeout`` defaults to ``config.gateway.read_timeout`` when the config has such a field,
    else 300 s.
    """
    if read_timeout is None:
        read_timeout = float(getattr(config.gateway, "read_timeout", None) or DEFAULT_READ_TIMEOUT)
    return Gateway(config.state_dir, token=read_token(config.gateway.token_file), read_timeout=read_timeout,
                   poll_interval=poll_interval)


def build_server(app: Callable[..., Any], host: str, port: int, *, log_level: str = "info",
                 graceful_shutdown: int = 30) -> uvicorn.Server:
    """An uvicorn server for the gateway app (uvloop/httptools when installed)."""
    config = uvicorn.Config(
        app, host=host, port=port, lifespan="on", log_config=None, log_level=log_level, access_log=False,
        server_header=False, date_header=False, ws="none", proxy_headers=False, timeout_keep_alive=75,
        timeout_graceful_shutdown=graceful_shutdown)
    return uvicorn.Server(config)


def run_gateway(config: Config, *, read_timeout: float | None = None) -> None:
    """Serve the gateway on ``config.gateway.listen`` until SIGINT/SIGTERM (then drain, ≤ 30 s).

    Raises :class:`GatewayError` when it cannot start (the CLI maps it to exit code 3).
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, port = parse_listen(config.gateway.listen)
    app = create_gateway(config, read_timeout=read_timeout)
    sock = bind_socket(host, port)
    log.info("gateway listening on %s:%d, following %s%s", host, port, app.follower.path,
             " (bearer token required)" if config.gateway.token_file else "")
    server = build_server(app, host, port)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise GatewayError("the gateway failed to start (see the log above)")


__all__ = [
    "Balancer",
    "Gateway",
    "GatewayError",
    "RouteFollower",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamResponse",
    "bind_socket",
    "build_server",
    "create_gateway",
    "parse_listen",
    "read_token",
    "run_gateway",
]

