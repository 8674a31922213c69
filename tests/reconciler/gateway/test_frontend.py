"""The gateway's own HTTP/1.1 server (gateway/frontend.py), spoken to over raw sockets.

Keep-alive, pipelining, chunked request bodies, Expect: 100-continue, malformed requests, clients
that go away mid-response, HTTP/1.0, and the graceful shutdown that lets requests in flight finish.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

import pytest

from tests.reconciler.gateway.harness import InBackground, route, wait_for

pytestmark = pytest.mark.timeout(30)
KEY = "m/production"


def connect(gw: Any) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gw.thread.port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class Reader:
    """Reads HTTP/1.1 responses off a socket (Content-Length, chunked, or up to the close)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            if not self._fill():
                raise EOFError("connection closed")
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def _exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not self._fill():
                raise EOFError("connection closed")
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def response(self, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        status = int(self._line().split(b" ", 2)[1])
        headers: dict[str, str] = {}
        while line := self._line():
            name, _, value = line.partition(b":")
            headers[name.decode().lower()] = value.decode().strip()
        if head_only or status < 200:
            return status, headers, b""
        if "content-length" in headers:
            return status, headers, self._exactly(int(headers["content-length"]))
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while size := int(self._line(), 16):
                body += self._exactly(size)
                self._exactly(2)
            self._exactly(2)
            return status, headers, body
        while self._fill():
            pass
        body, self.buffer = self.buffer, b""
        return status, headers, body

    def closed(self) -> bool:
        """True when the server closed the connection (nothing more was sent)."""
        self.sock.settimeout(5)
        try:
            return not self.buffer and not self._fill()
        except ConnectionResetError:
            return True


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nhost: gw\r\ncontent-length: {len(body)}\r\n{extra}\r\n").encode() + body


def test_keeps_the_connection_alive_across_requests(backends: Any, make_gateway: Any) -> None:
    app, a = backends("a")
    gw = make_gateway({KEY: (route(a),)})
    with connect(gw) as sock:
        reader = Reader(sock)
        for n in range(3):
            sock.sendall(post("/models/m/predict", f'{{"n": {n}}}'.encode()))
            status, headers, body = reader.response()
            assert status == 200
            assert json.loads(body)["body"] == f'{{"n": {n}}}'
            assert headers.get("connection") != "close"
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: gw\r\n\r\n")
        status, _, body = reader.response()
        assert status == 200 and json.loads(body)["status"] == "ok"
    assert app.requests == 3


def test_pipelined_requests_are_answered_in_order(backends: Any, make_gateway: Any) -> None:
    _, a = backends("a")
    gw = make_gateway({KEY: (route(a),)})
    with connect(gw) as sock:
        # The first one takes longest: answers must still come in the order of the requests.
        sock.sendall(b"GET /models/m/slow?ms=150 HTTP/1.1\r\nhost: gw\r\n\r\n"
                     + post("/models/m/second", b"2") + b"GET /models/m/third HTTP/1.1\r\nhost: gw\r\n\r\n"
                     + b"GET /healthz HTTP/1.1\r\nhost: gw\r\n\r\n")
        reader = Reader(sock)
        paths = []
        for _ in range(3):
            status, _, body = reader.response()
            assert status == 200
            paths.append(json.loads(body)["path"])
        assert paths == ["/slow", "/second", "/third"]
        status, _, body = reader.response()
        assert status == 200 and "route_table_version" in json.loads(body)


def test_chunked_request_bodies_are_decoded_and_forwarded(backends: Any, make_gateway: Any) -> None:
    _, a = backends("a")
    gw = make_gateway({KEY: (route(a),)})
    with connect(gw) as sock:
        reader = Reader(sock)
        sock.sendall(b"POST /models/m/predict HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: chunked\r\n\r\n")
        for part in (b"hello ", b"chunked ", b"world"):
            sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
            time.sleep(0.01)
        sock.sendall(b"0\r\n\r\n")
        status, _, body = reader.response()
        echo = json.loads(body)
        assert status == 200
        assert echo["body"] == "hello chunked world" and echo["body_len"] == 19
        sock.sendall(post("/models/m/after", b"x"))  # the connection is still usable
        assert reader.response()[0] == 200


def test_expect_100_continue(backends: Any, make_gateway: Any) -> None:
    _, a = backends("a")
    gw = make_gateway({KEY: (route(a),)})
    with connect(gw) as sock:
        reader = Reader(sock)
        sock.sendall(b"POST /models/m/predict HTTP/1.1\r\nhost: gw\r\ncontent-length: 4\r\n"
                     b"expect: 100-continue\r\n\r\n")
        assert reader.response()[0] == 100  # asked for before the body is sent
        sock.sendall(b"ping")
        status, _, body = reader.response()
        assert status == 200 and json.loads(body)["body"] == "ping"
        assert "expect" not in json.loads(body)["headers"]


@pytest.mark.parametrize("garbage", [b"NOT HTTP AT ALL\r\n\r\n", b"GET / HTTP/1.1\r\nbad header line\r\n\r\n",
                                     b"POST /models/m/p HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"])
def test_a_malformed_request_is_400_and_closes_the_connection(make_gateway: Any, garbage: bytes) -> None:
    gw = make_gateway({})
    with connect(gw) as sock:
        sock.sendall(garbage)
        reader = Reader(sock)
        status, headers, body = reader.response()
        assert status == 400
        assert headers["connection"] == "close"
        error = json.loads(body)
        assert error["code"] == 400 and error["type"] == "BadRequest" and "invalid HTTP request" in error["message"]
        assert reader.closed()
    assert gw.client.get("/healthz").status_code == 200  # the server goes on


def test_a_malformed_request_after_a_good_one_is_answered_after_it(backends: Any, make_gateway: Any) -> None:
    _, a = backends("a")
    gw = make_gateway({KEY: (route(a),)})
    with connect(gw) as sock:
        sock.sendall(b"GET /models/m/slow?ms=100 HTTP/1.1\r\nhost: gw\r\n\r\nBROKEN\r\n\r\n")
        reader = Reader(sock)
        status, _, body = reader.response()
        assert status == 200 and json.loads(body)["path"] == "/slow"
        assert reader.response()[0] == 400
        assert reader.closed()


def test_a_client_going_away_mid_response_frees_the_backend(backends: Any, make_gateway: Any) -> None:
    app, a = backends("a")
    gw = make_gateway({KEY: (route(a),)})
    with connect(gw) as sock:
        sock.sendall(b"GET /models/m/stream HTTP/1.1\r\nhost: gw\r\n\r\n")
        status, headers, _ = Reader(sock).response(head_only=True)
        assert status == 200 and headers["transfer-encoding"] == "chunked"  # the head came before the body ended
        wait_for(lambda: gw.app.balancer.outstanding.get(a.url) == 1, "the request in flight")
    # The client is gone: the exchange ends (499), the backend connection is dropped, not waited for.
    wait_for(lambda: not gw.app.balancer.outstanding, "the backend released")
    wait_for(lambda: 'code="499"' in gw.client.get("/metrics").text, "the 499 of the client that left")
    app.release.set()
    assert who_answers(gw) == "a"


def who_answers(gw: Any) -> str:
    response = gw.client.get("/models/m/predict")
    assert response.status_code == 200
    return str(response.json()["backend"])


def test_http_1_0_gets_its_connection_closed(backends: Any, make_gateway: Any) -> None:
    _, a = backends("a")
    gw = make_gateway({KEY: (route(a),)})
    with connect(gw) as sock:
        sock.sendall(b"GET /models/m/predict HTTP/1.0\r\n\r\n")
        reader = Reader(sock)
        status, headers, body = reader.response()
        assert status == 200 and json.loads(body)["backend"] == "a"
        assert headers["connection"] == "close"
        assert reader.closed()


def test_connection_close_is_honoured(backends: Any, make_gateway: Any) -> None:
    _, a = backends("a")
    gw = make_gateway({KEY: (route(a),)})
    with connect(gw) as sock:
        sock.sendall(b"GET /models/m/predict HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n")
        reader = Reader(sock)
        status, headers, _ = reader.response()
        assert status == 200 and headers["connection"] == "close"
        assert reader.closed()


def test_head_requests_get_no_body(backends: Any, make_gateway: Any) -> None:
    _, a = backends("a")
    gw = make_gateway({KEY: (route(a),)})
    with connect(gw) as sock:
        sock.sendall(b"HEAD /models/m/predict HTTP/1.1\r\nhost: gw\r\n\r\nGET /healthz HTTP/1.1\r\nhost: gw\r\n\r\n")
        reader = Reader(sock)
        status, headers, _ = reader.response(head_only=True)
        assert status == 200 and int(headers["content-length"]) > 0
        status, _, body = reader.response()  # the next response follows at once: no body bytes in between
        assert status == 200 and json.loads(body)["status"] == "ok"


def test_shutdown_lets_requests_in_flight_finish(backends: Any, make_gateway: Any) -> None:
    _, a = backends("a")
    gw = make_gateway({KEY: (route(a),)})
    idle = connect(gw)  # a kept-alive connection with nothing in flight: closed at once
    idle.sendall(b"GET /healthz HTTP/1.1\r\nhost: gw\r\n\r\n")
    idle_reader = Reader(idle)
    assert idle_reader.response()[0] == 200
    slow = InBackground(gw.url, "GET", "/models/m/slow?ms=600")
    wait_for(lambda: gw.app.balancer.outstanding.get(a.url) == 1, "the request in flight")
    stopping = threading.Thread(target=gw.thread.stop, kwargs={"timeout": 10})
    stopping.start()
    assert idle_reader.closed()
    wait_for(lambda: refused(gw.thread.port), "the listening socket closed")
    response = slow.result()
    assert response.status_code == 200 and response.json()["path"] == "/slow"
    assert response.headers["connection"] == "close"
    stopping.join(10)
    assert not gw.thread.thread.is_alive()
    idle.close()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False
