"""Following routes.db: new tables are picked up fast, the last one is kept while the file is gone or broken."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from modelfleet.reconciler.gateway.routes import ROUTES_DB, RouteStore
from tests.reconciler.gateway.harness import route, who

pytestmark = pytest.mark.timeout(30)


def test_picks_up_a_new_table_quickly(backends: Any, make_gateway: Any) -> None:
    _, a = backends("a")
    _, b = backends("b")
    gw = make_gateway({"m/production": (route(a),)})
    assert who(gw.client.get("/models/m/x")) == "a"
    published = time.monotonic()
    gw.publish({"m/production": (route(b),)})
    while who(gw.client.get("/models/m/x")) != "b":
        assert time.monotonic() - published < 0.5, "new route table not picked up within 0.5 s"
        time.sleep(0.01)
    routes = gw.client.get("/routes").json()
    assert routes["version"] == 2
    assert [r["url"] for r in routes["routes"]["m/production"]] == [b.url]
    assert routes["age_seconds"] is not None and routes["age_seconds"] < 5


def test_keeps_the_last_table_when_routes_db_is_gone_or_corrupt(backends: Any, make_gateway: Any) -> None:
    _, a = backends("a")
    _, b = backends("b")
    gw = make_gateway({"m/production": (route(a),)})
    db = gw.state_dir / ROUTES_DB
    gw.store.close()  # the daemon is gone
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    time.sleep(0.25)
    assert who(gw.client.get("/models/m/x")) == "a"
    assert gw.client.get("/routes").json()["error"]

    db.write_bytes(b"this is not a database" * 100)
    time.sleep(0.25)
    assert who(gw.client.get("/models/m/x")) == "a"
    assert gw.app.table.version == 1
    assert "cannot read" in gw.client.get("/routes").json()["error"]
    metrics = gw.client.get("/metrics").text
    assert "modelfleet_gateway_route_table_read_failing 1.0" in metrics

    # A daemon that comes back with a fresh routes.db is followed again (versions restart at 1).
    db.unlink()
    gw.store = RouteStore(gw.state_dir)
    gw.publish({"m/production": (route(b),)})
    deadline = time.monotonic() + 2
    while who(gw.client.get("/models/m/x")) != "b":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert gw.client.get("/routes").json()["error"] is None
    assert "modelfleet_gateway_route_table_read_failing 0.0" in gw.client.get("/metrics").text


def test_starts_without_routes_db_and_follows_it_once_published(backends: Any, make_gateway: Any) -> None:
    _, a = backends("a")
    gw = make_gateway()
    (gw.state_dir / ROUTES_DB).unlink()
    gw.store.close()
    assert gw.client.get("/models/m/x").status_code == 404
    assert gw.client.get("/healthz").status_code == 200
    gw.store = RouteStore(gw.state_dir)
    gw.wait_version(gw.publish({"m/production": (route(a),)}))
    assert who(gw.client.get("/models/m/x")) == "a"



def test_a_published_table_is_picked_up_at_once_without_waiting_for_the_refresh_interval(
        make_gateway: Any, backends: Any) -> None:
    _, a = backends("a")
    # A refresh interval of a minute: only the watch of routes.db can bring the next table in time.
    gw = make_gateway({"m/production": ()}, poll_interval=60)
    time.sleep(0.3)  # the watch is set up
    for _ in range(3):
        version = gw.publish({"m/production": (route(a),)}) if gw.app.table.routes["m/production"] == () else \
            gw.publish({"m/production": ()})
        gw.wait_version(version, timeout=3)
