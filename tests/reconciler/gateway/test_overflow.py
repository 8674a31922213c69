"""Overflow: a deployment's requests go to its on-prem endpoint first, to the pool beyond it (real loopback servers)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from starlette.types import Receive, Scope, Send

from modelfleet.reconciler.gateway.overflow import EndpointState
from modelfleet.reconciler.gateway.routes import Activation, Backend, Overflow, RouteStore
from tests.http_server import ServerThread, bound_socket
from tests.reconciler.gateway.harness import EchoBackend, InBackground, route, serve, wait_for, who

pytestmark = pytest.mark.timeout(30)

KEY = "m/production"
ACTIVATION = {KEY: Activation(queue=10, timeout=20)}


class OnPrem(EchoBackend):
    """The on-prem model: an echo backend whose health check (``/ping``) answers 503 while ``down``."""

    def __init__(self) -> None:
        super().__init__("onprem")
        self.down = False
        self.pings = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/ping":
            self.pings += 1
            await send({"type": "http.response.start", "status": 503 if self.down else 200, "headers": []})
            await send({"type": "http.response.body", "body": b"down" if self.down else b"ok"})
            return
        await super().__call__(scope, receive, send)


@pytest.fixture
def onprem(servers: list[ServerThread]) -> tuple[OnPrem, ServerThread]:
    import uvicorn

    app = OnPrem()
    server = serve(uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False)))
    servers.append(server.start())
    return app, server


def settings(endpoint: str, **fields: Any) -> Overflow:
    options: dict[str, Any] = {"health_path": "/ping", "health_period": 0.05, "health_timeout": 1.0,
                               "failure_threshold": 2, **fields}
    return Overflow(endpoint=endpoint, **options)


def make(make_gateway: Any, backends: tuple[Backend, ...], overflow: Overflow) -> Any:
    gw = make_gateway()
    version = gw.store.publish({KEY: backends}, activation=ACTIVATION, overflow={KEY: overflow})
    gw.wait_version(version)
    return gw


def pool_arrivals(gw: Any) -> int:
    """Requests the load meter saw arriving for the deployment (what the autoscaler is told)."""
    load = gw.app.load.keys[KEY]
    return int(load.requests + load.previous_requests)


def overflow_view(gw: Any) -> dict[str, Any]:
    return dict(gw.client.get("/routes").json()["overflow"][KEY])


def test_requests_go_to_the_endpoint_with_its_path_prefix_and_are_not_pool_load(
        backends: Any, make_gateway: Any, onprem: tuple[OnPrem, ServerThread]) -> None:
    _, pool = backends("pool")
    gw = make(make_gateway, (route(pool),), settings(onprem[1].url + "/v1"))
    responses = [gw.client.post("/models/m/predict?x=1", content=b'{"n": %d}' % i) for i in range(5)]
    assert [who(r) for r in responses] == ["onprem"] * 5
    echo = responses[0].json()
    assert echo["path"] == "/v1/predict" and echo["query"] == "x=1" and echo["body"] == '{"n": 0}'
    assert pool_arrivals(gw) == 0  # the endpoint's traffic is not the pool's load
    view = overflow_view(gw)
    assert (view["toEndpoint"], view["toPool"], view["routing"]) == (5, 0, "endpoint")
    metrics = gw.client.get("/metrics").text
    assert ('modelfleet_gateway_overflow_requests_total{environment="production",model="m",reason="",'
            'target="endpoint"} 5.0') in metrics
    assert 'modelfleet_gateway_overflow_endpoint_healthy{environment="production",model="m"} 1.0' in metrics


def test_a_steady_percentage_goes_to_the_pool_by_a_counter(
        backends: Any, make_gateway: Any, onprem: tuple[OnPrem, ServerThread]) -> None:
    _, pool = backends("pool")
    gw = make(make_gateway, (route(pool),), settings(onprem[1].url, percentage=25))
    targets = [who(gw.client.get("/models/m/x")) for _ in range(20)]
    # Every 4th request, exactly: deterministic, evenly spread.
    assert [i for i, t in enumerate(targets) if t == "pool"] == [3, 7, 11, 15, 19]
    assert pool_arrivals(gw) == 5  # the pool's share is metered
    view = overflow_view(gw)
    assert (view["toEndpoint"], view["toPool"], view["toPoolBy"]) == (15, 5, {"percentage": 5})


def test_beyond_max_concurrency_requests_spill_to_the_pool(
        backends: Any, make_gateway: Any, onprem: tuple[OnPrem, ServerThread]) -> None:
    _, pool = backends("pool")
    gw = make(make_gateway, (route(pool),), settings(onprem[1].url, max_concurrency=2))
    slow = [InBackground(gw.url, "GET", "/models/m/slow?ms=1500") for _ in range(2)]
    wait_for(lambda: gw.app.overflow.states[KEY].in_flight == 2, "2 requests in flight at the endpoint")
    burst = [who(gw.client.get("/models/m/x")) for _ in range(3)]
    assert burst == ["pool"] * 3
    assert [who(r.result()) for r in slow] == ["onprem"] * 2
    assert who(gw.client.get("/models/m/x")) == "onprem"  # room again
    assert overflow_view(gw)["toPoolBy"] == {"maxConcurrency": 3}
    assert pool_arrivals(gw) == 3


def test_an_unhealthy_endpoint_sends_everything_to_the_pool_until_it_recovers(
        backends: Any, make_gateway: Any, onprem: tuple[OnPrem, ServerThread]) -> None:
    app, server = onprem
    _, pool = backends("pool")
    gw = make(make_gateway, (route(pool),), settings(server.url))
    wait_for(lambda: app.pings >= 1, "the first health check")
    assert who(gw.client.get("/models/m/x")) == "onprem"

    app.down = True
    wait_for(lambda: not overflow_view(gw)["healthy"], "the endpoint judged unhealthy")
    view = overflow_view(gw)
    assert view["routing"].startswith("pool: the endpoint is unhealthy") and "503" in view["routing"]
    assert 'modelfleet_gateway_overflow_endpoint_healthy{environment="production",model="m"} 0.0' in \
        gw.client.get("/metrics").text
    assert Counter(who(gw.client.get("/models/m/x")) for _ in range(10)) == {"pool": 10}

    app.down = False
    wait_for(lambda: overflow_view(gw)["healthy"], "the endpoint healthy again")
    assert Counter(who(gw.client.get("/models/m/x")) for _ in range(5)) == {"onprem": 5}
    assert overflow_view(gw)["toPoolBy"] == {"unhealthy": 10}


def test_a_request_refused_by_the_endpoint_is_sent_to_the_pool_and_the_endpoint_is_ejected(
        backends: Any, make_gateway: Any) -> None:
    refusing = bound_socket()  # bound, not listening: connections are refused
    try:
        _, pool = backends("pool")
        # Health checks rarely (the first one fails: one failure is below the threshold of 3).
        overflow = settings(f"http://127.0.0.1:{refusing.getsockname()[1]}", health_period=60, failure_threshold=3,
                            consecutive_failures=2, ejection_time=60)
        gw = make(make_gateway, (route(pool),), overflow)
        payload = json.dumps({"inputs": "x" * 5000}).encode()
        first = gw.client.post("/models/m/predict", content=payload)
        assert who(first) == "pool" and first.json()["body_len"] == len(payload)  # the body, replayed whole
        assert who(gw.client.post("/models/m/predict", content=payload)) == "pool"
        view = overflow_view(gw)
        assert view["ejected"] and view["healthy"] and view["routing"].startswith("pool: the endpoint is ejected")
        assert view["toPoolBy"] == {"failover": 2}
        assert who(gw.client.get("/models/m/x")) == "pool"  # no attempt at the endpoint any more
        assert overflow_view(gw)["toPoolBy"] == {"ejected": 1, "failover": 2}
        assert pool_arrivals(gw) == 3
    finally:
        refusing.close()


def test_a_failover_at_zero_is_held_until_the_pool_has_a_replica(backends: Any, make_gateway: Any) -> None:
    refusing = bound_socket()
    try:
        _, pool = backends("pool")
        gw = make(make_gateway, (), settings(f"http://127.0.0.1:{refusing.getsockname()[1]}", health_period=60,
                                              failure_threshold=3))
        request = InBackground(gw.url, "POST", "/models/m/predict", content=b'{"cold": true}')
        wait_for(lambda: gw.app.activator.held(KEY) == 1, "the failed-over request held")
        gw.store.publish({KEY: (route(pool),)}, activation=ACTIVATION, overflow={KEY: gw.app.table.overflow[KEY]})
        response = request.result()
        assert who(response) == "pool" and response.json()["body"] == '{"cold": true}'
    finally:
        refusing.close()


def test_the_endpoint_gets_its_own_token_never_the_clients_and_it_is_never_shown(
        backends: Any, make_gateway: Any, onprem: tuple[OnPrem, ServerThread], tmp_path: Path) -> None:
    _, pool = backends("pool")
    token_file = tmp_path / "onprem-token"
    token_file.write_text("s3cret-onprem\n")
    gw = make(make_gateway, (route(pool),), settings(onprem[1].url, token_file=str(token_file)))
    response = gw.client.get("/models/m/x", headers={"authorization": "Bearer the-clients"})
    assert who(response) == "onprem"
    assert response.json()["headers"]["authorization"] == "Bearer s3cret-onprem"
    routes = gw.client.get("/routes").text
    assert "s3cret" not in routes and str(token_file) in routes

    # Unreadable: the endpoint gets nothing (the pool takes it all) until the file is back.
    token_file.unlink()
    wait_for(lambda: overflow_view(gw)["routing"].startswith("pool: cannot read the token file"), "token gone")
    assert who(gw.client.get("/models/m/x")) == "pool"
    token_file.write_text("rotated")
    wait_for(lambda: overflow_view(gw)["available"], "token back")
    response = gw.client.get("/models/m/x")
    assert who(response) == "onprem" and response.json()["headers"]["authorization"] == "Bearer rotated"


def test_a_deployment_without_overflow_is_untouched(backends: Any, make_gateway: Any,
                                                    onprem: tuple[OnPrem, ServerThread]) -> None:
    _, pool = backends("pool")
    gw = make_gateway()
    version = gw.store.publish({KEY: (route(pool),), "other/production": (route(pool),)}, activation=ACTIVATION,
                               overflow={"other/production": settings(onprem[1].url)})
    gw.wait_version(version)
    assert who(gw.client.get("/models/m/x")) == "pool"
    assert who(gw.client.get("/models/other/x")) == "onprem"
    assert set(gw.client.get("/routes").json()["overflow"]) == {"other/production"}


def test_the_percentage_counter_is_exact_for_any_share() -> None:
    for percentage in (1, 12.5, 33, 50, 99, 100):
        state = EndpointState(KEY, Overflow("http://x", percentage=percentage), None)
        to_pool = sum(state.choose(0.0) is not None for _ in range(1000))
        assert to_pool == int(1000 * percentage / 100), percentage


def test_overflow_settings_round_trip_in_the_route_table(tmp_path: Path) -> None:
    store = RouteStore(tmp_path)
    overflow = Overflow("https://onprem.example:8443/api", token_file="/etc/t", health_path="/ping",
                        health_period=5, health_timeout=2, failure_threshold=2, max_concurrency=8, percentage=10,
                        consecutive_failures=3, ejection_time=15)
    backend = Backend("http://10.0.0.1:1", "c", "h")
    version = store.publish({KEY: (backend,), "gone/production": ()}, activation=ACTIVATION,
                            overflow={KEY: overflow, "not-routed/production": overflow})
    table = store.latest()
    assert table is not None and table.version == version
    assert table.overflow == {KEY: overflow}  # keys not in the routes are dropped
    # Changing only the overflow settings is a new version; the same ones are not.
    assert store.publish({KEY: (backend,), "gone/production": ()}, activation=ACTIVATION,
                         overflow={KEY: overflow}) == version
    assert store.publish({KEY: (backend,), "gone/production": ()}, activation=ACTIVATION) > version
    latest = store.latest()
    assert latest is not None and latest.overflow == {}
    store.close()


def test_an_older_routes_db_gets_the_overflow_column(tmp_path: Path) -> None:
    import sqlite3

    db = sqlite3.connect(tmp_path / "routes.db")
    db.execute("CREATE TABLE route_tables (version INTEGER PRIMARY KEY AUTOINCREMENT, published_at REAL NOT NULL,"
               " routes TEXT NOT NULL, activation TEXT)")
    db.execute("INSERT INTO route_tables (published_at, routes, activation) VALUES (1.0, '{}', NULL)")
    db.commit()
    db.close()
    store = RouteStore(tmp_path)
    old = store.latest()
    assert old is not None and old.overflow == {}
    store.publish({KEY: ()}, overflow={KEY: Overflow("http://10.0.0.5:8080")})
    latest = store.latest()
    assert latest is not None and latest.overflow == {KEY: Overflow("http://10.0.0.5:8080")}
    store.close()


def test_demand_reports_say_where_the_requests_went(backends: Any, make_gateway: Any, demand_server: Any,
                                                   onprem: tuple[OnPrem, ServerThread]) -> None:
    daemon, api = demand_server()
    _, pool = backends("pool")
    gw = make_gateway(control_plane=api.url, report_interval=0.05)
    version = gw.store.publish({KEY: (route(pool),)}, activation=ACTIVATION,
                               overflow={KEY: settings(onprem[1].url, percentage=50)})
    gw.wait_version(version)
    # Idle so far: reported anyway (where traffic would go), at zero load.
    wait_for(lambda: any(KEY in r.deployments for r in daemon.reports), "a report of the deployment")
    idle = next(r.deployments[KEY] for r in daemon.reports if KEY in r.deployments)
    assert idle.overflow is not None and idle.overflow.endpoint_healthy
    assert (idle.requests, idle.in_flight, idle.idle_seconds) == (0, 0, None)

    reported = len(daemon.reports)
    assert sorted(who(gw.client.get("/models/m/x")) for _ in range(4)) == ["onprem", "onprem", "pool", "pool"]

    def totals() -> tuple[int, int, int]:
        loads = [r.deployments[KEY] for r in daemon.reports[reported:] if KEY in r.deployments]
        return (sum(x.overflow.to_endpoint for x in loads if x.overflow), sum(x.overflow.to_pool for x in loads
                                                                                 if x.overflow),
                sum(x.requests for x in loads))

    # Each request is counted in one interval only: 2 answered by the endpoint, 2 sent to (and metered by) the pool.
    wait_for(lambda: totals() == (2, 2, 2), "the requests reported")
    last = daemon.reports[-1].deployments[KEY]
    assert last.idle_seconds is not None  # the pool's last request, also once the meter stops reporting
