"""One kept-alive HTTP/1.1 connection to a backend (an asyncio protocol) and the response it is receiving."""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Protocol, cast
from urllib.parse import urlsplit

from modelfleet.reconciler.gateway.codecs import Codec, CodecFactory
from modelfleet.reconciler.gateway.waiters import wake

# Response bytes buffered for a slow client before the gateway stops reading from the backend.
RESPONSE_BUFFER_HIGH = 512 * 1024


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


class Target:
    """Where a backend URL points: address, TLS context and the Host header to send."""

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


class ConnectionOwner(Protocol):
    """The pool a connection belongs to: told when it opens, closes and is free again."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    def opened(self, conn: UpstreamConnection) -> None: ...

    def lost(self, conn: UpstreamConnection) -> None: ...

    def release(self, conn: UpstreamConnection) -> None: ...


class ResponseListener(Protocol):
    def upstream_event(self) -> None:
        """The response has news: its head, body bytes, its end, or a failure."""


class UpstreamResponse:
    """A backend's response: status and headers, then the body with :meth:`read`."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_conn",
        "_error",
        "_loop",
        "_scheduled",
        "_timeout",
        "_waiter",
        "_waiting",
        "complete",
        "head_received",
        "headers",
        "last_activity",
        "listener",
        "received",
        "status",
    )

    def __init__(self, conn: UpstreamConnection, loop: asyncio.AbstractEventLoop, timeout: float,
                 waiting: set[UpstreamResponse]) -> None:
        """``waiting``: the pool's responses in progress, whose timeouts it checks (:meth:`check_timeout`)."""
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False
        self.head_received = False
        self.received = False  # any byte from the backend
        self._conn: UpstreamConnection | None = conn
        self._loop = loop
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timeout = timeout
        self.last_activity = loop.time()
        self._waiting = waiting
        waiting.add(self)
        # Told (listener.upstream_event(), once the data at hand is parsed) instead of a coroutine
        # waiting: the proxy's direct path (see Proxy.direct).
        self.listener: ResponseListener | None = None
        self._scheduled = False

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

    # used by the proxy
    @property
    def error(self) -> UpstreamError | None:
        return self._error

    @property
    def readable(self) -> bool:
        """:meth:`read` would not wait."""
        return bool(self._chunks) or self.complete or self._error is not None

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

    def take_body(self) -> bytes:
        """All the body bytes buffered (the whole body, once ``complete``)."""
        chunks = self._chunks
        if not chunks:
            return b""
        body = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if self._buffered > RESPONSE_BUFFER_HIGH and self._conn is not None:
            self._conn.resume_reading()
        self._buffered = 0
        return body

    def close(self) -> None:
        """Done with the response: a connection still busy with it cannot be reused."""
        self._stop_timer()
        conn = self._conn
        if conn is not None and not self.complete:
            self._conn = None
            conn.abandon(self)

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        wake(waiter)
        if self.listener is not None and not self._scheduled:
            # After what the backend sent is parsed whole (a head and its body are mostly one read).
            self._scheduled = True
            self._loop.call_soon(self._tell)

    def _tell(self) -> None:
        self._scheduled = False
        listener = self.listener
        if listener is not None:
            listener.upstream_event()

    def _stop_timer(self) -> None:
        self._waiting.discard(self)

    def check_timeout(self, now: float) -> None:
        """Fail the response if the backend sent nothing for the read timeout (the pool calls it every
        ``TIMEOUT_CHECK`` at most: no timer per request)."""
        conn = self._conn
        if self.complete or self._error is not None or conn is None:
            self._stop_timer()
            return
        if conn.reading_paused:  # waiting for our client, not for the backend
            self.last_activity = now
            return
        if now - self.last_activity < self._timeout:
            return
        self.fail(UpstreamError(f"the backend sent nothing for {self._timeout:g}s", "timeout",
                                before_response=not self.received))
        conn.abort()


class UpstreamConnection(asyncio.Protocol):
    """One kept-alive connection to a backend; serves one request at a time."""

    def __init__(self, owner: ConnectionOwner, target: Target, codec_factory: CodecFactory) -> None:
        self.owner = owner
        self.target = target
        self.codec: Codec = codec_factory(self)
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
        self.owner.opened(self)

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # a backend talking out of turn: this connection is not trustworthy
            self.abort()
            return
        response.received = True
        response.last_activity = self.owner.loop.time()
        self.codec.feed(data)

    def eof_received(self) -> bool:
        if self.response is not None:
            self.codec.feed_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.owner.lost(self)
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
            self.response.last_activity = self.owner.loop.time()
        self._wake_drain()

    # codec callbacks (CodecEvents)
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
            self.owner.release(self)
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
            self._drain_waiter = self.owner.loop.create_future()
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
        waiter, self._drain_waiter = self._drain_waiter, None
        wake(waiter)
