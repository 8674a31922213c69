"""The load meter: exact figures for known patterns (fake clock), and through the gateway (with a tolerance)."""

from __future__ import annotations

from typing import Any

import pytest

from modelfleet.reconciler.gateway.load import ACTIVE_WINDOW, MIN_WINDOW, LoadMeter
from modelfleet.reconciler.gateway.routes import Activation, Backend, RouteTable
from modelfleet.state.demand import DemandReport
from tests.reconciler.gateway.harness import InBackground, route, wait_for

KEY = "m/production"
A = "http://10.0.0.1:9000"
B = "http://10.0.0.2:9000"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def table(*urls: str) -> RouteTable:
    return RouteTable(3, {KEY: tuple(Backend(u, "c", "h") for u in urls)}, activation={KEY: Activation()})


def meter() -> tuple[LoadMeter, Clock]:
    clock = Clock()
    load = LoadMeter(clock)
    load.sync([KEY])
    return load, clock


def test_four_concurrent_requests_over_the_whole_interval_are_a_concurrency_of_four() -> None:
    load, clock = meter()
    key = load.keys[KEY]
    for _ in range(4):
        key.arrive(clock.now)
        key.acquire(A, clock.now)
    clock.now += 2.0
    interval, deployments = load.report(table(A, B), {}, reset=True)
    assert interval == 2.0
    figures = deployments[KEY]
    assert figures.concurrency == 4.0 and figures.in_flight == 4 and figures.requests == 4 and figures.rps == 2.0
    assert figures.per_replica == {A: 4.0, B: 0.0}  # an idle replica of the table is listed at 0
    assert figures.idle_seconds == 2.0 and figures.queued == 0

    # Half of them end half-way through the next interval.
    clock.now += 1.0
    for _ in range(2):
        key.release(A, clock.now)
        key.leave(clock.now)
    clock.now += 1.0
    _, deployments = load.report(table(A, B), {}, reset=True)
    figures = deployments[KEY]
    assert figures.concurrency == 3.0 and figures.in_flight == 2 and figures.requests == 0 and figures.rps == 0.0
    assert figures.per_replica == {A: 3.0, B: 0.0}
    assert figures.idle_seconds == 4.0


def test_held_requests_count_in_flight_and_queued() -> None:
    load, clock = meter()
    key = load.keys[KEY]
    key.arrive(clock.now)  # held for 1 s, then served for 1 s by A
    clock.now += 1.0
    key.acquire(A, clock.now)
    clock.now += 1.0
    key.release(A, clock.now)
    key.leave(clock.now)
    key.arrive(clock.now)  # another one, held now
    _, deployments = load.report(table(), {KEY: 1}, reset=True)
    figures = deployments[KEY]
    assert figures.concurrency == 1.0 and figures.in_flight == 1 and figures.queued == 1 and figures.requests == 2
    assert figures.per_replica == {A: 0.5}  # gone from the table, but it served during the interval


def test_a_peek_covers_the_previous_interval_and_resets_nothing() -> None:
    load, clock = meter()
    key = load.keys[KEY]
    for _ in range(3):
        key.arrive(clock.now)
        key.leave(clock.now + 0.5)
    clock.now += 2.0
    load.report(table(), {}, reset=True)  # 3 requests, concurrency 0.75
    clock.now += 0.1
    key.arrive(clock.now)  # the kick: a request held, report at once
    interval, deployments = load.report(table(), {KEY: 1}, reset=False)
    assert interval == 2.1
    figures = deployments[KEY]
    assert figures.requests == 4 and figures.queued == 1 and figures.in_flight == 1
    assert figures.concurrency == pytest.approx(1.5 / 2.1, abs=1e-3)
    assert figures.rps == pytest.approx(4 / 2.1, abs=1e-3)
    clock.now += 1.9  # the tick after it: the current interval only, the peek changed nothing
    interval, deployments = load.report(table(), {KEY: 1}, reset=True)
    assert interval == 2.0
    assert deployments[KEY].requests == 1 and deployments[KEY].concurrency == pytest.approx(1.9 / 2.0)


def test_only_recently_active_deployments_are_reported() -> None:
    load, clock = meter()
    load.sync([KEY, "quiet/production"])
    assert load.report(table(), {}, reset=True)[1] == {}  # no request ever
    key = load.keys[KEY]
    key.arrive(clock.now)
    key.leave(clock.now)
    clock.now += ACTIVE_WINDOW - 1
    assert set(load.report(table(), {}, reset=True)[1]) == {KEY}
    clock.now += 2
    assert load.report(table(), {}, reset=True)[1] == {}
    assert set(load.report(table(), {KEY: 1}, reset=True)[1]) == {KEY}  # requests held: reported


def test_a_report_right_after_the_start_does_not_inflate_rates() -> None:
    load, clock = meter()
    clock.now += 0.01
    load.keys[KEY].arrive(clock.now)
    interval, deployments = load.report(table(), {}, reset=False)
    assert interval == MIN_WINDOW and deployments[KEY].rps == 1.0


def test_forgotten_deployments_and_idle_backends_are_dropped() -> None:
    load, clock = meter()
    key = load.keys[KEY]
    key.arrive(clock.now)
    key.acquire(A, clock.now)
    clock.now += 1
    key.release(A, clock.now)
    key.leave(clock.now)
    load.report(table(), {}, reset=True)
    assert A in key.backends  # it served during the interval reported last
    clock.now += 2
    load.report(table(), {}, reset=True)
    assert not key.backends
    load.sync([])
    assert load.keys == {}
    key.leave(clock.now)  # a request that outlived its deployment's metering: harmless


def test_figures_through_the_gateway(backends: Any, make_gateway: Any, demand_server: Any) -> None:
    """Four concurrent slow requests: the reports in the middle of them say a concurrency of about 4."""
    _, a = backends("a")
    daemon, api = demand_server()
    gw = make_gateway({KEY: (route(a),)}, activation={KEY: Activation()}, control_plane=api.url,
                      report_interval=0.25)
    requests = [InBackground(gw.url, "GET", "/models/m/slow?ms=2500") for _ in range(4)]
    wait_for(lambda: gw.app.load.keys[KEY].in_flight == 4, "4 requests in flight")
    first = len(daemon.reports)
    wait_for(lambda: len(daemon.reports) >= first + 3, "three reports while they run")
    for request in requests:
        assert request.result().status_code == 200
    reports = [DemandReport.model_validate(r) for r in daemon.reports[first:]]
    during = [r.deployments[KEY] for r in reports if KEY in r.deployments and r.deployments[KEY].in_flight == 4]
    assert len(during) >= 2
    # The first report after they started may cover a little time before; the next ones lie within.
    best = max(d.concurrency for d in during)
    assert 3.5 <= best <= 4.0
    assert max(d.per_replica.get(a.url, 0.0) for d in during) >= 3.5
    wait_for(lambda: any(KEY in r.deployments and r.deployments[KEY].in_flight == 0 for r in daemon.reports),
             "a report after they ended")
    total = sum(r.deployments[KEY].requests for r in daemon.reports if KEY in r.deployments)
    assert total == 4  # every tick resets: each arrival is counted once
