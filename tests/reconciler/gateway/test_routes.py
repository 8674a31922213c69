"""The route table contract: activation settings published with the routes, and routes.db files older than them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from modelfleet.reconciler.gateway.follower import RouteFollower
from modelfleet.reconciler.gateway.routes import ROUTES_DB, Activation, Backend, RouteStore, RouteTable
from modelfleet.state.token_limits import TokenBudget, TokenLayer, TokenLimits

A = Backend("http://10.0.0.1:9000", "c1", "h1")
KEY = "m/production"


def test_activation_is_published_with_the_routes(tmp_path: Path) -> None:
    store = RouteStore(tmp_path)
    v1 = store.publish({KEY: (), "fixed/production": (A,)}, activation={KEY: Activation(queue=7, timeout=30),
                                                                         "not-routed/production": Activation()})
    table = store.latest()
    assert table is not None and table.version == v1
    assert table.activation == {KEY: Activation(queue=7, timeout=30.0)}  # keys without routes are dropped
    assert store.publish({KEY: (), "fixed/production": (A,)}, activation={KEY: Activation(7, 30)}) == v1
    v2 = store.publish({KEY: (), "fixed/production": (A,)}, activation={KEY: Activation(7, 45)})
    assert v2 > v1  # the settings alone changed: a new version, which the gateways follow
    v3 = store.publish({KEY: (), "fixed/production": (A,)})
    assert v3 > v2
    latest = store.latest()
    assert latest is not None and latest.activation == {}
    # What another reader (the gateway) sees.
    follower = RouteFollower(tmp_path)
    store.publish({KEY: (A,)}, activation={KEY: Activation()})
    seen = follower.poll()
    assert seen is not None and seen.activation == {KEY: Activation(100, 60.0)} and seen.routes[KEY] == (A,)
    follower.close()
    store.close()


def test_a_routes_db_without_the_activation_column_keeps_working(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / ROUTES_DB)  # as an older daemon wrote it
    db.execute("CREATE TABLE route_tables (version INTEGER PRIMARY KEY AUTOINCREMENT, published_at REAL NOT NULL,"
               " routes TEXT NOT NULL)")
    db.execute("INSERT INTO route_tables (published_at, routes) VALUES (1.0, ?)",
               (RouteTable(0, {KEY: (A,)}).to_json(),))
    db.commit()
    db.close()
    store = RouteStore(tmp_path)
    old = store.latest()
    assert old is not None and old.version == 1 and old.routes == {KEY: (A,)} and old.activation == {}
    v2 = store.publish({KEY: ()}, activation={KEY: Activation(3, 5)})
    latest = store.latest()
    assert latest is not None and latest.version == v2 == 2 and latest.activation == {KEY: Activation(3, 5.0)}
    store.close()


LIMITS = TokenLimits((TokenLayer("the deployment", (TokenBudget("p", "hour", input=5, total=9),)),))


def test_token_limits_are_published_with_the_routes_and_sent_to_remote_gateways(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / ROUTES_DB)  # as a daemon wrote it before token limits
    db.execute("CREATE TABLE route_tables (version INTEGER PRIMARY KEY AUTOINCREMENT, published_at REAL NOT NULL,"
               " routes TEXT NOT NULL, activation TEXT, overflow TEXT)")
    db.commit()
    db.close()
    store = RouteStore(tmp_path)
    v1 = store.publish({KEY: (A,)}, tokens={KEY: LIMITS, "not-routed/production": LIMITS})
    latest = store.latest()
    assert latest is not None and latest.version == v1 and latest.tokens == {KEY: LIMITS}
    assert store.publish({KEY: (A,)}, tokens={KEY: LIMITS}) == v1  # unchanged: no new version
    assert store.publish({KEY: (A,)}) > v1  # the limits alone lifted: a new version
    assert RouteTable.from_payload(latest.to_payload()).tokens == {KEY: LIMITS}  # GET /api/v1/routes
    store.close()


def test_the_json_forms_stay_compatible() -> None:
    table = RouteTable(4, {KEY: (A,)}, 12.5, {KEY: Activation(2, 1.5)})
    assert table.to_json() == RouteTable(4, {KEY: (A,)}).to_json()  # the routes column is unchanged
    assert RouteTable.from_json(4, table.to_json(), 12.5) == RouteTable(4, {KEY: (A,)}, 12.5)
    assert RouteTable.from_json(4, table.to_json(), 12.5, table.activation_json()) == table
    assert RouteTable(1, {KEY: (A,)}).activation_json() is None


@pytest.mark.parametrize(("queue", "timeout"), [(-1, 1.0), (1.5, 1.0), (True, 1.0), (1, -1.0), (1, float("nan"))])
def test_bad_activation_settings_are_refused(queue: object, timeout: object) -> None:
    with pytest.raises(ValueError, match="activation"):
        Activation(queue, timeout)  # type: ignore[arg-type]
