"""The gateway adds each deployment's secret (derived from the daemon's key in stateDir) to the
requests it forwards, and never passes on a client's own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from modelfleet.reconciler.secrets import GatewaySecrets
from tests.reconciler.gateway.harness import route

pytestmark = pytest.mark.timeout(30)


def test_the_deployment_secret_is_added_and_a_client_one_dropped(backends: Any, make_gateway: Any,
                                                                 tmp_path: Path) -> None:
    secrets = GatewaySecrets(tmp_path / "state0")  # what the daemon makes before the gateway starts
    _, a = backends("a")
    _, b = backends("b")
    gw = make_gateway({"m/production": (route(a),), "n/production": (route(b),)})
    seen = gw.client.get("/models/m/x", headers={"x-modelfleet-gateway-secret": "from-the-client"}).json()
    assert seen["headers"]["x-modelfleet-gateway-secret"] == secrets.for_deployment("m", "production")
    other = gw.client.get("/models/n/x").json()
    assert other["headers"]["x-modelfleet-gateway-secret"] == secrets.for_deployment("n", "production")
    assert secrets.for_deployment("m", "production") != secrets.for_deployment("n", "production")


def test_without_the_daemon_key_nothing_is_added_and_nothing_passed_on(backends: Any, make_gateway: Any) -> None:
    _, a = backends("a")
    gw = make_gateway({"m/production": (route(a),)})
    seen = gw.client.get("/models/m/x", headers={"x-modelfleet-gateway-secret": "from-the-client"}).json()
    assert "x-modelfleet-gateway-secret" not in seen["headers"]
