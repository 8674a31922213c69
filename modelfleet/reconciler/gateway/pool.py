"""The upstream client: kept-alive HTTP/1.1 connections to backends, reused most recently used first.

A small client over asyncio protocols: it replaced httpx here because httpx/httpcore cost ~1 ms of
CPU per proxied request and degraded with concurrency (see benchmarks/bench_gateway.py), several
times the cost of everything else the gateway does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from modelfleet.reconciler.gateway.codecs import LocalProtocolError, codec_factory
from modelfleet.reconciler.gateway.connections import (
    ResponseListener,
    Target,
    UpstreamConnection,
    UpstreamError,
    UpstreamResponse,
)

DEFAULT_CONNECT_TIMEOUT = 2.0
DEFAULT_READ_TIMEOUT = 300.0
# Kept-alive connections to backends are dropped before the backends' own idle timeout (uvicorn's
# default is 5 s), so that the gateway rarely reuses a connection that the backend is closing.
BACKEND_KEEPALIVE_EXPIRY = 4.0
MAX_IDLE_PER_BACKEND = 256
# How often responses in progress are checked against the read timeout (a tenth of it when shorter).
TIMEOUT_CHECK = 1.0


class UpstreamPool:
    """Kept-alive HTTP/1.1 connections to backends, most recently used first. Needs a running loop.

    ``parser``: ``auto`` (httptools when installed), ``httptools`` or ``h11``.
    """

    def __init__(self, *, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 read_timeout: float = DEFAULT_READ_TIMEOUT, keepalive_expiry: float = BACKEND_KEEPALIVE_EXPIRY,
                 max_idle_per_backend: int = MAX_IDLE_PER_BACKEND, parser: str = "auto") -> None:
        self.parser, self.codec_factory = codec_factory(parser)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive_expiry = keepalive_expiry
        self.max_idle = max_idle_per_backend
        self.loop = asyncio.get_running_loop()
        self._targets: dict[str, Target] = {}
        self._idle: dict[str, list[UpstreamConnection]] = {}
        self._open: set[UpstreamConnection] = set()
        self._closing = False
        self._waiting: set[UpstreamResponse] = set()  # responses in progress
        self._check_every = min(TIMEOUT_CHECK, read_timeout / 10)
        self._checker: asyncio.TimerHandle | None = None

    async def request(self, url: str, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                      body: bytes | AsyncIterator[bytes] | None, length: int | None = None) -> UpstreamResponse:
        """Send a request to the backend at ``url`` and wait for the response head.

        ``body`` is bytes (sent with a Content-Length), an async iterator (sent with ``length`` as
        Content-Length, chunked when None) or None. Raises :class:`UpstreamError`.
        """
        dest = self._targets.get(url)
        if dest is None:
            dest = self._targets[url] = Target(url)
        conn = self._take_idle(dest) or await self._connect(dest)
        response = UpstreamResponse(conn, self.loop, self.read_timeout, self._waiting)
        if self._checker is None:
            self._checker = self.loop.call_later(self._check_every, self._check_timeouts)
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
                # A connection whose request was cut short is not reused (see UpstreamConnection.on_end).
                conn.request_sent = not cut_short
            await response.wait_head()
        except LocalProtocolError as exc:
            response.close()
            raise UpstreamError(f"cannot forward the request: {exc}", "protocol", before_response=False) from None
        except BaseException:
            response.close()
            raise
        return response

    def take(self, url: str) -> UpstreamConnection | None:
        """An idle kept-alive connection to the backend at ``url``, or None (see :meth:`send_on`)."""
        dest = self._targets.get(url)
        if dest is None:
            dest = self._targets[url] = Target(url)
        return self._take_idle(dest)

    def send_on(self, conn: UpstreamConnection, method: bytes, target: bytes,
                headers: list[tuple[bytes, bytes]], body: bytes, listener: ResponseListener) -> UpstreamResponse | None:
        """Send a request whose body is all here on ``conn`` (from :meth:`take`) without waiting: the
        response tells ``listener`` of its progress. None (nothing sent, ``conn`` closed) when the
        request cannot be written (:meth:`request` says why)."""
        codec = conn.codec
        try:
            head = codec.head(method, target, conn.target.host_header, headers, len(body))
            data = b"".join((head, codec.data(body), codec.end())) if body else head + codec.end()
        except LocalProtocolError:
            conn.close()
            return None
        response = UpstreamResponse(conn, self.loop, self.read_timeout, self._waiting)
        response.listener = listener
        if self._checker is None:
            self._checker = self.loop.call_later(self._check_every, self._check_timeouts)
        conn.response = response
        conn.write(data)
        conn.request_sent = True
        return response

    def _take_idle(self, dest: Target) -> UpstreamConnection | None:
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

    async def _connect(self, dest: Target) -> UpstreamConnection:
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: UpstreamConnection(self, dest, self.codec_factory),
                                            dest.host, dest.port, ssl=dest.ssl),
                self.connect_timeout)
        except TimeoutError:
            raise UpstreamError(f"connecting to {dest.key} timed out after {self.connect_timeout:g}s",
                                "connect", True) from None
        except OSError as exc:
            raise UpstreamError(f"cannot connect to {dest.key}: {exc.strerror or exc}", "connect", True) from None
        return conn

    def _check_timeouts(self) -> None:
        self._checker = None
        now = self.loop.time()
        for response in list(self._waiting):
            response.check_timeout(now)
        if self._waiting and not self._closing:
            self._checker = self.loop.call_later(self._check_every, self._check_timeouts)

    # ConnectionOwner: called by the connections
    def release(self, conn: UpstreamConnection) -> None:
        conn.resume_reading()
        idle = self._idle.setdefault(conn.target.key, [])
        if self._closing or len(idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = self.loop.time()
        idle.append(conn)

    def opened(self, conn: UpstreamConnection) -> None:
        self._open.add(conn)

    def lost(self, conn: UpstreamConnection) -> None:
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
        if self._checker is not None:
            self._checker.cancel()
            self._checker = None
        for conn in list(self._open):
            conn.close()
        self._idle.clear()
        await asyncio.sleep(0)
