"""Our runtimes answer only requests that carry the deployment's secret, except the health probe."""

from __future__ import annotations

import asyncio

import httpx
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from modelfleet.runtimes._common import GatewaySecretGuard
from modelfleet.runtimes.contract import RuntimeEnvironment


async def _ok(_: object) -> PlainTextResponse:
    return PlainTextResponse("ok")


APP = Starlette(routes=[Route(path, _ok, methods=["GET", "POST"]) for path in ("/ping", "/predict", "/ready-now")])


def _status(app: object, path: str, headers: dict[str, str] | None = None) -> int:
    async def call() -> int:
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
            return (await client.post(path, headers=headers or {})).status_code

    return asyncio.run(call())


def test_requests_without_the_secret_are_refused_but_the_probe_answers() -> None:
    environment = RuntimeEnvironment(gateway_secret="s3cret", open_path="/ready-now")
    guarded = GatewaySecretGuard.around(APP, environment)
    assert _status(guarded, "/predict") == 401
    assert _status(guarded, "/predict", {"x-modelfleet-gateway-secret": "wrong"}) == 401
    assert _status(guarded, "/predict", {"x-modelfleet-gateway-secret": "s3cre"}) == 401
    assert _status(guarded, "/predict", {"x-modelfleet-gateway-secret": "s3cret"}) == 200
    assert _status(guarded, "/ping") == 200  # a health path
    assert _status(guarded, "/ready-now") == 200  # the manifest's readiness probe path


def test_without_a_secret_nothing_is_guarded_and_the_secret_never_shows() -> None:
    assert GatewaySecretGuard.around(APP, RuntimeEnvironment()) is APP
    environment = RuntimeEnvironment.from_env({"MODELFLEET_GATEWAY_SECRET": "s3cret", "MODELFLEET_OPEN_PATH": "/p"})
    assert (environment.gateway_secret, environment.open_path) == ("s3cret", "/p")
    assert "s3cret" not in repr(environment)
    told = RuntimeEnvironment().for_deployment("m", "production", port=8080, gateway_secret="x", open_path="/p")
    assert told.to_env()["MODELFLEET_GATEWAY_SECRET"] == "x" and told.to_env()["MODELFLEET_OPEN_PATH"] == "/p"
