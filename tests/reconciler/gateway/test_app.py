"""The ASGI app: the bearer token (which paths need it), /healthz, /metrics and /routes."""

from __future__ import annotations

from typing import Any

import pytest

from tests.reconciler.gateway.harness import route, who

pytestmark = pytest.mark.timeout(30)


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

