"""Prometheus metrics of the gateway, one registry per gateway instance.

Children of labelled metrics are cached so that the hot path does one dict lookup instead of
``labels()``; label values are bounded: the deployment labels are only set for deployments that
are in the route table (unknown paths count under empty labels).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 120.0, 300.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "modelfleet_gateway_requests", "Inference requests by deployment and response status code",
            ["model", "environment", "code"], registry=self.registry)
        self.latency = Histogram(
            "modelfleet_gateway_request_duration_seconds",
            "Time from request to the last response byte, by deployment",
            ["model", "environment"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.backend_errors = Counter(
            "modelfleet_gateway_backend_errors",
            "Failed exchanges with a backend (connect, protocol, timeout, stream)",
            ["model", "environment", "kind"], registry=self.registry)
        self.retries = Counter(
            "modelfleet_gateway_retries", "Requests retried on another backend after a connection failure",
            ["model", "environment"], registry=self.registry)
        self.route_table_version = Gauge(
            "modelfleet_gateway_route_table_version", "Version of the route table being served",
            registry=self.registry)
        self.route_table_published = Gauge(
            "modelfleet_gateway_route_table_published_timestamp_seconds",
            "When the route table being served was published (Unix time)", registry=self.registry)
        self.route_table_read_failing = Gauge(
            "modelfleet_gateway_route_table_read_failing",
            "1 while routes.db is missing or unreadable (the last table read is kept)", registry=self.registry)
        self._requests: dict[tuple[str, str, int], Counter] = {}
        self._latency: dict[tuple[str, str], Histogram] = {}

    def observe(self, model: str, environment: str, code: int, seconds: float) -> None:
        key = (model, environment, code)
        counter = self._requests.get(key)
        if counter is None:
            counter = self._requests[key] = self.requests.labels(model, environment, str(code))
        counter.inc()
        if code != 404:  # unknown deployments only count; they have no latency worth a series
            hkey = (model, environment)
            histogram = self._latency.get(hkey)
            if histogram is None:
                histogram = self._latency[hkey] = self.latency.labels(model, environment)
            histogram.observe(seconds)

    def backend_error(self, model: str, environment: str, kind: str) -> None:
        self.backend_errors.labels(model, environment, kind).inc()

    def retry(self, model: str, environment: str) -> None:
        self.retries.labels(model, environment).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
