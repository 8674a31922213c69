"""The gateway over real loopback HTTP: echo backends and the gateway run as uvicorn servers in threads."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from modelfleet.reconciler.config import parse_config
from modelfleet.reconciler.gateway.routes import ROUTES_DB, Backend, RouteStore
from modelfleet.reconciler.gateway.server import (
    Balancer,
    Gateway,
    GatewayError,
    _split_query,
    build_server,
    create_gateway,
    parse_listen,
)

pytestmark = pytest.mark.timeout(30)

# GATEWAY_TEST_HTTP=h11 GATEWAY_TEST_LOOP=asyncio runs everything without httptools/uvloop.
# GATEWAY_TEST_PARSER=h11 makes the gateway parse backend responses with h11 instead of httptools.
HTTP_IMPL = os.environ.get("GATEWAY_TEST_HTTP", "auto")
LOOP_IMPL = os.environ.get("GATEWAY_TEST_LOOP", "auto")
PARSER = os.environ.get("GATEWAY_TEST_PARSER", "auto")
# The backend response parsers, both exercised where it matters (httptools only when installed).
PARSERS = ["h11", *(["httptools"] if importlib.util.find_spec("httptools") else [])]
MiB = 1 << 20


def _bound_socket() -> socket.socket:
    # proto=IPPROTO_TCP, as getaddrinfo gives: asyncio only sets TCP_NODELAY on such sockets.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class ServerThread:
    """An uvicorn server in a daemon thread on a pre-bound loopback socket."""

    def __init__(self, server: uvicorn.Server) -> None:
        server.config.http = HTTP_IMPL
        server.config.loop = LOOP_IMPL
        self.server = server
        self.sock = _bound_socket()
        self.port: int = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 5
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)
        self.sock.close()


class EchoBackend:
    """A tiny inference server: answers with its name and what it received.

    ``/stream`` sends ``first`` and holds the rest until ``release`` is set; ``/slow?ms=N`` waits N ms.
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


def stop_all(servers: list[ServerThread]) -> None:
    """Stop servers in parallel (each one notices within uvicorn's 0.1 s tick)."""
    for server in servers:
        server.server.should_exit = True
    for server in servers:
        server.stop()


def start_backend(name: str) -> tuple[EchoBackend, ServerThread]:
    app = EchoBackend(name)
    config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False)
    return app, ServerThread(uvicorn.Server(config)).start()


@pytest.fixture
def servers() -> Iterator[list[ServerThread]]:
    """Every server a test starts, stopped at the end even when the test fails."""
    started: list[ServerThread] = []
    yield started
    stop_all(started)


@pytest.fixture
def backends(servers: list[ServerThread]) -> Callable[[str], tuple[EchoBackend, ServerThread]]:
    def make(name: str) -> tuple[EchoBackend, ServerThread]:
        app, server = start_backend(name)
        servers.append(server)
        return app, server

    return make


def route(server: ServerThread, name: str = "c") -> Backend:
    return Backend(url=server.url, container=name, host="local")


class GatewayUnderTest:
    def __init__(self, state_dir: Path, token: str | None = None, parser: str = PARSER) -> None:
        self.state_dir = state_dir
        self.store = RouteStore(state_dir)  # what the daemon does
        self.app = Gateway(state_dir, token=token, read_timeout=10, parser=parser)
        self.thread = ServerThread(build_server(self.app, "127.0.0.1", 0, log_level="warning",
                                                graceful_shutdown=2))
        self.url = self.thread.url
        self.client = httpx.Client(base_url=self.url, timeout=10)

    def publish(self, routes: dict[str, tuple[Backend, ...]]) -> int:
        return self.store.publish(routes)

    def wait_version(self, version: int, timeout: float = 2.0) -> float:
        started = time.monotonic()
        while self.app.table.version != version:
            if time.monotonic() - started > timeout:
                raise AssertionError(f"route table {version} not picked up (has {self.app.table.version})")
            time.sleep(0.005)
        return time.monotonic() - started

@pytest.fixture
def make_gateway(tmp_path: Path, servers: list[ServerThread]) -> Iterator[Callable[..., GatewayUnderTest]]:
    gateways: list[GatewayUnderTest] = []

    def make(routes: dict[str, tuple[Backend, ...]] | None = None, token: str | None = None,
             parser: str = PARSER) -> GatewayUnderTest:
        gateway = GatewayUnderTest(tmp_path / f"state{len(gateways)}", token, parser)
        gateways.append(gateway)
        if routes is not None:
            gateway.publish(routes)
        servers.append(gateway.thread)
        gateway.thread.start()
        return gateway

    yield make
    for gateway in gateways:
        gateway.client.close()
        gateway.store.close()


