"""Gateways on other machines: the route table long-polled from the daemon's API, cached on disk,
served nearest-first, kept through a daemon outage."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from modelfleet.reconciler.api.routes import route_table_routes
from modelfleet.reconciler.daemon.route_watch import RouteWatch
from modelfleet.reconciler.gateway.routes import Backend, RouteStore, RouteTable
from modelfleet.reconciler.secrets import GatewaySecrets
from modelfleet.runtimes.contract import GATEWAY_SECRET_HEADER
from tests.http_server import ServerThread
from tests.reconciler.gateway.harness import wait_for

pytestmark = pytest.mark.timeout(60)

KEY = "m/production"
TOKEN = "api-t0ken-for-routes"


class ControlPlane:
    """The daemon's real route-table endpoint, its store and watch, with a stand-in for the rest of the daemon."""

    def __init__(self, state_dir: Path, token: str | None = TOKEN) -> None:
        self.store = RouteStore(state_dir)
        hosts = [SimpleNamespace(location=SimpleNamespace(name=n, continent=c))
                 for n, c in (("paris-1", "EU"), ("berlin-1", "EU"), ("ohio-1", "NA"))]
        pool = SimpleNamespace(hosts=hosts)
        self.daemon: Any = SimpleNamespace(state_dir=state_dir, config=SimpleNamespace(pool=pool),
                                           gateway_secrets=GatewaySecrets(state_dir), route_watch=RouteWatch())
        self.token = token
        self.server: ServerThread | None = None

    def start(self) -> ServerThread:
        # A daemon that goes away ends its long-polls (as a killed process would: its connections close).
        app = Starlette(routes=route_table_routes(self.daemon, self.token))
        self.server = ServerThread.for_app(app, timeout_graceful_shutdown=0.2).start()
        return self.server

    def publish(self, routes: dict[str, tuple[Backend, ...]]) -> int:
        version = self.store.publish(routes)
        self.daemon.route_watch.published(version)
        return version


def near(server: ServerThread, name: str, location: str, continent: str) -> Backend:
    return Backend(server.url, name, f"host-{name}", 0, "s" * 64, "r" * 40, location, continent)


def get(url: str, **headers: str) -> httpx.Response:
    return httpx.get(f"{url}/api/v1/routes", headers={"authorization": f"Bearer {TOKEN}", **headers}, timeout=10)


def test_the_api_long_poll_answers_as_soon_as_a_new_table_is_published(tmp_path: Path,
                                                                       servers: list[ServerThread]) -> None:
    plane = ControlPlane(tmp_path)
    servers.append(api := plane.start())
    assert httpx.get(f"{api.url}/api/v1/routes").status_code == 401
    assert get(api.url).status_code == 503  # nothing published yet
    version = plane.publish({KEY: (Backend("http://10.0.0.1:1", "c1", "h1"),)})
    first = get(api.url)
    assert first.status_code == 200 and first.headers["etag"] == f'"{version}"'
    table = RouteTable.from_payload(first.json())
    assert table.version == version and table.routes[KEY][0].container == "c1"
    assert table.secrets[KEY] == plane.daemon.gateway_secrets.for_deployment("m", "production")
    assert table.locations == {"paris-1": "EU", "berlin-1": "EU", "ohio-1": "NA"}
    started = time.monotonic()
    unchanged = httpx.get(f"{api.url}/api/v1/routes?wait=0.3", headers={"authorization": f"Bearer {TOKEN}",
                                                                          "if-none-match": f'"{version}"'})
    assert unchanged.status_code == 304 and time.monotonic() - started >= 0.3
    # A long-poll in flight gets the next table the moment it is published.
    from tests.reconciler.gateway.harness import InBackground

    waiting = InBackground(api.url, "GET", "/api/v1/routes?wait=20",
                           headers={"authorization": f"Bearer {TOKEN}", "if-none-match": f'"{version}"'})
    time.sleep(0.2)
    assert waiting.thread.is_alive()
    published = time.monotonic()
    newer = plane.publish({KEY: ()})
    answer = waiting.result()
    assert answer.status_code == 200 and answer.json()["version"] == newer
    assert time.monotonic() - published < 1.0  # woken by the publish, not by the 20 s wait


def test_without_an_api_token_only_this_machine_gets_the_table(tmp_path: Path, servers: list[ServerThread]) -> None:
    plane = ControlPlane(tmp_path, token=None)
    servers.append(api := plane.start())
    plane.publish({KEY: ()})
    assert httpx.get(f"{api.url}/api/v1/routes").status_code == 200  # loopback
    # (a caller from another address gets 403 "set api.tokenFile"; see test_api_refuses_remote_callers)


