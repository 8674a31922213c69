"""Demand and load as the gateways see it: the one typed contract between gateways and the daemon.

A gateway sends a ``DemandReport`` to the daemon (``POST /api/v1/demand``) every ~2 s, and at once
when it starts holding a request for a deployment that has no ready replica (activation). The
daemon sums the reports of every gateway into ``LoadSample``s, which the autoscaler
(``state/autoscaler.py``) reads. Times inside a report are durations measured by the gateway (no
wall clock crosses machines); the daemon stamps each report with its own clock when it arrives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

# How often a gateway reports (seconds); the daemon treats a gateway silent for REPORT_STALE_AFTER
# as gone (its load no longer counts).
REPORT_INTERVAL = 2.0
REPORT_STALE_AFTER = 10.0
TRAFFIC_WINDOW = 10.0  # seconds of reports a deployment's request and error rates are taken over


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OverflowLoad(_Wire):
    """Where one gateway sent the requests of a deployment with an overflow (on-prem) endpoint."""

    endpoint_healthy: bool = Field(description="The endpoint gets traffic now (healthy, not ejected).")
    to_endpoint: int = Field(0, ge=0, description="Requests the endpoint answered during the interval.")
    to_pool: int = Field(0, ge=0, description="Requests sent to the pool (the replicas) during the interval.")


class DeploymentLoad(_Wire):
    """One deployment's load at one gateway, over the report's interval."""

    concurrency: float = Field(0.0, ge=0, description="Mean requests in flight over the interval "
                                                      "(held ones included).")
    in_flight: int = Field(0, ge=0, description="Requests in flight when the report was sent (held ones included).")
    queued: int = Field(0, ge=0, description="Requests held for activation when the report was sent.")
    requests: int = Field(0, ge=0, description="Requests that arrived during the interval.")
    rps: float = Field(0.0, ge=0, description="requests / interval.")
    idle_seconds: float | None = Field(None, ge=0, description="Seconds since the last request arrived; "
                                                               "None: none since the gateway started.")
    per_replica: dict[str, float] = Field(default_factory=dict,
                                          description="Backend URL -> mean requests in flight over the interval.")
    overflow: OverflowLoad | None = Field(None, description="Deployments with an overflow endpoint: where "
                                                            "requests went (only the pool's count as load above).")


class DeploymentTraffic(_Wire):
    """One deployment's answers at one gateway since the gateway started (cumulative counters:
    a rate is the difference of two reports, so a lost or overlapping report loses nothing)."""

    requests: int = Field(0, ge=0, description="Requests answered, whatever the status code.")
    errors: int = Field(0, ge=0, description="Of those, the ones answered 5xx (the gateway's own 502/503/504 "
                                             "included).")


class TokensCounted(_Wire):
    """One deployment's tokens at one gateway since the gateway started (cumulative, like
    ``DeploymentTraffic``: the daemon counts the difference between two reports)."""

    input: int = Field(0, ge=0, description="Input (prompt) tokens.")
    output: int = Field(0, ge=0, description="Output (completion) tokens.")


class DemandReport(_Wire):
    """What one gateway reports."""

    gateway: str = Field(min_length=1, max_length=200, description="The gateway's id (stable across its restarts "
                                                                   "when configured, else host:pid).")
    location: str | None = Field(None, description="gateway.location, when configured.")
    interval: float = Field(ge=0, le=3600, description="Seconds the load figures cover.")
    table_version: int = Field(0, ge=0, description="The route table version the gateway serves.")
    deployments: dict[str, DeploymentLoad] = Field(default_factory=dict,
                                                   description="route_key(model, environment) -> load.")
    traffic: dict[str, DeploymentTraffic] = Field(
        default_factory=dict, description="route_key(model, environment) -> requests and errors since the gateway "
                                          "started, for every deployment of its route table that was requested.")
    tokens: dict[str, TokensCounted] = Field(
        default_factory=dict, description="route_key(model, environment) -> tokens counted since the gateway started "
                                          "(from the responses' OpenAI-style usage, else estimated).")


class WindowUsage(_Wire):
    """Tokens used by a deployment in one window, summed over every gateway (the daemon's count)."""

    window: float = Field(description="The window's start, seconds since the epoch (UTC calendar period).")
    input: int = Field(0, ge=0)
    output: int = Field(0, ge=0)


class DemandReply(_Wire):
    """The daemon's answer to a demand report."""

    accepted: bool = True
    activating: list[str] = Field(default_factory=list, description="Route keys the daemon activates now.")
    tokens: dict[str, dict[str, WindowUsage]] = Field(
        default_factory=dict, description="route_key -> granularity (minute, hour, day, month) -> the tokens used in "
                                          "its current window, for the deployments with token limits.")


@dataclass(frozen=True)
class LoadSample:
    """The load of one deployment summed over every live gateway, as the daemon received it."""

    at: float  # the daemon's clock when the report arrived
    concurrency: float
    rps: float
    queued: int
    in_flight: int
    idle_seconds: float | None  # the smallest over the gateways (None: no request seen by any)
    overflow: OverflowLoad | None = None  # summed over the gateways; healthy: at every one of them


def overflow_message(overflow: OverflowLoad) -> str:
    """Where a deployment's traffic goes, for its status (from the gateways' latest reports)."""
    if overflow.endpoint_healthy:
        where = "traffic goes to the overflow endpoint"
    else:
        where = "the overflow endpoint is unhealthy (or ejected) at a gateway: its traffic goes to the pool"
    return f"{where} ({overflow.to_endpoint} answered by the endpoint, {overflow.to_pool} sent to the pool lately)"


@dataclass(frozen=True)
class TrafficRate:
    """A deployment's requests and 5xx answers per second, summed over the gateways."""

    rps: float
    errors_per_second: float
    window: float  # the longest span of reports a rate was taken over (seconds)


def traffic_rates(reports: Mapping[str, Sequence[tuple[float, Mapping[str, DeploymentTraffic]]]],
                  window: float = TRAFFIC_WINDOW) -> dict[str, TrafficRate]:
    """Per route key, the rates over the last ``window`` seconds of each gateway's reports
    (gateway -> [(arrival time, its traffic counters)], oldest first), summed over the gateways.
    A gateway's rate is (latest - the oldest report within the window) / the time between them; a
    gateway with one report in the window gives none yet. A counter that went down (the gateway
    restarted under the same id) counts from zero."""
    rps: dict[str, float] = {}
    errors: dict[str, float] = {}
    spans: dict[str, float] = {}
    for received in reports.values():
        if len(received) < 2:
            continue
        latest_at, latest = received[-1]
        old_at, old = next(((at, c) for at, c in received if latest_at - at <= window), received[-1])
        span = latest_at - old_at
        if span <= 0:
            continue
        for key, now in latest.items():
            before = old.get(key)
            requests = now.requests - before.requests if before is not None else now.requests
            failed = now.errors - before.errors if before is not None else now.errors
            if requests < 0 or failed < 0:  # restarted: its counters began again from zero
                requests, failed = now.requests, now.errors
            rps[key] = rps.get(key, 0.0) + requests / span
            errors[key] = errors.get(key, 0.0) + failed / span
            spans[key] = max(spans.get(key, 0.0), span)
    return {key: TrafficRate(round(rps[key], 3), round(errors[key], 3), round(spans[key], 3)) for key in rps}
