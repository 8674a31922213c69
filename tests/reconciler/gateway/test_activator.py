"""Activation: requests for a serverless deployment without a ready replica are held until one is published."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from modelfleet.reconciler.gateway.routes import Activation, Backend
from tests.http_server import bound_socket
from tests.reconciler.gateway.harness import InBackground, MiB, route, wait_for, who

pytestmark = pytest.mark.timeout(30)

KEY = "m/production"


def held(gw: Any, count: int) -> None:
    wait_for(lambda: gw.app.activator.held(KEY) == count, f"{count} held request(s)")


def test_a_held_request_goes_to_the_replica_published_later(backends: Any, make_gateway: Any) -> None:
    _, a = backends("a")
    gw = make_gateway({KEY: ()}, activation={KEY: Activation(queue=10, timeout=20)})
    payload = json.dumps({"inputs": ["a cold start", 1, 2.5], "parameters": {"top_k": 3}}).encode()
    request = InBackground(gw.url, "POST", "/models/m/predict?x=1", content=payload,
                           headers={"content-type": "application/json"})
    held(gw, 1)
    routes = gw.client.get("/routes").json()
    assert routes["activation"][KEY] == {"queue": 10, "timeout": 20.0, "held": 1}
    metrics = gw.client.get("/metrics").text
    assert 'modelfleet_gateway_activation_held_requests{environment="production",model="m"} 1.0' in metrics

    request.thread.join(0.5)  # the replica takes a while to start
    assert request.thread.is_alive()
    gw.publish({KEY: (route(a),)}, activation={KEY: Activation(queue=10, timeout=20)})
    response = request.result()
    assert who(response) == "a"
    echo = response.json()
    assert echo["body"].encode() == payload and echo["body_len"] == len(payload)  # the body, intact
    assert echo["method"] == "POST" and echo["query"] == "x=1"
    assert echo["headers"]["content-type"] == "application/json"
    assert gw.app.activator.held(KEY) == 0

    metrics = gw.client.get("/metrics").text
    assert 'modelfleet_gateway_activations_total{environment="production",model="m"} 1.0' in metrics
    assert 'modelfleet_gateway_activation_hold_duration_seconds_count{environment="production",model="m"} 1.0' \
        in metrics
    assert 'modelfleet_gateway_activation_held_requests{environment="production",model="m"} 0.0' in metrics
    assert 'modelfleet_gateway_requests_total{code="200",environment="production",model="m"} 1.0' in metrics
    # Ready now: the next requests are not held.
    assert who(gw.client.post("/models/m/predict", content=payload)) == "a"
    assert 'modelfleet_gateway_activations_total{environment="production",model="m"} 1.0' in \
        gw.client.get("/metrics").text


def test_a_full_queue_is_503_with_retry_after(backends: Any, make_gateway: Any) -> None:
    _, a = backends("a")
    activation = {KEY: Activation(queue=2, timeout=20)}
    gw = make_gateway({KEY: ()}, activation=activation)
    first = [InBackground(gw.url, "POST", "/models/m/predict", content=b'{"n": %d}' % i) for i in range(2)]
    held(gw, 2)
    response = gw.client.post("/models/m/predict", content=b'{"n": 3}')
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    body = response.json()
    assert body["code"] == 503 and body["type"] == "ActivationQueueFull"
    assert "serverless.queue" in body["message"] and '"m"' in body["message"]
    assert gw.app.activator.held(KEY) == 2  # the rejected one took no place

    gw.publish({KEY: (route(a),)}, activation)
    assert sorted(r.result().json()["body"] for r in first) == ['{"n": 0}', '{"n": 1}']
    assert 'modelfleet_gateway_activation_queue_full_total{environment="production",model="m"} 1.0' in \
        gw.client.get("/metrics").text


def test_no_replica_within_the_timeout_is_503_with_retry_after(make_gateway: Any) -> None:
    gw = make_gateway({KEY: ()}, activation={KEY: Activation(queue=5, timeout=0.3)})
    response = gw.client.post("/models/m/predict", content=b"{}")
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    body = response.json()
    assert body["type"] == "ActivationTimeout"
    assert "waited 0.3s" in body["message"] and '"m"' in body["message"] and '"production"' in body["message"]
    assert gw.app.activator.held(KEY) == 0
    metrics = gw.client.get("/metrics").text
    assert 'modelfleet_gateway_activation_timeouts_total{environment="production",model="m"} 1.0' in metrics
    assert 'modelfleet_gateway_requests_total{code="503",environment="production",model="m"} 1.0' in metrics


def test_a_client_that_goes_away_frees_its_place(backends: Any, make_gateway: Any) -> None:
    _, a = backends("a")
    activation = {KEY: Activation(queue=1, timeout=20)}
    gw = make_gateway({KEY: ()}, activation=activation)
    with pytest.raises(httpx.ReadTimeout):
        gw.client.post("/models/m/predict", content=b"{}", timeout=0.3)
    held(gw, 0)
    wait_for(lambda: 'code="499"' in gw.client.get("/metrics").text, "the 499 of the client that left")
    # Its place is free again: another request is held (not turned away), then served.
    request = InBackground(gw.url, "POST", "/models/m/predict", content=b'{"second": true}')
    held(gw, 1)
    gw.publish({KEY: (route(a),)}, activation)
    assert request.result().json()["body"] == '{"second": true}'


def test_a_deployment_removed_while_requests_are_held_is_404(make_gateway: Any) -> None:
    gw = make_gateway({KEY: (), "other/production": ()}, activation={KEY: Activation(queue=5, timeout=20)})
    request = InBackground(gw.url, "GET", "/models/m/predict")
    held(gw, 1)
    gw.publish({"other/production": ()})
    response = request.result()
    assert response.status_code == 404 and response.json()["type"] == "DeploymentNotFound"


def test_a_deployment_no_longer_serverless_is_503_no_ready_backend(make_gateway: Any) -> None:
    gw = make_gateway({KEY: ()}, activation={KEY: Activation(queue=5, timeout=20)})
    request = InBackground(gw.url, "GET", "/models/m/predict")
    held(gw, 1)
    gw.publish({KEY: ()})  # activation settings gone, still nothing ready
    response = request.result()
    assert response.status_code == 503 and response.json()["type"] == "NoReadyBackend"


def test_shutting_down_answers_held_requests(make_gateway: Any) -> None:
    gw = make_gateway({KEY: ()}, activation={KEY: Activation(queue=5, timeout=25)})
    requests = [InBackground(gw.url, "POST", "/models/m/predict", content=b"{}") for _ in range(3)]
    held(gw, 3)
    gw.thread.server.should_exit = True  # SIGTERM
    for request in requests:
        response = request.result(timeout=10)  # long before the 25 s activation timeout
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert response.json()["type"] == "GatewayShuttingDown"


def test_a_body_too_large_to_hold_is_413(backends: Any, make_gateway: Any) -> None:
    _, a = backends("a")
    activation = {KEY: Activation(queue=5, timeout=20)}
    gw = make_gateway({KEY: ()}, activation=activation, hold_body_limit=MiB)
    response = gw.client.post("/models/m/upload", content=b"x" * (MiB + 1))
    assert response.status_code == 413
    assert response.json()["type"] == "RequestTooLarge" and str(MiB) in response.json()["message"]
    assert gw.app.activator.held(KEY) == 0
    # A body within the limit, sent in chunks without a Content-Length, is held whole and replayed.
    request = InBackground(gw.url, "POST", "/models/m/upload", content=iter([b"y" * 4096] * 64))
    held(gw, 1)
    gw.publish({KEY: (route(a),)}, activation)
    echo = request.result().json()
    assert echo["body_len"] == 4096 * 64
    assert echo["headers"]["content-length"] == str(4096 * 64)  # buffered: sent with its length


def test_a_queue_of_zero_holds_nothing(make_gateway: Any) -> None:
    gw = make_gateway({KEY: ()}, activation={KEY: Activation(queue=0, timeout=20)})
    response = gw.client.get("/models/m/predict")
    assert response.status_code == 503 and response.json()["type"] == "ActivationQueueFull"


def test_deployments_without_activation_settings_are_not_held(backends: Any, make_gateway: Any) -> None:
    gw = make_gateway({KEY: (), "s/production": ()}, activation={"s/production": Activation(queue=5, timeout=0.2)})
    response = gw.client.get("/models/m/predict")
    assert response.status_code == 503 and response.json()["type"] == "NoReadyBackend"
    assert gw.app.load.keys.keys() == {"s/production"}  # only serverless deployments are metered
    routes = gw.client.get("/routes").json()
    assert routes["activation"] == {"s/production": {"queue": 5, "timeout": 0.2, "held": 0}}


def test_a_request_whose_last_replica_went_away_is_held_on_its_retry(backends: Any, make_gateway: Any) -> None:
    """Scaled to zero just as a request went to the last replica: the retry holds it until another one is up."""
    _, a = backends("a")
    dead = bound_socket()  # bound, never listening: connections are refused
    try:
        gone = Backend(f"http://127.0.0.1:{dead.getsockname()[1]}", "gone", "local")
        activation = {KEY: Activation(queue=5, timeout=20)}
        # No polling during the test: the gateway reads routes.db only when a retry makes it.
        gw = make_gateway({KEY: (gone,), "poke/production": (gone,)}, activation=activation, poll_interval=600)
        gw.publish({KEY: (), "poke/production": (gone,)}, activation)  # the daemon scaled it to zero
        request = InBackground(gw.url, "POST", "/models/m/predict", content=b'{"retry": 1}')
        held(gw, 1)
        gw.publish({KEY: (route(a),), "poke/production": (gone,)}, activation)
        assert gw.client.get("/models/poke/x").status_code == 502  # its retry reads the new table
        response = request.result()
        assert who(response) == "a" and response.json()["body"] == '{"retry": 1}'
    finally:
        dead.close()
