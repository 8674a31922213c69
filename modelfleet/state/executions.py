"""Executions (inference requests) as the gateways saw them: the typed contract between gateways
and the daemon, and the pure rules of the daemon's journal of them.

Every gateway logs one line per request (``modelfleet.executions``) and sends the same records to
the daemon (``POST /api/v1/executions``) in batches, about every second. The daemon keeps the latest
of each deployment in memory for ``GET /api/v1/logs/<model>`` and ``modelfleet logs``; the gateways'
log lines are the durable record.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# A batch carries at most this many records; a gateway that has more sends several.
MAX_BATCH = 2000
# Request ids the gateway accepts from clients (else it makes its own): printable ASCII, bounded.
MAX_REQUEST_ID = 128


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Execution(_Wire):
    """One inference request, as the gateway that answered it saw it."""

    time: float = Field(description="When the request arrived (Unix time, the gateway's clock).")
    request_id: str = Field(min_length=1, max_length=MAX_REQUEST_ID,
                            description="X-Request-Id: the client's, else one the gateway made; sent to the replica.")
    model: str
    environment: str
    status: int = Field(ge=100, le=599, description="The status code the client got (499: it went away first).")
    duration_ms: float = Field(ge=0, description="From the request's arrival to the last response byte.")
    request_bytes: int = Field(0, ge=0)
    response_bytes: int = Field(0, ge=0, description="Response body bytes sent to the client.")
    spec_hash: str = Field("", description="The version that answered: the replica's spec hash ('' when none did).")
    revision: str = Field("", description="The git revision that replica was deployed from.")
    host: str = Field("", description="The pool host of the replica ('' when none answered).")
    location: str = Field("", description="The location of that host (pool.hosts[].location.name).")
    replica: int | None = Field(None, description="The replica's index within its deployment.")
    container: str = Field("", description="The replica's container name.")
    cold_start: bool = Field(False, description="Held while the deployment had no ready replica (activation).")
    overflow: bool = Field(False, description="Answered by the deployment's overflow (on-prem) endpoint.")
    retry: bool = Field(False, description="Sent a second time, after the first backend failed before answering.")
    gateway: str = Field("", description="The gateway's id.")
    gateway_location: str = Field("", description="gateway.location of that gateway.")


class ExecutionBatch(_Wire):
    """What one gateway sends: its executions since the last batch, oldest first."""

    gateway: str = Field(min_length=1, max_length=200)
    location: str | None = None
    dropped: int = Field(0, ge=0, description="Records the gateway dropped since the last batch (its buffer was "
                                              "full while the daemon was unreachable).")
    executions: list[Execution] = Field(default_factory=list, max_length=MAX_BATCH)


def valid_request_id(value: bytes) -> str | None:
    """A client's X-Request-Id as kept: printable ASCII of at most MAX_REQUEST_ID bytes, else None."""
    if not value or len(value) > MAX_REQUEST_ID:
        return None
    if not all(0x21 <= byte <= 0x7E for byte in value):
        return None
    return value.decode("ascii")


def select(entries: Iterable[tuple[int, Execution]], model: str, environment: str | None, since: int,
           limit: int) -> list[tuple[int, Execution]]:
    """The newest ``limit`` entries (sequence number, execution) of a deployment after ``since``,
    oldest first. ``environment`` None: every environment of the model."""
    chosen = [(seq, e) for seq, e in entries
              if seq > since and e.model == model and (environment is None or e.environment == environment)]
    return chosen[-limit:] if limit > 0 else []


def describe(execution: Mapping[str, Any]) -> str:
    """One line of text for an execution (an :class:`Execution`'s fields), as the gateway logs it and
    ``modelfleet logs`` prints it."""
    host = execution.get("host")
    spec_hash = execution.get("spec_hash")
    where = f"{host}/r{execution.get('replica')}" if host else "-"
    version = f"{spec_hash[:12]}@{str(execution.get('revision'))[:12]}" if spec_hash else "-"
    flags = [name for name, key in (("cold", "cold_start"), ("overflow", "overflow"), ("retry", "retry"))
             if execution.get(key)]
    return (f"{execution['model']}/{execution['environment']} {execution['status']} "
            f"{execution['duration_ms']:.1f}ms {execution.get('response_bytes', 0)}B {where} {version} "
            f"{execution.get('location') or '-'} id={execution['request_id']}"
            + (f" [{','.join(flags)}]" if flags else ""))
