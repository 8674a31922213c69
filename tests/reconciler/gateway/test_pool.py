"""The upstream client against a hand-written backend: odd framings, informational answers, garbage, hang-ups."""

from __future__ import annotations

from typing import Any

import pytest

from modelfleet.reconciler.gateway.routes import Backend
from tests.reconciler.gateway.harness import PARSERS, RawBackend, route, who

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("parser", PARSERS)
def test_odd_backend_answers(raw_backend: RawBackend, backends: Any, make_gateway: Any, parser: str) -> None:
    raw = Backend(raw_backend.url, "raw", "local")
    gw = make_gateway({"m/production": (raw,)}, parser=parser)
    response = gw.client.get("/models/m/close-delimited")
    assert response.status_code == 200 and response.text == "all of it, up to the end"
    response = gw.client.post("/models/m/informational", content=b"x")
    assert response.status_code == 200 and response.text == "ok"
    response = gw.client.get("/models/m/bare-lf")  # lenient like nginx: bare LF ends a header line
    assert (response.status_code, response.text, response.headers.get("x-cgi")) == (200, "from sh", "yes")
    response = gw.client.get("/models/m/garbage")
    assert response.status_code == 502 and response.json()["type"] == "BadGateway"
    assert "invalid response" in response.json()["message"], response.json()  # it names the reason
    response = gw.client.get("/models/m/hangup")  # retried once on the same (only) backend, then 502
    assert response.status_code == 502

    _, b = backends("b")  # a backend that hangs up, another that answers: the retry saves the request
    gw.wait_version(gw.publish({"m/production": (raw, route(b))}))
    for _ in range(4):
        assert who(gw.client.get("/models/m/hangup")) == "b"



@pytest.mark.parametrize("parser", PARSERS)
def test_a_backend_silent_past_the_read_timeout_is_504(backends: Any, make_gateway: Any, parser: str) -> None:
    app, a = backends("a")
    gw = make_gateway({"m/production": (route(a),)}, parser=parser, read_timeout=0.3)
    response = gw.client.get("/models/m/slow?ms=5000")  # it would answer after 5 s
    assert response.status_code == 504 and response.json()["type"] == "GatewayTimeout"
    assert app.cancelled.wait(5)  # the gateway dropped the connection: the backend saw it go
    assert who(gw.client.get("/models/m/slow?ms=50")) == "a"  # answers within the timeout still pass