def who(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["backend"])


# -- routing ----------------------------------------------------------------------------------------


def test_routes_by_model_and_environment(backends: Any, make_gateway: Any) -> None:
    _, a = backends("a")
    _, b = backends("b")
    _, c = backends("c")
    gw = make_gateway({"sentiment/production": (route(a),), "sentiment/staging": (route(b),),
                       "embed/production": (route(c),)})
    assert who(gw.client.get("/models/sentiment/predict")) == "a"
    assert who(gw.client.get("/models/sentiment/predict?environment=production")) == "a"
    assert who(gw.client.get("/models/sentiment/predict?environment=staging")) == "b"
    assert who(gw.client.get("/models/embed/v1/embeddings")) == "c"
    assert who(gw.client.get("/models/embed")) == "c"


@pytest.mark.parametrize("parser", PARSERS)
def test_forwards_path_query_method_body_and_headers(backends: Any, make_gateway: Any, parser: str) -> None:
    _, a = backends("a")
    gw = make_gateway({"m/staging": (route(a),)}, parser=parser)
    response = gw.client.post(
        "/models/m/predictions/resnet%2F18?x=1&environment=staging&y=a%20b&x=2",
        content=b'{"inputs": [1, 2]}',
        headers={"X-Custom": "yes", "Content-Type": "application/json", "Connection": "keep-alive, X-Hop",
                 "X-Hop": "secret", "X-Forwarded-For": "10.1.2.3", "Authorization": "Bearer backend-own"})
    assert response.status_code == 200
    assert response.headers["x-backend"] == "a"
    echo = response.json()
    assert echo["method"] == "POST"
    assert echo["raw_path"] == "/predictions/resnet%2F18"
    assert echo["query"] == "x=1&y=a%20b&x=2"
    assert echo["body"] == '{"inputs": [1, 2]}'
    headers = echo["headers"]
    assert headers["x-custom"] == "yes"
    assert headers["content-type"] == "application/json"
    assert headers["host"] == f"127.0.0.1:{a.port}"
    assert headers["x-forwarded-for"] == "10.1.2.3, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == f"127.0.0.1:{gw.thread.port}"
    assert headers["authorization"] == "Bearer backend-own"  # no gateway token: passed through
    assert "x-hop" not in headers
    assert "keep-alive" not in headers.get("connection", "").lower() or "x-hop" not in headers
    for method in ("GET", "PUT", "DELETE", "PATCH", "OPTIONS"):
        assert gw.client.request(method, "/models/m/x?environment=staging").json()["method"] == method
    head = gw.client.head("/models/m/x?environment=staging")
    assert head.status_code == 200 and head.headers["x-backend"] == "a" and head.content == b""
    assert who(gw.client.get("/models/m/x?environment=staging")) == "a"  # still fine after a HEAD


@pytest.mark.parametrize(("framing", "parser"), [("chunked", PARSERS[-1]), ("content-length", PARSERS[0])])
def test_streams_a_large_request_body(backends: Any, make_gateway: Any, framing: str, parser: str) -> None:
    backend, a = backends("a")
    gw = make_gateway({"m/production": (route(a),)}, parser=parser)
    size = 20 * 1000 * 1000
    first = 2 * MiB
    streamed_before_end = threading.Event()

    def body() -> Iterator[bytes]:
        yield b"x" * first
        # The backend must see bytes before the client has sent the rest: the gateway streams.
        deadline = time.monotonic() + 5
        while backend.bytes_seen == 0 and time.monotonic() < deadline:
            time.sleep(0.002)
        if backend.bytes_seen:
            streamed_before_end.set()
        left = size - first
        while left:
            n = min(left, 256 * 1024)
            yield b"y" * n
            left -= n

    headers = {"Content-Length": str(size)} if framing == "content-length" else {}
    response = gw.client.post("/models/m/upload", content=body(), headers=headers)
    assert response.status_code == 200
    assert response.json()["body_len"] == size
    assert streamed_before_end.is_set(), "the gateway buffered the request body"
    assert backend.bytes_seen == size


@pytest.mark.parametrize("parser", PARSERS)
def test_streams_the_response(backends: Any, make_gateway: Any, parser: str) -> None:
    backend, a = backends("a")
    gw = make_gateway({"m/production": (route(a),)}, parser=parser)
    with gw.client.stream("GET", "/models/m/stream") as response:
        assert response.status_code == 200
        chunks = response.iter_raw()
        assert next(chunks) == b"first\n"  # arrives while the backend still holds the rest
        backend.release.set()
        assert b"".join(chunks) == b"second\n"