def test_api_refuses_remote_callers_without_a_token(tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    plane = ControlPlane(tmp_path, token=None)
    plane.publish({KEY: ()})
    client = TestClient(Starlette(routes=route_table_routes(plane.daemon, None)), client=("10.1.2.3", 5000))
    refused = client.get("/api/v1/routes")
    assert refused.status_code == 403 and "api.tokenFile" in refused.json()["error"]


def test_a_remote_gateway_follows_prefers_its_location_and_adds_the_secret(
        tmp_path: Path, servers: list[ServerThread], backends: Any, make_gateway: Any) -> None:
    paris_app, paris = backends("paris")
    berlin_app, berlin = backends("berlin")
    _, ohio = backends("ohio")
    plane = ControlPlane(tmp_path / "daemon")
    servers.append(api := plane.start())
    plane.publish({KEY: (near(paris, "paris", "paris-1", "EU"), near(berlin, "berlin", "berlin-1", "EU"),
                         near(ohio, "ohio", "ohio-1", "NA"))})
    cache = tmp_path / "cache"
    gw = make_gateway(None, follow="controlPlane", control_plane=api.url, control_plane_token=TOKEN,
                      cache_dir=cache, location="paris-1")
    wait_for(lambda: gw.app.table.version > 0, "the first table")
    seen = {gw.client.post("/models/m/predict").json()["backend"] for _ in range(6)}
    assert seen == {"paris"}  # its own location only
    secret = plane.daemon.gateway_secrets.for_deployment("m", "production")
    assert gw.client.post("/models/m/predict").json()["headers"][GATEWAY_SECRET_HEADER] == secret
    cached = cache / "routes.json"
    wait_for(cached.exists, "the table cached")  # written after it is installed
    assert json.loads(cached.read_text())["secrets"][KEY] == secret
    assert stat.S_IMODE(os.stat(cached).st_mode) == 0o600
    # The Paris replica goes: the continent (Berlin) is next, before Ohio.
    version = plane.publish({KEY: (near(berlin, "berlin", "berlin-1", "EU"), near(ohio, "ohio", "ohio-1", "NA"))})
    gw.wait_version(version, timeout=5)
    assert {gw.client.post("/models/m/predict").json()["backend"] for _ in range(6)} == {"berlin"}
    assert gw.client.get("/routes").json()["source"] == f"{api.url}/api/v1/routes"
    assert paris_app.requests == 7 and berlin_app.requests == 6


def test_a_remote_gateway_serves_through_a_daemon_outage_and_starts_from_its_cache(
        tmp_path: Path, servers: list[ServerThread], backends: Any, make_gateway: Any) -> None:
    _, a = backends("a")
    plane = ControlPlane(tmp_path / "daemon")
    api = plane.start()
    version = plane.publish({KEY: (near(a, "a", "paris-1", "EU"),)})
    options = {"follow": "controlPlane", "control_plane": api.url, "control_plane_token": TOKEN,
               "cache_dir": tmp_path / "cache"}
    gw = make_gateway(None, **options)
    gw.wait_version(version, timeout=5)
    api.stop()  # the daemon goes away
    wait_for(lambda: "cannot reach" in str(gw.app.routes.error), "the outage noticed", timeout=15)
    assert "cannot reach" in str(gw.client.get("/routes").json()["error"])
    assert gw.client.post("/models/m/predict").json()["backend"] == "a"
    # A gateway started during the outage serves the cached table.
    second = make_gateway(None, **options)
    assert second.app.table.version == version
    assert second.client.post("/models/m/predict").json()["backend"] == "a"


def test_a_stopping_daemon_ends_the_long_polls_at_once(tmp_path: Path, servers: list[ServerThread]) -> None:
    from tests.reconciler.gateway.harness import InBackground

    plane = ControlPlane(tmp_path)
    servers.append(api := plane.start())
    version = plane.publish({KEY: ()})
    waiting = InBackground(api.url, "GET", "/api/v1/routes?wait=30",
                           headers={"authorization": f"Bearer {TOKEN}", "if-none-match": f'"{version}"'})
    time.sleep(0.2)
    plane.daemon.route_watch.close()
    answer = waiting.result(timeout=5)  # not after the 30 s wait
    assert answer.status_code == 503 and answer.json()["error"] == "the daemon is stopping"


def test_when_every_nearby_replica_fails_the_request_is_retried_on_the_others(backends: Any,
                                                                             make_gateway: Any) -> None:
    from tests.http_server import bound_socket

    _, berlin = backends("berlin")
    dead = bound_socket()  # the Paris replica: bound, not listening (its connections are refused)
    try:
        paris = Backend(f"http://127.0.0.1:{dead.getsockname()[1]}", "paris", "host-paris", 0, "s" * 64, "r" * 40,
                        "paris-1", "EU")
        gw = make_gateway({KEY: (paris, near(berlin, "berlin", "berlin-1", "EU"))}, location="paris-1",
                          continent="EU")
        assert [b.container for b in gw.app.table.routes[KEY]] == ["paris"]  # the nearest only
        assert [b.container for b in gw.app.table.fallback[KEY]] == ["paris", "berlin"]
        answer = gw.client.post("/models/m/predict")
        assert answer.status_code == 200 and answer.json()["backend"] == "berlin"
    finally:
        dead.close()
