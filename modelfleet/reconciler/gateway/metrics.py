"""Prometheus metrics of the gateway, one registry per gateway instance.

Children of labelled metrics are cached so that the hot path does one dict lookup instead of
``labels()``; label values are bounded: the deployment labels are only set for deployments that
are in the route table (unknown paths count under empty labels).

The per-request figures (requests, their latency, requests in flight) are counted in plain Python
on the hot path and handed to prometheus_client in bulk by :meth:`GatewayMetrics.sync`: before
every ``/metrics`` answer and every 0.5 s (the execution recorder's tick). prometheus_client takes
a lock per update, and with several workers writes a memory-mapped file each time (~15 µs a
request for these metrics, against well under 1 µs counted here). With several workers, another
worker's figures in ``/metrics`` are thus up to half a second old; the execution metrics (per
version and location) are applied a batch at a time by the recorder's thread.
"""

from __future__ import annotations

import bisect
import contextlib
import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 120.0, 300.0)

# Cold starts as clients see them: from a held request's arrival to its forwarding to a new replica.
HOLD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0,
                120.0, 180.0, 300.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST
_BOUNDS = (*LATENCY_BUCKETS, float("inf"))


class LiveCount:
    """A count that goes up and down on the hot path (requests in flight); its gauge follows at sync."""

    __slots__ = ("gauge", "synced", "value")

    def __init__(self, gauge: Gauge) -> None:
        self.gauge = gauge
        self.value = 0
        self.synced = 0

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1


def _pending_histogram() -> list[float]:
    """Observations not yet handed over: one count per bucket of LATENCY_BUCKETS (and +Inf), then their sum."""
    return [0] * (len(_BOUNDS) + 1)