def test_unknown_deployment_is_404(backends: Any, make_gateway: Any) -> None:
    _, a = backends("a")
    gw = make_gateway({"m/production": (route(a),)})
    for path in ("/models/other/predict", "/models/m/predict?environment=staging"):
        response = gw.client.get(path)
        assert response.status_code == 404
        body = response.json()
        assert body["code"] == 404 and body["type"] == "DeploymentNotFound"
        assert "model" in body["message"]
    assert gw.client.get("/nothing-here").status_code == 404


def test_no_ready_backend_is_503_with_retry_after(make_gateway: Any) -> None:
    gw = make_gateway({"m/production": ()})
    response = gw.client.post("/models/m/predict", content=b"{}")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json()["type"] == "NoReadyBackend"


def test_spreads_load_least_outstanding_first(backends: Any, make_gateway: Any) -> None:
    backend_a, a = backends("a")
    _, b = backends("b")
    gw = make_gateway({"m/production": (route(a, "ca"), route(b, "cb"))})
    seen = [who(gw.client.get("/models/m/x")) for _ in range(20)]
    assert seen.count("a") == 10 and seen.count("b") == 10  # idle backends: round-robin

    # One slow request outstanding on a backend: the next ones all go to the other.
    slow = threading.Thread(target=lambda: gw.client.get("/models/m/slow?ms=300"))
    slow.start()
    try:
        deadline = time.monotonic() + 2
        while sum(gw.app.balancer.outstanding.values()) == 0 and time.monotonic() < deadline:
            time.sleep(0.002)
        busy = next(iter(gw.app.balancer.outstanding))
        idle = "b" if busy == a.url else "a"
        assert {who(gw.client.get("/models/m/x")) for _ in range(5)} == {idle}
    finally:
        slow.join(5)
    assert backend_a.requests > 0


def test_picks_up_a_new_table_quickly(backends: Any, make_gateway: Any) -> None:
    _, a = backends("a")
    _, b = backends("b")
    gw = make_gateway({"m/production": (route(a),)})
    assert who(gw.client.get("/models/m/x")) == "a"
    published = time.monotonic()
    gw.publish({"m/production": (route(b),)})
    while who(gw.client.get("/models/m/x")) != "b":
        assert time.monotonic() - published < 0.5, "new route table not picked up within 0.5 s"
        time.sleep(0.01)
    routes = gw.client.get("/routes").json()
    assert routes["version"] == 2
    assert [r["url"] for r in routes["routes"]["m/production"]] == [b.url]
    assert routes["age_seconds"] is not None and routes["age_seconds"] < 5


def test_keeps_the_last_table_when_routes_db_is_gone_or_corrupt(backends: Any, make_gateway: Any) -> None:
    _, a = backends("a")
    _, b = backends("b")
    gw = make_gateway({"m/production": (route(a),)})
    db = gw.state_dir / ROUTES_DB
    gw.store.close()  # the daemon is gone
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    time.sleep(0.25)
    assert who(gw.client.get("/models/m/x")) == "a"
    assert gw.client.get("/routes").json()["error"]

    db.write_bytes(b"this is not a database" * 100)
    time.sleep(0.25)
    assert who(gw.client.get("/models/m/x")) == "a"
    assert gw.app.table.version == 1
    assert "cannot read" in gw.client.get("/routes").json()["error"]
    metrics = gw.client.get("/metrics").text
    assert "modelfleet_gateway_route_table_read_failing 1.0" in metrics

    # A daemon that comes back with a fresh routes.db is followed again (versions restart at 1).
    db.unlink()
    gw.store = RouteStore(gw.state_dir)
    gw.publish({"m/production": (route(b),)})
    deadline = time.monotonic() + 2
    while who(gw.client.get("/models/m/x")) != "b":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert gw.client.get("/routes").json()["error"] is None
    assert "modelfleet_gateway_route_table_read_failing 0.0" in gw.client.get("/metrics").text


def test_starts_without_routes_db_and_follows_it_once_published(backends: Any, make_gateway: Any) -> None:
    _, a = backends("a")
    gw = make_gateway()
    (gw.state_dir / ROUTES_DB).unlink()
    gw.store.close()
    assert gw.client.get("/models/m/x").status_code == 404
    assert gw.client.get("/healthz").status_code == 200
    gw.store = RouteStore(gw.state_dir)
    gw.wait_version(gw.publish({"m/production": (route(a),)}))
    assert who(gw.client.get("/models/m/x")) == "a"


