"""The proxy: routing to deployments, forwarding and streaming both ways, retries during switches, hang-ups."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from modelfleet.reconciler.gateway.proxy import split_query
from modelfleet.reconciler.gateway.routes import Backend
from tests.http_server import bound_socket
from tests.reconciler.gateway.harness import PARSERS, MiB, route, who

pytestmark = pytest.mark.timeout(30)


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
    dead = bound_socket()  # bound, never listening: connections are refused
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



# -- units --------------------------------------------------------------------------------------------


def test_split_query() -> None:
    assert split_query(b"") == ("production", b"")
    assert split_query(b"a=1&b=2") == ("production", b"a=1&b=2")
    assert split_query(b"environment=staging") == ("staging", b"")
    assert split_query(b"a=1&environment=staging&environment=x&b=%20") == ("staging", b"a=1&b=%20")
    assert split_query(b"environment=&a=1") == ("production", b"a=1")

