"""The gateway adds each deployment's secret (derived from the daemon's key in stateDir) to the
requests it forwards, and never passes on a client's own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from modelfleet.reconciler.secrets import GatewaySecrets
from modelfleet.runtimes._common import GatewaySecretGuard
from modelfleet.runtimes.contract import RuntimeEnvironment
from tests.http_server import ServerThread
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


def test_a_guarded_runtime_answers_through_a_gateway_with_a_token_and_refuses_direct_calls(
        servers: list[ServerThread], make_gateway: Any, tmp_path: Path) -> None:
    # The daemon's key, the secret it passes to the replica, and the replica's own guard (runtimes/_common.py).
    secrets = GatewaySecrets(tmp_path / "state0")
    environment = RuntimeEnvironment(gateway_secret=secrets.for_deployment("m", "production"), open_path="/ping")

    async def answer(_: object) -> PlainTextResponse:
        return PlainTextResponse("served")

    app = Starlette(routes=[Route(path, answer, methods=["GET", "POST"]) for path in ("/ping", "/predict")])
    replica = ServerThread.for_app(GatewaySecretGuard.around(app, environment)).start()
    servers.append(replica)
    gw = make_gateway({"m/production": (route(replica),)}, token="client-token")
    assert gw.client.post("/models/m/predict").status_code == 401  # the gateway's own token check
    through = gw.client.post("/models/m/predict", headers={"Authorization": "Bearer client-token"})
    assert (through.status_code, through.text) == (200, "served")
    direct = httpx.post(f"{replica.url}/predict", headers={"Authorization": "Bearer client-token"}, timeout=5)
    assert direct.status_code == 401  # the client's token is no way around the gateway
    assert httpx.get(f"{replica.url}/ping", timeout=5).status_code == 200  # the probe stays open
