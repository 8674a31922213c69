"""The gateway's metrics counted on the hot path and handed to prometheus_client in bulk: the same
figures as observing each request through prometheus_client itself."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

from modelfleet.reconciler.gateway.metrics import LATENCY_BUCKETS, GatewayMetrics


def samples(text: bytes, name: str) -> dict[str, float]:
    found = {}
    for line in text.decode().splitlines():
        if line.startswith(name) and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            found[series.removeprefix(name)] = float(value)
    return found


def test_bulk_figures_equal_one_observation_at_a_time() -> None:
    rng = random.Random(7)
    metrics = GatewayMetrics()
    reference = CollectorRegistry()
    latency = Histogram("modelfleet_gateway_request_duration_seconds", "x", ["model", "environment"],
                        buckets=LATENCY_BUCKETS, registry=reference)
    requests = Counter("modelfleet_gateway_requests", "x", ["model", "environment", "code"], registry=reference)
    for round_ in range(3):  # several syncs in between, as the recorder's tick does
        for _ in range(500):
            # Bucket bounds themselves (le is inclusive), tiny and huge values, and random ones.
            seconds = rng.choice([*LATENCY_BUCKETS, 0.0, 1e-6, 1000.0, rng.uniform(0, 2), rng.expovariate(100)])
            model = rng.choice(["a", "b"])
            code = rng.choice([200, 200, 503, 499])
            metrics.observe(model, "production", code, seconds)
            requests.labels(model, "production", str(code)).inc()
            latency.labels(model, "production").observe(seconds)
        if round_ != 2:
            metrics.sync()
    ours, theirs = metrics.render(), generate_latest(reference)
    for name in ("modelfleet_gateway_request_duration_seconds_bucket", "modelfleet_gateway_requests_total",
                 "modelfleet_gateway_request_duration_seconds_count"):
        assert samples(ours, name) == samples(theirs, name), name
    ours_sum = samples(ours, "modelfleet_gateway_request_duration_seconds_sum")
    for series, value in samples(theirs, "modelfleet_gateway_request_duration_seconds_sum").items():
        assert abs(ours_sum[series] - value) < 1e-6


def test_requests_in_flight_are_shown_as_of_the_last_sync() -> None:
    metrics = GatewayMetrics()
    live = metrics.in_flight_of("m", "production")
    live.inc()
    live.inc()
    assert 'modelfleet_gateway_in_flight_requests{environment="production",model="m"} 2.0' in metrics.render().decode()
    live.dec()
    assert 'modelfleet_gateway_in_flight_requests{environment="production",model="m"} 1.0' in metrics.render().decode()


def test_execution_figures_per_version_are_applied_a_batch_at_a_time() -> None:
    metrics = GatewayMetrics()
    for seconds in (0.001, 0.002, 0.5):
        metrics.execution("m", "production", "abcdef0123456789", "paris", 200, seconds, cold_start=seconds > 0.1)
    metrics.execution("", "", "", "", 404, 0.001, cold_start=False)  # unknown deployment: not a series
    assert b'version="abcdef012345"' not in metrics.render()
    metrics.apply_executions()
    text = metrics.render().decode()
    assert ('modelfleet_gateway_executions_total{code="200",environment="production",location="paris",'
            'model="m",version="abcdef012345"} 3.0') in text
    assert ('modelfleet_gateway_execution_duration_seconds_bucket{environment="production",le="0.0025",'
            'location="paris",model="m",version="abcdef012345"} 2.0') in text
    assert 'modelfleet_gateway_cold_starts_total{environment="production",model="m"} 1.0' in text


def test_series_of_versions_no_route_serves_are_dropped_token_series_included() -> None:
    metrics = GatewayMetrics()
    old, new = "a" * 64, "b" * 64
    for version in (old, new):
        metrics.execution("m", "production", version, "paris-1", 200, 0.01, False)
        metrics.count_tokens("m", "production", version, "paris-1", 5, 7)
    metrics.apply_executions()
    metrics.sync()
    before = generate_latest(metrics.registry)
    assert f'version="{old[:12]}"'.encode() in before and b"modelfleet_gateway_tokens_total" in before
    metrics.forget_versions({new})
    after = generate_latest(metrics.registry).decode()
    assert old[:12] not in after
    tokens = samples(after.encode(), "modelfleet_gateway_tokens_total")
    assert sorted(tokens.values()) == [5.0, 7.0] and all(new[:12] in k for k in tokens)
    executions = samples(after.encode(), "modelfleet_gateway_executions_total")
    assert list(executions.values()) == [1.0] and new[:12] in next(iter(executions))
