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

# Cold starts as clients see them: from a held request's arrival to its forwarding to a new replica.
HOLD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0,
                120.0, 180.0, 300.0)

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
        # Serverless activation (requests held while a deployment has no ready replica) and demand reports.
        self.activations = Counter(
            "modelfleet_gateway_activations",
            "Requests held because their serverless deployment had no ready replica", ["model", "environment"],
            registry=self.registry)
        self.held_requests = Gauge(
            "modelfleet_gateway_activation_held_requests",
            "Requests held now, waiting for a replica of their serverless deployment to become ready",
            ["model", "environment"], registry=self.registry)
        self.activation_timeouts = Counter(
            "modelfleet_gateway_activation_timeouts",
            "Held requests answered 503 because no replica became ready within the activation timeout",
            ["model", "environment"], registry=self.registry)
        self.activation_queue_full = Counter(
            "modelfleet_gateway_activation_queue_full",
            "Requests answered 503 because the deployment's activation queue was full",
            ["model", "environment"], registry=self.registry)
        self.hold_duration = Histogram(
            "modelfleet_gateway_activation_hold_duration_seconds",
            "Time from a held request's arrival to its forwarding to a replica (the cold start clients see)",
            ["model", "environment"], buckets=HOLD_BUCKETS, registry=self.registry)
        self.demand_reports = Counter(
            "modelfleet_gateway_demand_reports",
            "Demand reports sent to the control plane, by result (ok, failed)", ["result"],
            registry=self.registry)
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

    def held(self, model: str, environment: str) -> Gauge:
        """The held-requests gauge of one deployment."""
        return self.held_requests.labels(model, environment)

    def activation(self, model: str, environment: str) -> None:
        self.activations.labels(model, environment).inc()

    def activation_timeout(self, model: str, environment: str) -> None:
        self.activation_timeouts.labels(model, environment).inc()

    def activation_rejected(self, model: str, environment: str) -> None:
        self.activation_queue_full.labels(model, environment).inc()

    def held_for(self, model: str, environment: str, seconds: float) -> None:
        self.hold_duration.labels(model, environment).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