def _add_to_histogram(child: Histogram, pending: list[float]) -> None:
    """Hand ``pending`` to ``child`` in bulk: prometheus_client keeps a (non-cumulative) value per bucket
    and the sum, which Histogram.observe increments one observation at a time."""
    buckets = child._buckets  # the bulk form of observe(); tests/reconciler/gateway/test_metrics.py
    for index, count in enumerate(pending[:-1]):
        if count:
            buckets[index].inc(count)
    child._sum.inc(pending[-1])


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
            registry=self.registry, multiprocess_mode="livemin")  # workers: the one most behind
        self.route_table_published = Gauge(
            "modelfleet_gateway_route_table_published_timestamp_seconds",
            "When the route table being served was published (Unix time)", registry=self.registry,
            multiprocess_mode="livemin")
        self.route_table_read_failing = Gauge(
            "modelfleet_gateway_route_table_read_failing",
            "1 while the route table cannot be read (routes.db, or the control plane; the last one is kept)",
            registry=self.registry, multiprocess_mode="livemax")
        # Serverless activation (requests held while a deployment has no ready replica) and demand reports.
        self.activations = Counter(
            "modelfleet_gateway_activations",
            "Requests held because their serverless deployment had no ready replica", ["model", "environment"],
            registry=self.registry)
        self.held_requests = Gauge(
            "modelfleet_gateway_activation_held_requests",
            "Requests held now, waiting for a replica of their serverless deployment to become ready",
            ["model", "environment"], registry=self.registry, multiprocess_mode="livesum")
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
        # Per version (the spec hash of the replica that answered, "" when none did) and location (of
        # its host): fed from the execution records, off the hot path (gateway/executions.py).
        self.executions = Counter(
            "modelfleet_gateway_executions",
            "Inference requests by deployment, version (spec hash), location of the replica and status code",
            ["model", "environment", "version", "location", "code"], registry=self.registry)
        self.execution_latency = Histogram(
            "modelfleet_gateway_execution_duration_seconds",
            "Time from request to the last response byte, by deployment, version and location",
            ["model", "environment", "version", "location"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.cold_starts = Counter(
            "modelfleet_gateway_cold_starts",
            "Requests that waited for a replica to start (activation) before being served",
            ["model", "environment"], registry=self.registry)
        # The overflow share: modelfleet_gateway_overflow_requests_total{target} (gateway/overflow.py).
        self.in_flight = Gauge(
            "modelfleet_gateway_in_flight_requests", "Requests being served now (held ones included), by deployment",
            ["model", "environment"], registry=self.registry, multiprocess_mode="livesum")
        # Token limits (gateway/tokens.py): tokens counted from the responses, requests refused over a limit.
        self.tokens = Counter(
            "modelfleet_gateway_tokens",
            "Tokens of inference responses (their OpenAI-style usage, else estimated) by deployment, version, "
            "location and kind (input, output)", ["model", "environment", "version", "location", "kind"],
            registry=self.registry)
        self.token_limited = Counter(
            "modelfleet_gateway_token_limited_requests",
            "Requests answered 429 because their deployment used up its token limits (maxToken policies)",
            ["model", "environment"], registry=self.registry)
        self._requests: dict[tuple[str, str, int], Counter] = {}
        self._in_flight: dict[tuple[str, str], LiveCount] = {}
        # Counted on the hot path, handed to prometheus_client by sync() (on the event loop).
        self._request_counts: dict[tuple[str, str, int], int] = {}
        # (model, environment, version, location, kind) -> tokens counted (gateway/tokens.py).
        self._token_counts: dict[tuple[str, str, str, str, str], int] = {}
        self._token_series: set[tuple[str, str, str, str, str]] = set()  # the label sets handed over
        self._latency_pending: dict[tuple[str, str], list[float]] = {}
        # The recorder thread's execution figures, handed over at the end of each batch.
        self._execution_pending: dict[tuple[str, str, str, str, int], list[float]] = {}
        self._cold_pending: dict[tuple[str, str], int] = {}
        self._executions: dict[tuple[str, str, str, str, int], tuple[Counter, Histogram]] = {}
        self._latency: dict[tuple[str, str], Histogram] = {}
        # (model, environment) -> [requests, 5xx answers] since the start: the demand reports' `traffic`.
        self.traffic: dict[tuple[str, str], list[int]] = {}

    def observe(self, model: str, environment: str, code: int, seconds: float) -> None:
        key = (model, environment, code)
        counts = self._request_counts
        counts[key] = counts.get(key, 0) + 1
        if code != 404:  # unknown deployments only count; they have no latency worth a series
            hkey = (model, environment)
            totals = self.traffic.get(hkey)
            if totals is None:
                totals = self.traffic[hkey] = [0, 0]
            totals[0] += 1
            if code >= 500:
                totals[1] += 1
            pending = self._latency_pending.get(hkey)
            if pending is None:
                pending = self._latency_pending[hkey] = _pending_histogram()
            pending[bisect.bisect_left(_BOUNDS, seconds)] += 1
            pending[-1] += seconds

    def in_flight_of(self, model: str, environment: str) -> LiveCount:
        key = (model, environment)
        count = self._in_flight.get(key)
        if count is None:
            count = self._in_flight[key] = LiveCount(self.in_flight.labels(model, environment))
        return count

    def count_tokens(self, model: str, environment: str, version: str, location: str, input: int,
                     output: int) -> None:
        """Tokens of one response (``version``: the spec hash of the replica that answered, or '')."""
        counts = self._token_counts
        for kind, value in (("input", input), ("output", output)):
            if value:
                key = (model, environment, version[:12], location, kind)
                counts[key] = counts.get(key, 0) + value

    def sync(self) -> None:
        """Hand what the hot path counted to prometheus_client (call on the event loop)."""
        tokens, self._token_counts = self._token_counts, {}
        for labels, value in tokens.items():
            self.tokens.labels(*labels).inc(value)
            self._token_series.add(labels)
        counts, self._request_counts = self._request_counts, {}
        for key, count in counts.items():
            counter = self._requests.get(key)
            if counter is None:
                model, environment, code = key
                counter = self._requests[key] = self.requests.labels(model, environment, str(code))
            counter.inc(count)
        latencies, self._latency_pending = self._latency_pending, {}
        for hkey, pending in latencies.items():
            histogram = self._latency.get(hkey)
            if histogram is None:
                histogram = self._latency[hkey] = self.latency.labels(*hkey)
            _add_to_histogram(histogram, pending)
        for live in self._in_flight.values():
            if live.value != live.synced:
                live.synced = live.value
                live.gauge.set(live.value)

    def execution(self, model: str, environment: str, version: str, location: str, code: int, seconds: float,
                  cold_start: bool) -> None:
        """One execution record (not for unknown deployments: their model is ''); applied by
        :meth:`apply_executions` (the recorder calls both from its thread)."""
        if not model:
            return
        key = (model, environment, version, location, code)
        pending = self._execution_pending.get(key)
        if pending is None:
            pending = self._execution_pending[key] = _pending_histogram()
        pending[bisect.bisect_left(_BOUNDS, seconds)] += 1
        pending[-1] += seconds
        if cold_start:
            ckey = (model, environment)
            self._cold_pending[ckey] = self._cold_pending.get(ckey, 0) + 1

    def apply_executions(self) -> None:
        """Hand the execution records counted by :meth:`execution` to prometheus_client."""
        pending, self._execution_pending = self._execution_pending, {}
        for key, observations in pending.items():
            children = self._executions.get(key)
            if children is None:
                model, environment, version, location, code = key
                children = self._executions[key] = (
                    self.executions.labels(model, environment, version[:12], location, str(code)),
                    self.execution_latency.labels(model, environment, version[:12], location))
            children[0].inc(sum(observations[:-1]))
            _add_to_histogram(children[1], observations)
        cold, self._cold_pending = self._cold_pending, {}
        for (model, environment), count in cold.items():
            self.cold_starts.labels(model, environment).inc(count)

    def forget_versions(self, live: set[str]) -> None:
        """Drop the per-version series of versions no route serves any more, so that label sets stay
        bounded. ``live``: the spec hashes of the backends in the route table."""
        for key in [k for k in self._executions if k[2] and k[2] not in live]:
            del self._executions[key]
            model, environment, version, location, code = key
            for metric, labels in ((self.executions, (model, environment, version[:12], location, str(code))),
                                   (self.execution_latency, (model, environment, version[:12], location))):
                with contextlib.suppress(KeyError):
                    metric.remove(*labels)
        short = {version[:12] for version in live}
        for labels in [t for t in self._token_series if t[2] and t[2] not in short]:
            self._token_series.discard(labels)
            with contextlib.suppress(KeyError):
                self.tokens.remove(*labels)

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
        """The metrics of this gateway; with several workers (gateway/workers.py), of all of them."""
        self.sync()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            combined = CollectorRegistry()
            multiprocess.MultiProcessCollector(combined)
            return generate_latest(combined)
        return generate_latest(self.registry)
