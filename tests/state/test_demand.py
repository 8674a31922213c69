"""traffic_rates: requests and 5xx answers per second from the gateways' cumulative counters."""

from __future__ import annotations

import pytest

from modelfleet.state.demand import DeploymentTraffic, TrafficRate, traffic_rates

KEY = "m/production"


def t(requests: int, errors: int = 0) -> DeploymentTraffic:
    return DeploymentTraffic(requests=requests, errors=errors)


def test_a_rate_is_the_difference_over_the_window_summed_over_gateways() -> None:
    rates = traffic_rates({
        "gw-1": [(0.0, {KEY: t(0)}), (2.0, {KEY: t(10)}), (4.0, {KEY: t(30, 2)}), (12.0, {KEY: t(70, 4)})],
        "gw-2": [(1.0, {KEY: t(5, 5)}), (3.0, {KEY: t(9, 7)})],
    }, window=10.0)
    # gw-1: the oldest report within 10 s of the latest is at 2.0: (70 - 10) / 10 = 6/s, 4 errors / 10 s.
    # gw-2: (9 - 5) / 2 = 2/s, (7 - 5) / 2 = 1 error/s.
    assert rates == {KEY: TrafficRate(rps=8.0, errors_per_second=1.4, window=10.0)}


def test_one_report_gives_no_rate_yet_and_a_new_deployment_counts_from_zero() -> None:
    assert traffic_rates({"gw": [(0.0, {KEY: t(100)})]}) == {}
    rates = traffic_rates({"gw": [(0.0, {}), (2.0, {KEY: t(4, 1)})]})
    assert rates == {KEY: TrafficRate(rps=2.0, errors_per_second=0.5, window=2.0)}


def test_a_gateway_restarted_under_the_same_id_counts_from_zero() -> None:
    rates = traffic_rates({"gw": [(0.0, {KEY: t(1000, 10)}), (2.0, {KEY: t(6)})]})
    assert rates[KEY].rps == pytest.approx(3.0) and rates[KEY].errors_per_second == 0.0


def test_no_requests_is_a_rate_of_zero_not_no_rate() -> None:
    rates = traffic_rates({"gw": [(0.0, {KEY: t(7, 1)}), (2.0, {KEY: t(7, 1)})]})
    assert rates == {KEY: TrafficRate(rps=0.0, errors_per_second=0.0, window=2.0)}
