"""The gateway under test over real loopback HTTP: echo backends (uvicorn) and the gateway (its server) in threads."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import uvicorn
from starlette.types import Receive, Scope, Send

from modelfleet.reconciler.daemon.tokens import TokenBook
from modelfleet.reconciler.gateway.app import Gateway
from modelfleet.reconciler.gateway.routes import Activation, Backend, RouteStore
from modelfleet.reconciler.gateway.server import build_server
from modelfleet.state.demand import DemandReply, DemandReport, WindowUsage
from modelfleet.state.token_limits import TokenLimits
from tests.http_server import ServerThread, bound_socket

# GATEWAY_TEST_HTTP=h11 GATEWAY_TEST_LOOP=asyncio runs the backends without httptools/uvloop, and the
# gateway on asyncio's loop (its own server always parses requests with httptools).
# GATEWAY_TEST_PARSER=h11 makes the gateway parse backend responses with h11 instead of httptools.
HTTP_IMPL = os.environ.get("GATEWAY_TEST_HTTP", "auto")
LOOP_IMPL = os.environ.get("GATEWAY_TEST_LOOP", "auto")
PARSER = os.environ.get("GATEWAY_TEST_PARSER", "auto")
# The backend response parsers, both exercised where it matters (httptools only when installed).
PARSERS = ["h11", *(["httptools"] if importlib.util.find_spec("httptools") else [])]
MiB = 1 << 20


def serve(server: uvicorn.Server) -> ServerThread:
    """A server thread for ``server``, on the HTTP and loop implementations chosen above."""
    server.config.http = HTTP_IMPL
    server.config.loop = LOOP_IMPL
    return ServerThread(server)


class EchoBackend:
    """A tiny inference server: answers with its name and what it received.

    ``/stream`` sends ``first`` and holds the rest until ``release`` is set; ``/slow?ms=N`` waits N ms;
    ``/big?bytes=N`` answers N bytes;
    ``/usage?in=N&out=M`` answers like an OpenAI API, with ``usage`` (``/usage-stream``: as an event
    stream whose last event has it).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.bytes_seen = 0
        self.requests = 0
        self.release = threading.Event()
        self.cancelled = threading.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        self.requests += 1
        path: str = scope["path"]
        query: bytes = scope["query_string"]
        total = 0
        head = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunk: bytes = message.get("body", b"")
            total += len(chunk)
            self.bytes_seen += len(chunk)
            if len(head) < 4096:
                head += chunk[:4096]
            if not message.get("more_body", False):
                break
        if path == "/stream":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"first\n", "more_body": True})
            deadline = time.monotonic() + 5
            while not self.release.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            rest = b"second\n" if self.release.is_set() else b"held-back\n"
            await send({"type": "http.response.body", "body": rest, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        if path == "/slow":  # wait, unless the caller hangs up
            sleeper = asyncio.ensure_future(asyncio.sleep(int(query.decode().partition("=")[2]) / 1000))
            hangup = asyncio.ensure_future(receive())
            await asyncio.wait({sleeper, hangup}, return_when=asyncio.FIRST_COMPLETED)
            if hangup.done():
                sleeper.cancel()
                self.cancelled.set()
                return
            hangup.cancel()
        if path == "/big":  # ?bytes=N of body, in 64 KiB messages
            size = int(query.decode().partition("=")[2])
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"application/octet-stream"), (b"content-length", str(size).encode())]})
            block = bytes(range(256)) * 256
            for start in range(0, size, len(block)):
                await send({"type": "http.response.body", "body": block[:size - start], "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        if path in ("/usage", "/usage-stream"):
            await self._usage(send, dict(parse_qsl(query.decode())), stream=path == "/usage-stream")
            return
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        payload = json.dumps({
            "backend": self.name, "method": scope["method"], "path": path,
            "raw_path": scope["raw_path"].decode(), "query": query.decode(), "body_len": total,
            "body": bytes(head[:200]).decode("latin-1"), "headers": headers,
        }).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
            (b"x-backend", self.name.encode())]})
        await send({"type": "http.response.body", "body": payload})


    async def _usage(self, send: Send, query: dict[str, str], stream: bool) -> None:
        prompt, completion = int(query.get("in", "0")), int(query.get("out", "0"))
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        if stream:
            chunks = [b'data: {"choices": [{"delta": {"content": "hi"}}], "usage": null}\n\n',
                      b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n",
                      b"data: [DONE]\n\n"]
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        payload = json.dumps({"object": "list", "backend": self.name, "usage": usage}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


def stop_all(servers: list[ServerThread]) -> None:
    """Stop servers in parallel (each one notices within uvicorn's 0.1 s tick)."""
    for server in servers:
        server.server.should_exit = True
    for server in servers:
        server.stop()


def start_backend(name: str) -> tuple[EchoBackend, ServerThread]:
    app = EchoBackend(name)
    config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False)
    return app, serve(uvicorn.Server(config)).start()


