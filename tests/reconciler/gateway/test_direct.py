"""The proxy's direct path (Proxy.direct): requests whose body is all here, forwarded from the
protocols' callbacks on a kept-alive backend connection, and what it hands over to the ordinary path.

Each test warms the gateway's connection pool first (one request), so that what follows takes the
direct path; the counters of the proxy tell which path answered.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

import httpx
import pytest

from modelfleet.reconciler.gateway.routes import Backend
from tests.http_server import bound_socket
from tests.reconciler.gateway.harness import route, wait_for, who
from tests.reconciler.gateway.test_frontend import Reader, connect, post

pytestmark = pytest.mark.timeout(30)
KEY = "m/production"


def warm(gw: Any) -> None:
    assert who(gw.client.post("/models/m/warm", content=b"{}")) in ("a", "b")


def test_a_whole_response_is_answered_without_a_task_and_forwarded_alike(backends: Any, make_gateway: Any) -> None:
    _, a = backends("a")
    gw = make_gateway({KEY: (route(a),)})
    warm(gw)
    proxy = gw.app.proxy
    answered = proxy.direct_answered
    response = gw.client.post("/models/m/predict?x=1", content=b'{"inputs": 1}',
                              headers={"X-Custom": "yes", "X-Request-Id": "direct-1"})
    assert response.status_code == 200 and response.headers["x-request-id"] == "direct-1"
    echo = response.json()
    assert echo["body"] == '{"inputs": 1}' and echo["query"] == "x=1" and echo["path"] == "/predict"
    assert echo["headers"]["x-custom"] == "yes" and echo["headers"]["x-request-id"] == "direct-1"
    assert echo["headers"]["x-forwarded-proto"] == "http" and echo["headers"]["content-length"] == "13"
    wait_for(lambda: proxy.direct_answered == answered + 1, "the request answered on the direct path")
    assert not gw.app.balancer.outstanding
    wait_for(lambda: 'modelfleet_gateway_requests_total{code="200",environment="production",model="m"} 2.0'
             in gw.client.get("/metrics").text, "both requests counted")


def test_pipelined_requests_on_the_direct_path_are_answered_in_order(backends: Any, make_gateway: Any) -> None:
    _, a = backends("a")
    gw = make_gateway({KEY: (route(a),)})
    warm(gw)
    with connect(gw) as sock:
        sock.sendall(b"".join(post(f"/models/m/p{n}", b"%d" % n) for n in range(5))
                     + b"HEAD /models/m/head HTTP/1.1\r\nhost: gw\r\n\r\n" + post("/models/m/last", b"z"))
        reader = Reader(sock)
        paths = [json.loads(reader.response()[2])["path"] for _ in range(5)]
        status, headers, _ = reader.response(head_only=True)
        assert status == 200 and int(headers["content-length"]) > 0  # no body bytes follow a HEAD's head
        assert json.loads(reader.response()[2])["path"] == "/last"
    assert paths == [f"/p{n}" for n in range(5)]
    assert gw.app.proxy.direct_answered >= 3


def test_a_streamed_response_is_relayed_as_it_comes_and_its_client_going_away_frees_the_backend(
        backends: Any, make_gateway: Any) -> None:
    app, a = backends("a")
    gw = make_gateway({KEY: (route(a),)})
    warm(gw)
    handed = gw.app.proxy.direct_handed_over
    with connect(gw) as sock:
        sock.sendall(b"GET /models/m/stream HTTP/1.1\r\nhost: gw\r\n\r\n")
        reader = Reader(sock)
        status, headers, _ = reader.response(head_only=True)
        assert status == 200 and headers["transfer-encoding"] == "chunked"
        assert reader._line() == b"6" and reader._line() == b"first\n"  # before the backend sent the rest
        wait_for(lambda: gw.app.balancer.outstanding.get(a.url) == 1, "the request in flight")
    wait_for(lambda: not gw.app.balancer.outstanding, "the backend released")
    wait_for(lambda: 'code="499"' in gw.client.get("/metrics").text, "the 499 of the client that left")
    assert gw.app.proxy.direct_handed_over == handed  # relayed from the callbacks
    app.release.set()
    warm(gw)  # the connection of the request cut short was not reused
    handed = gw.app.proxy.direct_handed_over
    response = gw.client.get("/models/m/stream")  # streamed whole to a client that stays
    assert response.status_code == 200 and response.text == "first\nsecond\n"
    assert gw.app.proxy.direct_handed_over == handed


def test_a_client_slower_than_the_backend_gets_the_rest_from_a_task(backends: Any, make_gateway: Any) -> None:
    _, a = backends("a")
    gw = make_gateway({KEY: (route(a),)})
    warm(gw)
    handed = gw.app.proxy.direct_handed_over
    size = 24 << 20
    with connect(gw) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.sendall(b"GET /models/m/big?bytes=%d HTTP/1.1\r\nhost: gw\r\n\r\n" % size)
        reader = Reader(sock)
        status, headers, _ = reader.response(head_only=True)
        assert status == 200 and int(headers["content-length"]) == size
        wait_for(lambda: gw.app.proxy.direct_handed_over == handed + 1, "the relay handed to a task")
        body = reader._exactly(size)
        assert body[:512] == bytes(range(256)) * 2 and body[-1] == 255
        sock.sendall(b"GET /models/m/after HTTP/1.1\r\nhost: gw\r\n\r\n")  # kept alive
        assert json.loads(reader.response()[2])["path"] == "/after"
    wait_for(lambda: not gw.app.balancer.outstanding, "the backend released")


def test_a_client_going_away_while_the_backend_works_cancels_it(backends: Any, make_gateway: Any) -> None:
    backend, a = backends("a")
    gw = make_gateway({KEY: (route(a),)})
    warm(gw)
    handed = gw.app.proxy.direct_handed_over
    with pytest.raises(httpx.ReadTimeout):
        gw.client.get("/models/m/slow?ms=3000", timeout=0.3)
    assert backend.cancelled.wait(2), "the backend request outlived the client"
    wait_for(lambda: not gw.app.balancer.outstanding, "the backend released")
    assert gw.app.proxy.direct_handed_over == handed  # it was waiting on the direct path
    assert 'code="499"' in gw.client.get("/metrics").text
    assert who(gw.client.get("/models/m/after")) == "a"


class OneAnswerBackend:
    """Answers the first request of each connection (kept alive), then closes it when the next one
    comes, without answering: a kept-alive connection that fails before any response byte."""

    def __init__(self) -> None:
        self.sock = bound_socket()
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stopped = threading.Event()
        self.requests = 0
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

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            self.requests += 1
            body = json.dumps({"backend": "once"}).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                         % (len(body), body))
            conn.recv(65536)  # the next request: hung up on

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(2)
        self.sock.close()


def test_a_kept_alive_connection_failing_before_the_response_is_retried_on_another_backend(
        backends: Any, make_gateway: Any) -> None:
    _, b = backends("b")
    once = OneAnswerBackend()
    try:
        gw = make_gateway({KEY: (route(b),)})
        warm(gw)
        gw.wait_version(gw.publish({KEY: (route(b), Backend(once.url, "once", "local"))}))
        seen = [who(gw.client.post("/models/m/predict", content=b"{}")) for _ in range(6)]
        assert "once" in seen and "b" in seen  # round-robin: both answered once they had a connection
        assert once.requests >= 2  # ... and "once" hung up on a kept-alive connection: retried, on b
        metrics = gw.client.get("/metrics").text
        assert 'modelfleet_gateway_retries_total{environment="production",model="m"}' in metrics
        assert 'kind="protocol"' in metrics
        assert not gw.app.balancer.outstanding
    finally:
        once.stop()


def test_a_small_body_sent_after_its_head_is_waited_for_and_forwarded_directly(
        backends: Any, make_gateway: Any) -> None:
    _, a = backends("a")
    gw = make_gateway({KEY: (route(a),)})
    warm(gw)
    answered = gw.app.proxy.direct_answered
    with connect(gw) as sock:
        sock.sendall(b"POST /models/m/late HTTP/1.1\r\nhost: gw\r\ncontent-length: 5\r\n\r\n")
        time.sleep(0.05)  # as clients that write the head and the body apart
        sock.sendall(b"hello")
        status, _, body = Reader(sock).response()
    assert status == 200 and json.loads(body)["body"] == "hello"
    wait_for(lambda: gw.app.proxy.direct_answered == answered + 1, "the request answered on the direct path")


def test_a_client_gone_before_its_small_body_came_is_counted_as_499(backends: Any, make_gateway: Any) -> None:
    app, a = backends("a")
    gw = make_gateway({KEY: (route(a),)})
    warm(gw)
    with connect(gw) as sock:
        sock.sendall(b"POST /models/m/never HTTP/1.1\r\nhost: gw\r\ncontent-length: 5\r\n\r\nhel")
        time.sleep(0.05)
    wait_for(lambda: 'code="499"' in gw.client.get("/metrics").text, "the 499 of the client that left")
    assert app.requests == 1  # only the warm-up reached the backend
    assert not gw.app.balancer.outstanding