def test_bearer_token(backends: Any, make_gateway: Any) -> None:
    _, a = backends("a")
    gw = make_gateway({"m/production": (route(a),)}, token="s3cret-token")
    response = gw.client.get("/models/m/x")
    assert response.status_code == 401
    assert response.json()["type"] == "Unauthorized"
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert gw.client.get("/models/m/x", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert gw.client.get("/models/m/x", headers={"Authorization": "Basic s3cret-token"}).status_code == 401
    ok = gw.client.get("/models/m/x", headers={"Authorization": "Bearer s3cret-token"})
    assert who(ok) == "a"
    assert "authorization" not in ok.json()["headers"]  # the gateway's token stays at the gateway
    assert gw.client.get("/models/nope/x").status_code == 401  # no probing without the token
    assert gw.client.get("/healthz").status_code == 200
    assert gw.client.get("/metrics").status_code == 200
    assert gw.client.get("/routes").status_code == 401
    assert gw.client.get("/routes", headers={"Authorization": "bearer s3cret-token"}).status_code == 200


def test_blue_green_switch_loses_no_request(backends: Any, make_gateway: Any) -> None:
    _, a = backends("a")
    _, b = backends("b")
    gw = make_gateway({"m/production": (route(a, "blue"),)})
    failures: list[str] = []
    served: list[str] = []
    stop = threading.Event()

    def loop() -> None:
        with httpx.Client(base_url=gw.url, timeout=5) as client:
            while not stop.is_set():
                try:
                    response = client.post("/models/m/predict", content=b'{"x": 1}')
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text}")
                else:
                    served.append(response.json()["backend"])

    workers = [threading.Thread(target=loop) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        deadline = time.monotonic() + 3
        while served.count("a") < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        gw.publish({"m/production": (route(b, "green"),)})
        a.stop()  # the old replica goes away before the gateway's next poll
        time.sleep(0.3)
    finally:
        stop.set()
        for worker in workers:
            worker.join(5)
    assert not failures, failures[:5]
    assert served.count("a") >= 20 and served[-1] == "b"
    assert served.count("b") > 20


def test_retries_a_refused_backend_on_another_one(backends: Any, make_gateway: Any) -> None:
    _, b = backends("b")
    dead = _bound_socket()  # bound, never listening: connections are refused
    dead_url = f"http://127.0.0.1:{dead.getsockname()[1]}"
    try:
        gw = make_gateway({"m/production": (Backend(dead_url, "gone", "local"), route(b))})
        for _ in range(6):
            assert who(gw.client.post("/models/m/predict", content=b"{}")) == "b"
        # A body too large to buffer is streamed: still retried, since the refusal came before any
        # of it was read.
        for _ in range(4):
            response = gw.client.post("/models/m/predict", content=iter([b"z" * MiB] * 3),
                                      headers={"Content-Length": str(3 * MiB)})
            assert who(response) == "b" and response.json()["body_len"] == 3 * MiB
        metrics = gw.client.get("/metrics").text
        assert 'modelfleet_gateway_retries_total{environment="production",model="m"}' in metrics
        assert 'kind="connect"' in metrics

        # Only a dead backend: 502 after one retry.
        gw.wait_version(gw.publish({"m/production": (Backend(dead_url, "gone", "local"),)}))
        response = gw.client.get("/models/m/predict")
        assert response.status_code == 502
        assert response.json()["type"] == "BadGateway"
    finally:
        dead.close()


def test_client_disconnect_cancels_the_backend_request(backends: Any, make_gateway: Any) -> None:
    backend, a = backends("a")
    gw = make_gateway({"m/production": (route(a),)})
    with pytest.raises(httpx.ReadTimeout):
        gw.client.get("/models/m/slow?ms=3000", timeout=0.3)
    assert backend.cancelled.wait(2), "the backend request outlived the client"
    deadline = time.monotonic() + 2
    while gw.app.balancer.outstanding and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not gw.app.balancer.outstanding
    assert 'code="499"' in gw.client.get("/metrics").text


def test_metrics_healthz_and_routes(backends: Any, make_gateway: Any) -> None:
    _, a = backends("a")
    gw = make_gateway({"m/production": (route(a),), "m/staging": ()})
    gw.client.get("/models/m/x")
    gw.client.get("/models/m/x?environment=staging")
    gw.client.get("/models/unknown/x")
    assert gw.client.get("/healthz").json()["status"] == "ok"
    metrics = gw.client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'modelfleet_gateway_requests_total{code="200",environment="production",model="m"} 1.0' in text
    assert 'modelfleet_gateway_requests_total{code="503",environment="staging",model="m"} 1.0' in text
    assert 'modelfleet_gateway_requests_total{code="404",environment="",model=""} 1.0' in text
    assert 'modelfleet_gateway_request_duration_seconds_count{environment="production",model="m"} 1.0' in text
    assert "modelfleet_gateway_route_table_version 1.0" in text
    routes = gw.client.get("/routes").json()
    assert routes["version"] == 1
    assert routes["routes"]["m/staging"] == []
    assert routes["routes"]["m/production"][0] == {"url": a.url, "container": "c", "host": "local",
                                                    "outstanding": 0}


class RawBackend:
    """A hand-written HTTP server for the odd answers: ``/close-delimited`` (the body ends with the
    connection), ``/informational`` (100 Continue first), ``/garbage``, ``/hangup`` (no answer)."""

    def __init__(self) -> None:
        self.sock = _bound_socket()
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
            elif path.startswith(b"/garbage"):
                conn.sendall(b"THIS IS NOT HTTP\r\n\r\n")

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def raw_backend() -> Iterator[RawBackend]:
    backend = RawBackend()
    yield backend
    backend.stop()


@pytest.mark.parametrize("parser", PARSERS)
def test_odd_backend_answers(raw_backend: RawBackend, backends: Any, make_gateway: Any, parser: str) -> None:
    raw = Backend(raw_backend.url, "raw", "local")
    gw = make_gateway({"m/production": (raw,)}, parser=parser)
    response = gw.client.get("/models/m/close-delimited")
    assert response.status_code == 200 and response.text == "all of it, up to the end"
    response = gw.client.post("/models/m/informational", content=b"x")
    assert response.status_code == 200 and response.text == "ok"
    response = gw.client.get("/models/m/garbage")
    assert response.status_code == 502 and response.json()["type"] == "BadGateway"
    response = gw.client.get("/models/m/hangup")  # retried once on the same (only) backend, then 502
    assert response.status_code == 502

    _, b = backends("b")  # a backend that hangs up, another that answers: the retry saves the request
    gw.wait_version(gw.publish({"m/production": (raw, route(b))}))
    for _ in range(4):
        assert who(gw.client.get("/models/m/hangup")) == "b"


# -- units --------------------------------------------------------------------------------------------


def test_split_query() -> None:
    assert _split_query(b"") == ("production", b"")
    assert _split_query(b"a=1&b=2") == ("production", b"a=1&b=2")
    assert _split_query(b"environment=staging") == ("staging", b"")
    assert _split_query(b"a=1&environment=staging&environment=x&b=%20") == ("staging", b"a=1&b=%20")
    assert _split_query(b"environment=&a=1") == ("production", b"a=1")


def test_balancer_round_robin_and_least_outstanding() -> None:
    balancer = Balancer()
    pool = tuple(Backend(f"http://b{i}", f"c{i}", "h") for i in range(3))
    assert [balancer.pick("k", pool).url for _ in range(6)] == [b.url for b in pool * 2]
    balancer.acquire("http://b0")
    balancer.acquire("http://b1")
    assert {balancer.pick("k", pool).url for _ in range(4)} == {"http://b2"}
    assert balancer.pick("k", pool, avoid="http://b2").url in {"http://b0", "http://b1"}
    assert balancer.pick("k", pool[:1], avoid="http://b0").url == "http://b0"
    balancer.release("http://b0")
    balancer.release("http://b1")
    assert balancer.outstanding == {}


def test_parse_listen_and_config(tmp_path: Path) -> None:
    assert parse_listen("0.0.0.0:8080") == ("0.0.0.0", 8080)
    assert parse_listen("[::1]:9000") == ("::1", 9000)
    assert parse_listen(":80") == ("0.0.0.0", 80)
    with pytest.raises(GatewayError):
        parse_listen("localhost")
    token = tmp_path / "token"
    token.write_text("  abc \n")
    config = parse_config(f"stateDir: {tmp_path}/state\ngateway: {{listen: 127.0.0.1:0, tokenFile: token}}\n",
                          base_dir=tmp_path)
    app = create_gateway(config)
    assert app.follower.path == tmp_path / "state" / ROUTES_DB
    assert app._token == b"abc"
    missing = parse_config("gateway: {tokenFile: nope}\n", base_dir=tmp_path)
    with pytest.raises(GatewayError, match="tokenFile"):
        create_gateway(missing)
