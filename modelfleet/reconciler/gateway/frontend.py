"""The gateway's HTTP/1.1 server: the data-plane port served by an asyncio protocol of its own.

Replaces uvicorn on the request path (uvicorn's protocol, its per-request timers and its ASGI
cycle cost more CPU than the whole proxy). Requests are parsed by llhttp (httptools); each one is
handed to the gateway as an ASGI ``http`` scope with ``receive``/``send`` bound to the request, so
that the app and its proxy keep the ASGI contract (and can be served by any ASGI server in tests
of their own), but what backs them is lean:

- **one write per response** where the backend's response came in one piece: the head is kept
  until the first body message (an app that streams sends an empty ``more_body`` message to push
  the head out at once, as the proxy does when the backend has sent nothing more yet);
- **keep-alive** without a timer per request: a sweep every few seconds closes connections idle
  for longer than ``keep_alive`` (75 s);
- **pipelining**: requests that arrive while one is being answered are parsed and queued (with
  reading paused) and answered in order;
- request bodies of any framing (Content-Length or chunked, decoded by llhttp), read with flow
  control (reading pauses past ``BODY_HIGH_WATER`` bytes not yet taken by the app);
  ``Expect: 100-continue`` is answered when the app first asks for the body;
- a malformed request is answered ``400`` (the gateway's JSON error) and its connection closed;
- a client that goes away: the request's ``receive`` returns ``http.disconnect`` (the proxy then
  cancels its exchange), and what the app still sends is dropped;
- graceful shutdown: stop accepting, close idle connections, let in-flight requests finish (their
  connections close after the response) for up to ``graceful_shutdown`` seconds, then abort.

There are no ``Server`` nor ``Date`` headers (as the gateway was configured with uvicorn).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import http
import json
import logging
import signal
import socket
import threading
from collections import deque
from collections.abc import Callable, MutableMapping
from typing import Any, cast
from urllib.parse import unquote

import httptools
from starlette.types import ASGIApp

from modelfleet.reconciler.gateway.waiters import wake

log = logging.getLogger("modelfleet.gateway")


KEEP_ALIVE = 75.0  # seconds an idle kept-alive connection is kept (uvicorn's setting, as before)
SWEEP_INTERVAL = 5.0  # how often idle connections are looked for
BODY_HIGH_WATER = 64 * 1024  # request body bytes buffered before reading from the client pauses
PIPELINE_LIMIT = 32  # pipelined requests queued on one connection before reading pauses

_STATUS_LINES = {code: b"HTTP/1.1 %d %s\r\n" % (code, phrase.encode())
                 for code, phrase in ((s.value, s.phrase) for s in http.HTTPStatus)}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_CLOSE = b"connection: close\r\n"
_CHUNKED = b"transfer-encoding: chunked\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_DISCONNECT = {"type": "http.disconnect"}
# scope["extensions"][DISCONNECT_EXTENSION](callback): ``callback()`` is called if the client goes
# away before the response is complete (what the proxy needs without a task waiting on receive()).
DISCONNECT_EXTENSION = "modelfleet.disconnect"
_ASGI = {"version": "3.0", "spec_version": "2.3"}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    return line if line is not None else b"HTTP/1.1 %d \r\n" % status


def _json_error(status: int, kind: str, message: str) -> bytes:
    body = json.dumps({"code": status, "type": kind, "message": message}).encode()
    return b"".join((_status_line(status), b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body),
                     _CLOSE, b"\r\n", body))


class _Request:
    """One request: its ASGI scope, the body parsed so far, and the state of its response."""

    __slots__ = ("body", "body_done", "body_size", "chunked", "conn", "delivered", "disconnected", "expect", "head",
                 "head_request", "keep_alive", "length", "on_gone", "remaining", "response_complete",
                 "response_started", "scope", "small_body", "task", "waiter")

    def __init__(self, conn: ClientConnection, scope: dict[str, Any], keep_alive: bool, expect: bool) -> None:
        self.conn = conn
        self.scope = scope
        self.keep_alive = keep_alive
        self.expect = expect  # Expect: 100-continue, not answered yet
        self.small_body = False  # a Content-Length of at most BODY_HIGH_WATER
        self.task: asyncio.Task[None] | None = None
        self.on_gone: Callable[[], None] | None = None
        self.head_request = scope["method"] == "HEAD"
        self.body: list[bytes] = []
        self.body_size = 0
        self.body_done = False  # the whole body was parsed
        self.delivered = False  # ... and handed to the app
        self.disconnected = False
        self.waiter: asyncio.Future[None] | None = None
        self.response_started = False
        self.response_complete = False
        self.head: bytes | None = None  # the response head, until the first body message writes it
        self.chunked = False
        self.length: int | None = None  # the response's Content-Length
        self.remaining = 0

    def notify_disconnect(self, callback: Callable[[], None]) -> None:
        """``callback()`` when the client goes away before the response is complete (the extension)."""
        self.on_gone = callback

    def gone(self) -> None:
        """The client went away."""
        self.disconnected = True
        self.wake()
        callback, self.on_gone = self.on_gone, None
        if callback is not None and not self.response_complete:
            callback()

    def wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        wake(waiter)

    # -- the direct path (the app's ``direct``): no ASGI messages, no task -----------------------

    def take_body(self) -> bytes:
        """The whole body (call once it was parsed: ``body_done``), as ``receive`` would have given it."""
        chunks = self.body
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.body = []
        self.body_size = 0
        self.delivered = True
        self.conn.body_taken()
        return body

    def start(self, status: int, headers: Any) -> None:
        """``http.response.start`` (the head is written with the first body message)."""
        if self.response_started:
            raise RuntimeError("the response has already started")
        self.response_started = True
        self.expect = False
        self._start(status, headers)

    def write_body(self, body: bytes, more: bool) -> bool:
        """An ``http.response.body`` message; True when the client's side is full (see drain)."""
        return self._body(body, more)

    def run(self, coro: Any) -> None:
        """Go on with ``coro`` (what the direct path hands over: retries, streamed responses) as the
        request's task, as if the app had been called as a coroutine."""
        self.task = self.conn.loop.create_task(self.conn.serve_coroutine(self, coro))

    def done(self) -> None:
        """The direct path is through with the request (its response written whole, or its client gone)."""
        self.conn.direct_done(self)

    def fail(self, exc: BaseException) -> None:
        """The direct path failed: as an app that raised (a 500 when nothing was sent, logged)."""
        self.conn._failed(self, exc)

    async def receive(self) -> dict[str, Any]:
        conn = self.conn
        while True:
            if self.disconnected:
                return _DISCONNECT
            if self.body:
                chunks = self.body
                body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                self.body = []
                self.body_size = 0
                self.delivered = self.body_done
                conn.body_taken()
                return {"type": "http.request", "body": body, "more_body": not self.body_done}
            if self.body_done:
                if not self.delivered:
                    self.delivered = True
                    return {"type": "http.request", "body": b"", "more_body": False}
                if self.response_complete:
                    return _DISCONNECT
            elif self.expect and not self.response_started:
                self.expect = False
                conn.write(_CONTINUE)
            self.waiter = conn.loop.create_future()
            await self.waiter

    async def send(self, message: MutableMapping[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if self.response_started:
                raise RuntimeError("the response has already started")
            self.response_started = True
            self.expect = False
            self._start(message["status"], message.get("headers", ()))
        elif kind == "http.response.body":
            if not self.response_started:
                raise RuntimeError("a response body before its start")
            if self.response_complete:
                raise RuntimeError("the response is already complete")
            if self._body(message.get("body", b""), message.get("more_body", False)):
                await self.conn.drain()
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")

    def _body(self, body: bytes, more: bool) -> bool:
        """Write a body message; True when the client's side is full (the caller waits for drain())."""
        conn = self.conn
        if self.disconnected:
            if not more:
                self.response_complete = True
            return False
        if self.head_request or self.length == 0:
            body = b""
        elif self.length is not None:
            if len(body) > self.remaining:
                raise RuntimeError("response content longer than its Content-Length")
            self.remaining -= len(body)
        head = self.head
        if self.chunked:
            out = [head] if head is not None else []
            if body:
                out += (b"%x\r\n" % len(body), body, b"\r\n")
            if not more:
                out.append(_LAST_CHUNK)
            data = b"".join(out)
        elif head is not None:
            data = head + body if body else head
        else:
            data = body
        self.head = None
        if data:
            conn.write(data)
        if not more:
            self.response_complete = True
            if self.length is not None and self.remaining:
                self.keep_alive = False  # the client waits for bytes that will not come: end it
            conn.response_complete(self)
            return False
        return conn.write_paused

    def _start(self, status: int, headers: Any) -> None:
        parts = [_status_line(status)]
        length: int | None = None
        chunked = False
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length":
                try:  # noqa: SIM105 - not contextlib.suppress: an object per response
                    length = int(value)
                except ValueError:
                    pass
            elif lower == b"transfer-encoding":
                continue  # the framing is ours
            elif lower == b"connection":
                if value.lower() == b"close":
                    self.keep_alive = False
                continue
            parts += (lower, b": ", value, b"\r\n")
        if not self.body_done:  # answered before its body was read: the rest is not worth reading
            self.keep_alive = False
        no_body = status < 200 or status in (204, 304)
        if no_body:
            length = None
        elif length is None and not self.head_request:
            if self.scope["http_version"] == "1.1":
                chunked = True
                parts.append(_CHUNKED)
            else:
                self.keep_alive = False  # the end of the connection ends the body
        if not self.keep_alive or self.conn.closing:
            self.keep_alive = False
            parts.append(_CLOSE)
        parts.append(b"\r\n")
        self.head = b"".join(parts)
        self.chunked = chunked
        self.length = 0 if no_body else length
        self.remaining = 0 if no_body or self.head_request else length or 0


class ClientConnection(asyncio.Protocol):
    """One client connection: parses its requests, runs them one at a time, writes their responses."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.loop = server.loop
        self.app = server.app
        # The app's way to answer a request whose body is all here without a task (Gateway.direct):
        # direct(request) -> True when it took the request.
        self.direct: Callable[[_Request], bool] | None = getattr(server.app, "direct", None)
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.client: tuple[str, int] | None = None
        self.local: tuple[str, int] | None = None
        self.current: _Request | None = None  # being answered
        self.parsing: _Request | None = None  # whose body is being parsed
        self.unstarted: _Request | None = None  # the current request, started once its body is here (or not yet)
        self.pending: deque[_Request] = deque()  # pipelined, waiting for their turn
        self.closing = False
        self.closed = False
        self.idle_since = self.loop.time()
        self.write_paused = False
        self.reading_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._error: bytes | None = None  # a 400 to send once the requests before it are answered
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._expect = False
        self._length = b""  # the Content-Length of the request being parsed
        self._upgraded = False

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.server.connections.add(self)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.client = (str(peer[0]), int(peer[1]))
        local = transport.get_extra_info("sockname")
        if isinstance(local, tuple) and len(local) >= 2:
            self.local = (str(local[0]), int(local[1]))

    def data_received(self, data: bytes) -> None:
        if self._error is not None or self._upgraded:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Not supported (no WebSocket): the request is answered as any other, then the connection ends.
            self._upgraded = True
            if self.parsing is not None:
                self.parsing.keep_alive = False
            if self.current is not None:
                self.current.keep_alive = False
            self._stop_reading()
        except httptools.HttpParserError as exc:
            self._bad_request(f"invalid HTTP request: {exc}")
        finally:
            request = self.unstarted
            if request is not None and not self._awaits_body(request):  # the app reads the body as it comes
                self.unstarted = None
                self._start(request)

    def _awaits_body(self, request: _Request) -> bool:
        """Whether ``request``, whose head is here, starts once its body is too (on_message_complete):
        a small body with a Content-Length, which clients often send right after the head (the
        proxy reads such a body whole before forwarding it anyway), and nothing that waits for
        the app first (Expect: 100-continue) nor a connection that stopped reading."""
        return (request.small_body and not request.expect and not request.disconnected and not self.reading_paused
                and not self._upgraded and self._error is None and not self.closed)

    # eof_received: not overridden, the transport closes; a client that half-closes its side is gone
    # (as with uvicorn): its request's receive() returns http.disconnect.

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drain()

    # -- llhttp callbacks ------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._expect = False
        self._length = b""

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length":
            self._length = value
        elif name == b"expect" and value.lower() == b"100-continue":
            self._expect = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        url = self._url
        if url[:1] == b"/":
            raw_path, _, query = url.partition(b"?")
        else:  # absolute-form (or "*"): what a proxy is sent
            parsed = httptools.parse_url(url)
            raw_path, query = parsed.path or b"/", parsed.query or b""
        raw_path = raw_path.partition(b"#")[0]
        path = raw_path.decode("latin-1")
        if "%" in path:
            path = unquote(path)
        scope: dict[str, Any] = {
            "type": "http", "asgi": _ASGI, "http_version": parser.get_http_version(), "server": self.local,
            "client": self.client, "scheme": "http", "method": parser.get_method().decode("latin-1"),
            "root_path": "", "path": path, "raw_path": raw_path, "query_string": query, "headers": self._headers,
        }
        request = _Request(self, scope, parser.should_keep_alive(), self._expect)
        length = self._length
        request.small_body = bool(length) and length.isdigit() and int(length) <= BODY_HIGH_WATER
        scope["extensions"] = {DISCONNECT_EXTENSION: request.notify_disconnect}
        self.parsing = request
        if self.current is None:
            self.current = request
            self.unstarted = request  # started at the end of its message, or of the data received
        else:
            self.pending.append(request)
            if len(self.pending) >= PIPELINE_LIMIT:
                self._stop_reading()

    def on_body(self, body: bytes) -> None:
        request = self.parsing
        if request is None or request.response_complete or request.disconnected:
            return  # answered already: what is left of its body is dropped
        request.body.append(body)
        request.body_size += len(body)
        if request.body_size > BODY_HIGH_WATER:
            self._stop_reading()
        request.wake()

    def on_message_complete(self) -> None:
        request = self.parsing
        self.parsing = None
        if request is not None:
            request.body_done = True
            if request is self.unstarted:
                self.unstarted = None
                self._start(request)
            else:
                request.wake()

    # -- requests --------------------------------------------------------------------------------

    def _run(self, request: _Request) -> None:
        self.current = request
        self._start(request)

    def _start(self, request: _Request) -> None:
        self.server.in_flight += 1
        if request.body_done and self.direct is not None and not request.disconnected:
            try:
                if self.direct(request):
                    return
            except Exception as exc:  # as a failed coroutine would be: a 500, logged
                self._failed(request, exc)
                self.direct_done(request)
                return
        request.task = self.loop.create_task(
            self.serve_coroutine(request, self.app(request.scope, request.receive, request.send)))

    def direct_done(self, request: _Request) -> None:
        """The app's direct path is through with ``request`` (see _Request.done)."""
        if not request.response_complete:  # its client went away
            request.keep_alive = False
            request.response_complete = True
            self.response_complete(request)
        self.server.in_flight -= 1
        if self.server.in_flight == 0:
            self.server.idle()

    def _failed(self, request: _Request, exc: BaseException) -> None:
        if not isinstance(exc, asyncio.CancelledError):
            log.error("exception in the gateway serving %s %s", request.scope["method"], request.scope["path"],
                      exc_info=exc)
        if not request.response_started and not request.disconnected:
            self.write(_json_error(500, "InternalError", "the gateway failed to answer; see its log"))
        request.keep_alive = False
        request.response_complete = True
        self.response_complete(request)

    async def serve_coroutine(self, request: _Request, coro: Any) -> None:
        """Run the app's coroutine for ``request``: a failure is a 500 (when nothing was sent yet)."""
        try:
            await coro
        except (Exception, asyncio.CancelledError) as exc:
            self._failed(request, exc)
        else:
            if not request.response_complete:
                if not request.response_started and not request.disconnected:
                    log.error("the gateway returned without answering %s %s", request.scope["method"],
                              request.scope["path"])
                    self.write(_json_error(500, "InternalError", "the gateway failed to answer; see its log"))
                request.keep_alive = False
                request.response_complete = True
                self.response_complete(request)
        finally:
            self.server.in_flight -= 1
            if self.server.in_flight == 0:
                self.server.idle()

    def response_complete(self, request: _Request) -> None:
        """``request``'s response is written whole: on to the next request, or the connection's end."""
        if request is not self.current:
            return
        self.current = None
        request.wake()  # a receive() waiting after the body: it returns http.disconnect
        self.idle_since = self.loop.time()
        if not request.keep_alive or self.closed:
            self._close()
            return
        if self.pending:
            self._run(self.pending.popleft())
        elif self._error is not None:
            self.write(self._error)
            self._close()
            return
        elif self.closing:
            self._close()
            return
        if self.reading_paused and len(self.pending) < PIPELINE_LIMIT and not self._upgraded and (
                self.parsing is None or self.parsing.body_size <= BODY_HIGH_WATER):
            self._start_reading()

    def body_taken(self) -> None:
        """The app took the buffered body: read more."""
        if self.reading_paused and len(self.pending) < PIPELINE_LIMIT and self._error is None and not self._upgraded:
            self._start_reading()

    def _bad_request(self, message: str) -> None:
        error = _json_error(400, "BadRequest", message)
        if self.parsing is not None and self.parsing is self.current:
            # Its head was valid, its body is not: the app sees the client go away.
            self.parsing.gone()
        self.parsing = None
        if self.current is None or self.current.disconnected:
            self.write(error)
            self._close()
        else:
            self._error = error  # after the requests before it
            self._stop_reading()

    def _lost(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.server.connections.discard(self)
        waiting, self.unstarted = self.unstarted, None
        for request in (self.current, *self.pending):
            if request is not None:
                request.gone()
        self.pending.clear()
        if waiting is not None:  # its body never came: the app sees the client go away, as any other
            self._start(waiting)
        self._wake_drain()
        if self.transport is not None:
            self.transport.close()
        self.server.idle()

    # -- transport -------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    async def drain(self) -> None:
        while self.write_paused and not self.closed:
            self._drain_waiter = self.loop.create_future()
            await self._drain_waiter

    def _wake_drain(self) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        wake(waiter)

    def _stop_reading(self) -> None:
        if not self.reading_paused and not self.closed and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def _start_reading(self) -> None:
        if self.reading_paused and not self.closed and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()

    def _close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()  # after what is buffered is written
        self._lost()

    def shutdown(self) -> None:
        """The server is stopping: close now if idle, else after the response in flight."""
        self.closing = True
        if self.current is None:
            self._close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self._lost()


class HttpServer:
    """Serves ``app`` on listening sockets until :meth:`request_stop` (or SIGINT/SIGTERM with :meth:`run`).

    ``app`` is an ASGI callable; when it has ``start``/``begin_shutdown``/``stop`` (the Gateway),
    they are called at start, when shutting down begins, and once the connections are drained.
    The attributes ``started`` and ``should_exit`` are those of uvicorn's server, which this replaces.
    """

    def __init__(self, app: ASGIApp, *, graceful_shutdown: float = 30.0, keep_alive: float = KEEP_ALIVE,
                 loop_impl: str = "auto") -> None:
        self.app = app
        self.graceful_shutdown = graceful_shutdown
        self.keep_alive = keep_alive
        self.loop_impl = loop_impl
        self.connections: set[ClientConnection] = set()
        self.in_flight = 0
        self.started = False
        self._should_exit = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._servers: list[asyncio.base_events.Server] = []
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "the server is not running"
        return self._loop

    # uvicorn's flag: set from any thread, the server stops (as on SIGTERM)
    @property
    def should_exit(self) -> bool:
        return self._should_exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._should_exit = value
        if value:
            self.request_stop()

    def request_stop(self) -> None:
        """Start the graceful shutdown (thread-safe)."""
        self._should_exit = True
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop has just closed
                if threading.current_thread() is threading.main_thread() and _running_loop() is loop:
                    stop.set()
                else:
                    loop.call_soon_threadsafe(stop.set)

    def run(self, sockets: list[socket.socket]) -> None:
        """Serve on ``sockets`` until stopped (blocking, on a loop of its own: uvloop when installed)."""
        runner = asyncio.Runner(loop_factory=_loop_factory(self.loop_impl))
        with runner:
            runner.run(self.serve(sockets))

    async def serve(self, sockets: list[socket.socket]) -> None:
        """Start the app, serve until stopped, drain, stop the app."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._idle = asyncio.Event()
        if self._should_exit:
            self._stop.set()
        installed = self._install_signals()
        start = getattr(self.app, "start", None)
        try:
            if start is not None:
                start()
            for sock in sockets:
                sock.setblocking(False)
                server = await self._loop.create_server(lambda: ClientConnection(self), sock=sock, backlog=2048)
                self._servers.append(server)
            self._sweeper = self._loop.call_later(SWEEP_INTERVAL, self._sweep)
            # What was made at start (modules, settings, the route table) lives as long as the process:
            # out of the collector's sight, the full collections that would stall requests for
            # milliseconds walking it are gone.
            gc.collect()
            gc.freeze()
            self.started = True
            await self._stop.wait()
        finally:
            await self._shutdown()
            for sig in installed:
                self._loop.remove_signal_handler(sig)

    async def _shutdown(self) -> None:
        for server in self._servers:
            server.close()
        begin = getattr(self.app, "begin_shutdown", None)
        if begin is not None:
            try:
                begin()  # held requests are answered now
            except Exception:
                log.exception("gateway shutdown failed")
        for conn in list(self.connections):
            conn.shutdown()
        if self.connections and self._idle is not None:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained(), self.graceful_shutdown)
        for conn in list(self.connections):
            conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()
        stop = getattr(self.app, "stop", None)
        if stop is not None:
            await stop()

    async def _drained(self) -> None:
        assert self._idle is not None
        while self.connections:
            await self._idle.wait()
            self._idle.clear()

    def idle(self) -> None:
        """A connection closed or a request ended (the shutdown waits for them)."""
        if self._idle is not None:
            self._idle.set()

    def _sweep(self) -> None:
        loop = self.loop
        idle_before = loop.time() - self.keep_alive
        for conn in list(self.connections):
            if conn.current is None and not conn.pending and conn.idle_since < idle_before:
                conn._close()
        self._sweeper = loop.call_later(SWEEP_INTERVAL, self._sweep)

    def _install_signals(self) -> list[signal.Signals]:
        if threading.current_thread() is not threading.main_thread():
            return []
        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                self.loop.add_signal_handler(sig, self.request_stop)
                installed.append(sig)
        return installed


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _loop_factory(loop_impl: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's loop when installed (``auto``) or asked for, else asyncio's."""
    if loop_impl in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if loop_impl == "uvloop":
                raise
        else:
            return cast(Callable[[], asyncio.AbstractEventLoop], uvloop.new_event_loop)
    return asyncio.new_event_loop


def uvloop_in_use(loop: asyncio.AbstractEventLoop) -> bool:
    return type(loop).__module__.startswith("uvloop")


__all__ = ["DISCONNECT_EXTENSION", "KEEP_ALIVE", "ClientConnection", "HttpServer", "uvloop_in_use"]
