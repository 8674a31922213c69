"""After a pass applied its plan: each deployment's status and the commit statuses (pure).

The table from a pass's facts (the plan, the inventory after apply, the outcome of each action,
the versions that failed their rollout) to a deployment's state, reason and message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from modelfleet.state.inventory import InventoryRow
from modelfleet.state.plan import ActionOutcome
from modelfleet.state.planning import Plan, failed_rollout_marker, scale_json
from modelfleet.state.routes import gateways_behind, route_key
from modelfleet.state.status import (
    AGGREGATE_CONTEXT,
    DELETION_HELD,
    DISABLED,
    GATEWAYS_SWITCHING,
    HOST_ERROR,
    INVALID_MANIFEST,
    READY,
    ROLLOUT_FAILED,
    STANDBY,
    UNSCHEDULABLE,
    CommitStatus,
    DeploymentStatus,
    State,
    conditions_for,
    deployment_context,
)

Key = tuple[str, str]


def failed_rollouts_after(failed: Mapping[str, str], outcomes: Sequence[ActionOutcome]) -> dict[str, str]:
    """The versions to hold back from now on: those held already, and each new one that never got ready."""
    result = dict(failed)
    for outcome in outcomes:
        action = outcome.action
        if not outcome.ok and outcome.failed_version and action.desired is not None \
                and action.op in ("create", "replace", "pause"):
            marker = failed_rollout_marker(action.model, action.environment, action.desired.spec_hash)
            result[marker] = outcome.error or "rollout failed"
    return result


def pending_statuses(plan: Plan) -> list[CommitStatus]:
    """What a new commit says while its actions run."""
    touched = plan.pending_touched()
    statuses = [CommitStatus(deployment_context(state.environment, state.model), "pending",
                             f"rolling out to {', '.join(state.hosts) or 'the pool'}")
                for key, state in sorted(plan.desired.deployments.items()) if key in touched]
    if statuses:
        statuses.append(CommitStatus(AGGREGATE_CONTEXT, "pending",
                                     f"applying {len(plan.actions)} action(s) to {len(touched)} deployment(s)"))
    return statuses


def deployment_statuses(
    plan: Plan,
    inventory: Sequence[InventoryRow],
    outcomes: Sequence[ActionOutcome],
    failed_rollouts: Mapping[str, str],
    previous: Mapping[Key, DeploymentStatus],
    now: float,
    route_versions: Mapping[str, int] | None = None,
    acknowledged: Mapping[str, int] | None = None,
) -> dict[Key, DeploymentStatus]:
    """``route_versions``: route key -> the route table version since which it has its current
    backends; ``acknowledged``: the live gateways' id -> the version each serves. A deployment is
    ready only once every gateway serves its routes (else pending, ``GatewaysSwitching``)."""
    revision = plan.desired.revision
    not_routed = plan.unreachable_hosts
    # Index once per pass: each deployment is then a few lookups, not a scan of everything.
    running_wanted: dict[Key, int] = {}
    for replica in plan.desired.replicas:
        if replica.running:
            running_wanted[replica.key] = running_wanted.get(replica.key, 0) + 1
    ready_by_key: dict[tuple[str, str, str], list[InventoryRow]] = {}
    present: set[Key] = set()
    for row in inventory:
        present.add((row.model, row.environment))
        if row.ready and row.phase == "active" and row.host not in not_routed:
            ready_by_key.setdefault((row.model, row.environment, row.spec_hash), []).append(row)
    failures_by_key: dict[Key, list[ActionOutcome]] = {}
    for outcome in outcomes:
        if not outcome.ok:
            failures_by_key.setdefault((outcome.action.model, outcome.action.environment), []).append(outcome)
    result: dict[Key, DeploymentStatus] = {}
    short = revision[:7]
    for key, state in sorted(plan.desired.deployments.items()):
        # What should run: all requested replicas (placed or not: an unplaced one is still
        # missing), or for a serverless deployment the active ones.
        desired_running = running_wanted.get(key, 0) if state.serverless else state.replicas
        ready_rows = ready_by_key.get((key[0], key[1], state.spec_hash or ""), [])
        failures = failures_by_key.get(key, [])
        marker = failed_rollout_marker(state.model, state.environment, state.spec_hash or "")
        hosts = sorted({r.host for r in ready_rows})
        status: State
        if state.errors:
            status, reason, message = "failure", INVALID_MANIFEST, str(state.errors[0])
            if len(state.errors) > 1:
                message += f" (+{len(state.errors) - 1} more)"
            if key in present:
                message += "; the last good version keeps running"
        elif not state.enabled and key in plan.deletion_held and plan.deletion_hold:
            status, reason, message = "failure", DELETION_HELD, plan.deletion_hold
        elif not state.enabled:
            status, reason, message = "success", DISABLED, "disabled: no replicas, endpoint answers 404"
        elif failures and any(f.terminal for f in failures):
            status, reason, message = "failure", ROLLOUT_FAILED, failures[0].error or "rollout failed"
        elif marker in failed_rollouts:
            status, reason, message = "failure", ROLLOUT_FAILED, failed_rollouts[marker]
        elif failures:
            status, reason, message = "error", HOST_ERROR, failures[0].error or "action failed"
        elif state.unschedulable and len(ready_rows) < desired_running:
            status, reason, message = "failure", UNSCHEDULABLE, f"unschedulable: {state.unschedulable}"
        elif len(ready_rows) >= desired_running:
            # (A standby routes nothing: which gateways are behind does not matter for it.)
            behind = gateways_behind((route_versions or {}).get(route_key(*key), 0), acknowledged or {}) \
                if desired_running else []
            if desired_running and behind:
                status, reason = "pending", GATEWAYS_SWITCHING
                message = (f"{len(ready_rows)}/{desired_running} ready on {', '.join(hosts)} at {short}; waiting for "
                           f"gateway(s) {', '.join(behind)} to serve route table "
                           f"v{(route_versions or {})[route_key(*key)]}")
            elif desired_running:
                status, reason = "success", READY
                message = f"{len(ready_rows)}/{desired_running} ready on {', '.join(hosts)} at {short}"
            else:
                status, reason, message = "success", STANDBY, f"scaled to zero (standby) at {short}"
        else:
            down = sorted(not_routed)
            why = f"; host(s) down: {', '.join(down)}" if down else ""
            status, reason = "error", HOST_ERROR
            message = f"{len(ready_rows)}/{desired_running} replicas ready{why}"
            ready_names = {r.name for r in ready_rows}
            for name, not_ready in sorted(plan.not_ready.get(key, {}).items()):
                if name not in ready_names:
                    message += f"; {not_ready}"
        notes = plan.notes.get(key, [])
        decision = plan.scaling.get(key)
        if decision is not None and not state.errors:
            message += f"; autoscaler: {decision.reason}"
        prior = previous.get(key)
        result[key] = DeploymentStatus(
            state.model, state.environment, status, reason, message, hosts, len(ready_rows), desired_running,
            revision, conditions_for(status, reason, message, prior.conditions if prior else None, now),
            origin=state.origin, notes=list(notes),
            autoscaler=scale_json(decision) if decision is not None else None)
    return result