def route(server: ServerThread, name: str = "c") -> Backend:
    return Backend(url=server.url, container=name, host="local")


class GatewayUnderTest:
    """``options``: more arguments of :class:`Gateway` (``control_plane``, ``hold_body_limit``...)."""

    def __init__(self, state_dir: Path, token: str | None = None, parser: str = PARSER, **options: Any) -> None:
        self.state_dir = state_dir
        self.store = RouteStore(state_dir)  # what the daemon does
        options.setdefault("read_timeout", 10)
        self.app = Gateway(state_dir, token=token, parser=parser, **options)
        self.thread = ServerThread(build_server(self.app, graceful_shutdown=2, loop=LOOP_IMPL))
        self.url = self.thread.url
        self.client = httpx.Client(base_url=self.url, timeout=10)

    def publish(self, routes: dict[str, tuple[Backend, ...]], activation: dict[str, Activation] | None = None,
                tokens: dict[str, TokenLimits] | None = None) -> int:
        return self.store.publish(routes, activation=activation, tokens=tokens)

    def wait_version(self, version: int, timeout: float = 2.0) -> float:
        started = time.monotonic()
        while self.app.table.version != version:
            if time.monotonic() - started > timeout:
                raise AssertionError(f"route table {version} not picked up (has {self.app.table.version})")
            time.sleep(0.005)
        return time.monotonic() - started


def who(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["backend"])


class RawBackend:
    """A hand-written HTTP server for the odd answers: ``/close-delimited`` (the body ends with the
    connection), ``/informational`` (100 Continue first), ``/bare-lf`` (LF-only header lines),
    ``/garbage``, ``/hangup`` (no answer)."""

    def __init__(self) -> None:
        self.sock = bound_socket()
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    @staticmethod
    def _handle(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            path = data.split(b" ", 2)[1]
            if path.startswith(b"/close-delimited"):
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n"
                             b"all of it, up to the end")
            elif path.startswith(b"/informational"):
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                conn.recv(1)  # keep the connection until the gateway closes it
            elif path.startswith(b"/bare-lf"):
                # What a busybox httpd CGI sends: header lines ending in a bare LF (nginx accepts it).
                conn.sendall(b"HTTP/1.1 200 OK\ncontent-type: text/plain\ncontent-length: 7\nx-cgi: yes\n\nfrom sh")
            elif path.startswith(b"/garbage"):
                conn.sendall(b"THIS IS NOT HTTP\r\n\r\n")

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(2)
        self.sock.close()


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    """Poll ``predicate`` until it is true (a generous bound: the test is not about time)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class InBackground:
    """One request made from a thread (it is held): ``result()`` waits for its response or error."""

    def __init__(self, url: str, method: str, path: str, **options: Any) -> None:
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                with httpx.Client(base_url=url, timeout=options.pop("timeout", 20), trust_env=False) as client:
                    self.response = client.request(method, path, **options)
            except BaseException as exc:  # handed to the test
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self, timeout: float = 20.0) -> httpx.Response:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the request is still waiting"
        if self.error is not None:
            raise self.error
        assert self.response is not None
        return self.response


class DemandServer:
    """Stands in for the daemon's API: records the demand reports POSTed to /api/v1/demand.

    Answers 401 to a request without ``Authorization: Bearer <token>`` (when ``token`` is set) and
    422 to a body that is not a valid DemandReport (recorded in ``invalid``).
    """

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        # Set: answered like the daemon (202, a DemandReply with these token sums), else 204 without a body.
        self.reply_tokens: dict[str, dict[str, WindowUsage]] | None = None
        # Set: sums the reports' tokens like the daemon (its TokenBook) and answers with these keys' sums.
        self.token_book: TokenBook | None = None
        self.limited: list[str] = []
        self.reports: list[DemandReport] = []
        self.authorizations: list[str | None] = []
        self.invalid: list[str] = []
        self.refused = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        authorization = headers.get("authorization")
        self.authorizations.append(authorization)
        if scope["path"] != "/api/v1/demand" or scope["method"] != "POST":
            status = 404
        elif self.token is not None and authorization != f"Bearer {self.token}":
            self.refused += 1
            status = 401
        else:
            try:
                report = DemandReport.model_validate_json(body)
                self.reports.append(report)
                status = 204
                if self.token_book is not None:
                    self.token_book.record(report.gateway, report.tokens)
                    self.reply_tokens = self.token_book.reply(self.limited)
            except ValueError as exc:
                self.invalid.append(str(exc))
                status = 422
        if status == 204 and self.reply_tokens is not None:
            reply = DemandReply(tokens=self.reply_tokens).model_dump_json().encode()
            await send({"type": "http.response.start", "status": 202, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(reply)).encode())]})
            await send({"type": "http.response.body", "body": reply})
            return
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    def with_key(self, key: str) -> list[DemandReport]:
        return [r for r in self.reports if key in r.deployments]
