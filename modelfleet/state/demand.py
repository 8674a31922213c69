"""Demand and load as the gateways see it: the one typed contract between gateways and the daemon.

A gateway sends a ``DemandReport`` to the daemon (``POST /api/v1/demand``) every ~2 s, and at once
when it starts holding a request for a deployment that has no ready replica (activation). The
daemon sums the reports of every gateway into ``LoadSample``s, which the autoscaler
(``state/autoscaler.py``) reads. Times inside a report are durations measured by the gateway (no
wall clock crosses machines); the daemon stamps each report with its own clock when it arrives.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

# How often a gateway reports (seconds); the daemon treats a gateway silent for REPORT_STALE_AFTER
# as gone (its load no longer counts).
REPORT_INTERVAL = 2.0
REPORT_STALE_AFTER = 10.0


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class DemandReport(_Wire):
    """What one gateway reports."""

    gateway: str = Field(min_length=1, max_length=200, description="The gateway's id (stable across its restarts "
                                                                   "when configured, else host:pid).")
    location: str | None = Field(None, description="gateway.location, when configured.")
    interval: float = Field(ge=0, le=3600, description="Seconds the load figures cover.")
    table_version: int = Field(0, ge=0, description="The route table version the gateway serves.")
    deployments: dict[str, DeploymentLoad] = Field(default_factory=dict,
                                                   description="route_key(model, environment) -> load.")


@dataclass(frozen=True)
class LoadSample:
    """The load of one deployment summed over every live gateway, as the daemon received it."""

    at: float  # the daemon's clock when the report arrived
    concurrency: float
    rps: float
    queued: int
    in_flight: int
    idle_seconds: float | None  # the smallest over the gateways (None: no request seen by any)
