"""Gathering a pass's facts into the plan's inputs: shared by the daemon and `modelfleet plan`, so
that both plan from the same facts the same way."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from modelfleet.reconciler.config import Config
from modelfleet.reconciler.daemon.store import (
    FACT_CONFIRMED_DELETIONS,
    FACT_FAILED_ROLLOUTS,
    FACT_PROBE_FAILURES,
    FACT_UNREACHABLE_SINCE,
    Store,
)
from modelfleet.reconciler.pool.observe import Observation
from modelfleet.reconciler.rollout.readiness import ReadinessProber
from modelfleet.state.desired import OriginFacts
from modelfleet.state.loader import Catalog
from modelfleet.state.planning import DesiredMemo, Plan, PlanInputs, plan
from modelfleet.state.safety import is_confirmed


def gather_inputs(config: Config, catalog: Catalog, revision: str, observation: Observation, store: Store | None,
                  origin_facts: OriginFacts | None, now: float, commit_message: str | None = None) -> PlanInputs:
    """``store`` None: no daemon state (a fresh daemon would plan with an empty inventory).
    ``commit_message``: the commit's message (its ``Modelfleet-Confirm: deletions`` trailer)."""
    since: Mapping[str, float] = store.fact(FACT_UNREACHABLE_SINCE, {}) if store is not None else {}
    unreachable = {host: float(since.get(host, now)) for host in observation.down_hosts}
    ports = {key: dict(info.ports) for key, info in observation.containers.items()}
    return PlanInputs(
        catalog=catalog,
        hosts=list(config.pool.hosts),
        revision=revision,
        observed=list(observation.replicas),
        ports=ports,
        unreachable=unreachable,
        inventory=store.inventory() if store is not None else [],
        failed_rollouts=store.fact(FACT_FAILED_ROLLOUTS, {}) if store is not None else {},
        probe_failures=store.fact(FACT_PROBE_FAILURES, {}) if store is not None else {},
        origin_facts=origin_facts,
        artifacts=dict(observation.artifacts),
        now=now,
        down_after=config.docker.down_after,
        auto_revert=config.rollout.auto_revert,
        max_deletion_percent=config.safety.max_deletion_percent,
        deletion_confirmed=is_confirmed(
            revision, store.fact(FACT_CONFIRMED_DELETIONS, []) if store is not None else [], commit_message),
    )


def plan_with_probes(inputs: PlanInputs, prober: ReadinessProber, memo: DesiredMemo | None = None) -> Plan:
    """Plan; when the plan needs to know whether some replicas are ready, probe them and plan again."""
    first = plan(inputs, memo)
    if not first.probes:
        return first
    return plan(replace(inputs, probe_results=prober.probe_all(first.probes)), memo)
