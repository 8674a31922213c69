"""Commit statuses and conditions-style deployment status, decided from a pass's facts (pure).

The vocabulary users match on: commit-status states (the forges' words), status contexts, condition
types (Ready / Reconciling / Stalled) and reason constants. The clock is an input (``now``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

State = Literal["pending", "success", "failure", "error"]
AGGREGATE_CONTEXT = "modelfleet"

# Reasons (constants users can match on).
READY = "Ready"
PROGRESSING = "Progressing"
INVALID_MANIFEST = "InvalidManifest"
ROLLOUT_FAILED = "RolloutFailed"
UNSCHEDULABLE = "Unschedulable"
HOST_ERROR = "HostError"
DISABLED = "Disabled"
STANDBY = "ScaledToZero"
GATEWAYS_SWITCHING = "GatewaysSwitching"  # ready, but a gateway does not serve the route table with it yet
DELETION_HELD = "DeletionHeld"  # removals held by deletion safety (state/safety.py) until confirmed
STALLING_REASONS = frozenset({INVALID_MANIFEST, UNSCHEDULABLE, ROLLOUT_FAILED, DELETION_HELD})

STATE_RANK: dict[State, int] = {"success": 0, "pending": 1, "failure": 2, "error": 3}


def deployment_context(environment: str, model: str) -> str:
    return f"modelfleet/{environment}/{model}"


@dataclass(frozen=True)
class CommitStatus:
    context: str
    state: State
    description: str  # human-actionable; forges cut it (GitHub: 140 chars), so put the gist first
    target_url: str | None = None


@dataclass
class Condition:
    type: str
    status: str  # True | False | Unknown
    reason: str
    message: str
    last_transition_time: float = 0.0


@dataclass
class DeploymentStatus:
    model: str
    environment: str
    state: State
    reason: str
    message: str
    hosts: list[str]
    ready_replicas: int
    desired_replicas: int
    revision: str
    conditions: list[Condition] = field(default_factory=list)
    origin: dict[str, object] | None = None  # as deployed (HF commit, archive sha256)
    notes: list[str] = field(default_factory=list)  # settings accepted but not in effect yet, and why
    # Serverless: the autoscaler's last decision (desired, reason, metric, value, panicking).
    autoscaler: dict[str, object] | None = None

    @property
    def context(self) -> str:
        return deployment_context(self.environment, self.model)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["context"] = self.context
        return data


def conditions_for(state: State, reason: str, message: str, previous: list[Condition] | None,
                   now: float) -> list[Condition]:
    ready = "True" if state == "success" else ("Unknown" if state == "pending" else "False")
    wanted = [
        Condition("Ready", ready, reason, message, now),
        Condition("Reconciling", "True" if state == "pending" else "False", reason, message, now),
        Condition("Stalled", "True" if reason in STALLING_REASONS else "False", reason, message, now),
    ]
    # Keep the transition time of a condition whose status did not change.
    old = {c.type: c for c in previous or []}
    for cond in wanted:
        prior = old.get(cond.type)
        if prior is not None and prior.status == cond.status:
            cond.last_transition_time = prior.last_transition_time
    return wanted


def aggregate(statuses: list[DeploymentStatus], global_errors: list[str],
              deletion_hold: str | None = None) -> CommitStatus:
    if global_errors:
        first = global_errors[0]
        more = f" (+{len(global_errors) - 1} more)" if len(global_errors) > 1 else ""
        return CommitStatus(AGGREGATE_CONTEXT, "failure", f"{first}{more}")
    if deletion_hold:  # deletion safety: the commit's removals wait for a confirmation
        return CommitStatus(AGGREGATE_CONTEXT, "failure", deletion_hold)
    if not statuses:
        return CommitStatus(AGGREGATE_CONTEXT, "success", "no deployments")
    worst: State = max((s.state for s in statuses), key=lambda st: STATE_RANK[st])
    bad = [s for s in statuses if s.state != "success"]
    if not bad:
        return CommitStatus(AGGREGATE_CONTEXT, "success", f"{len(statuses)} deployment(s) up to date")
    names = ", ".join(f"{s.environment}/{s.model}" for s in bad[:3]) + ("..." if len(bad) > 3 else "")
    verb = {"pending": "in progress", "failure": "failed", "error": "errored", "success": "ok"}[worst]
    return CommitStatus(AGGREGATE_CONTEXT, worst,
                        f"{len(bad)} of {len(statuses)} deployment(s) {verb}: {names} — {bad[0].message}")


def commit_statuses(statuses: list[DeploymentStatus], global_errors: list[str],
                    deletion_hold: str | None = None) -> list[CommitStatus]:
    return [CommitStatus(s.context, s.state, s.message) for s in statuses] + [
        aggregate(statuses, global_errors, deletion_hold)]
