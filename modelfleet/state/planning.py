"""The plan of a pass, decided in one place: facts in, actions and per-deployment outcome out.

``plan(PlanInputs) -> Plan`` is what the daemon applies and what ``modelfleet plan`` prints: the
daemon gathers the inputs (commit, observation, inventory, failed rollouts, host reachability,
probe results), applies ``Plan.actions`` and writes ``Plan.inventory`` — it decides nothing itself.
Every action the diff proposes but the pass will not take is in ``Plan.held``, with the reason.

``make_plan`` is the bare load → desired → diff, without the pass's facts.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from modelfleet.state.actual import ObservedReplica
from modelfleet.state.autoscaler import ScaleDecision, ScalerMemory, decide
from modelfleet.state.demand import LoadSample
from modelfleet.state.desired import DeploymentState, DesiredReplica, DesiredState, OriginFacts, compute_desired
from modelfleet.state.inventory import (
    InventoryChanges,
    InventoryRow,
    adoptable,
    adopted_row,
    reconcile_inventory,
)
from modelfleet.state.loader import Catalog, load_tree
from modelfleet.state.plan import Action, diff
from modelfleet.state.pool import Host
from modelfleet.state.readiness import (
    ReadinessCheck,
    ReadinessVerdict,
    failures_after,
    judge,
    readiness_checks,
    with_verdict,
)
from modelfleet.state.routes import route_key
from modelfleet.state.safety import DELETION_HELD_PREFIX, deletion_hold
from modelfleet.state.status import (
    DELETION_HELD,
    DISABLED,
    INVALID_MANIFEST,
    PROGRESSING,
    READY,
    ROLLOUT_FAILED,
    STANDBY,
    UNSCHEDULABLE,
    State,
)

Key = tuple[str, str]


def failed_rollout_marker(model: str, environment: str, spec_hash: str) -> str:
    """How a version that failed its rollout is remembered (one per deployment and spec)."""
    return f"{model}/{environment}@{spec_hash}"


@dataclass(frozen=True)
class PlanInputs:
    """The facts a pass plans from. The clock (``now``) is an input like any other."""

    catalog: Catalog
    hosts: Sequence[Host]
    revision: str
    observed: Sequence[ObservedReplica] = ()
    # Published ports of observed containers: (host, container id) -> container port -> host port.
    ports: Mapping[tuple[str, str], Mapping[int, int]] = field(default_factory=dict)
    # Hosts that did not answer this observation -> since when (seconds, same clock as ``now``).
    unreachable: Mapping[str, float] = field(default_factory=dict)
    # What the daemon owns. None: no inventory at all (offline planning): every managed container counts as ours.
    inventory: Sequence[InventoryRow] | None = None
    # Versions that failed their rollout: failed_rollout_marker(...) -> why.
    failed_rollouts: Mapping[str, str] = field(default_factory=dict)
    # Answers to Plan.probes: (host, container name) -> answered its readiness probe. None: not probed.
    probe_results: Mapping[tuple[str, str], bool] | None = None
    # Failed readiness probes in a row of ready replicas: failure_key(host, container id) -> count (a store fact).
    probe_failures: Mapping[str, int] = field(default_factory=dict)
    origin_facts: OriginFacts | None = None
    # The model artifacts each host holds: host -> artifact ids (state/artifacts.py), for locality.
    artifacts: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # Replicas that should run, per serverless deployment, given as is (tests, offline planning);
    # with ``load`` the autoscaler decides them instead.
    demand: Mapping[Key, int] | None = None
    # The gateways' load per route key (state/demand.py), on the ``monotonic`` clock. None: not
    # known (`modelfleet plan`): serverless deployments keep the replicas they run.
    load: Mapping[str, Sequence[LoadSample]] | None = None
    scaler_memory: Mapping[Key, ScalerMemory] = field(default_factory=dict)
    watching_since: float = 0.0  # since when load reports are received (monotonic clock)
    monotonic: float = 0.0  # the monotonic clock: durations measured by this process
    now: float = 0.0
    down_after: float = 10.0  # docker.downAfter
    auto_revert: bool = True  # rollout.autoRevert
    # Deletion safety (state/safety.py): safety.maxDeletionPercent (100: off), and whether this
    # commit's deletions are confirmed (its trailer, or `modelfleet confirm <sha>`).
    max_deletion_percent: float = 50.0
    deletion_confirmed: bool = False


@dataclass(frozen=True)
class HeldAction:
    """An action the diff proposes that this pass does not take, and why."""

    action: Action
    why: str

    def to_json(self) -> dict[str, object]:
        return {**self.action.to_json(), "held": self.why}


@dataclass(frozen=True)
class Outcome:
    """What the plan expects of a deployment before anything is applied."""

    state: State
    reason: str
    message: str

    def to_json(self) -> dict[str, object]:
        return {"state": self.state, "reason": self.reason, "message": self.message}


@dataclass
class Plan:
    catalog: Catalog
    desired: DesiredState
    actions: list[Action]  # exactly what the daemon applies, in order
    held: list[HeldAction]
    inventory: InventoryChanges  # store writes before the actions
    inventory_rows: list[InventoryRow] | None  # the inventory once those are written
    probes: list[ReadinessCheck]  # still to be answered (empty once probe_results are in)
    unanswered: list[ReadinessCheck]  # probed, not ready (yet)
    unreachable_hosts: frozenset[str]  # not routed to, whatever the grace
    suspect_hosts: frozenset[str]  # unreachable for less than down_after: their replicas stay put
    down_hosts: frozenset[str]  # unreachable for longer: their replicas move
    unreachable_since: dict[str, float]  # to remember for the next pass
    failed_rollouts: dict[str, str]  # to remember: markers of specs still desired
    route_keys: frozenset[str]
    outcomes: dict[Key, Outcome]
    notes: dict[Key, list[str]]
    # The autoscaler's decision per serverless deployment (empty when the load is not known).
    scaling: dict[Key, ScaleDecision] = field(default_factory=dict)
    # Readiness (state/readiness.py): the replicas the monitor re-probes until the next pass (those
    # checked this pass, but for the ones the actions take down), failed probes in a row to
    # remember, why running replicas are not ready.
    monitored: list[ReadinessCheck] = field(default_factory=list)
    probe_failures: dict[str, int] = field(default_factory=dict)
    not_ready: dict[Key, dict[str, str]] = field(default_factory=dict)  # container name -> why
    left_routes: list[str] = field(default_factory=list)  # why each replica this pass took out of the routes
    # Deletion safety: why this commit's removals are held (the aggregate status), and of which deployments.
    deletion_hold: str | None = None
    deletion_held: frozenset[Key] = frozenset()

    def pending_touched(self) -> set[Key]:
        return {(a.model, a.environment) for a in self.actions}

    def to_json(self, explain: bool = True) -> dict[str, object]:
        data = plan_json(self.desired, self.actions, explain, self.outcomes, self.notes)
        data["held"] = [h.to_json() for h in self.held]
        if self.inventory:
            data["inventory"] = self.inventory.to_json()
        data["hosts"] = {"unreachable": sorted(self.suspect_hosts), "down": sorted(self.down_hosts)}
        if self.scaling:
            data["scaling"] = {f"{m}/{e}": scale_json(d) for (m, e), d in sorted(self.scaling.items())}
        return data


def scale_json(decision: ScaleDecision) -> dict[str, object]:
    return {"desired": decision.desired, "reason": decision.reason, "metric": decision.metric,
            "value": round(decision.value, 3), "panicking": decision.panicking}


def plan(inputs: PlanInputs, memo: DesiredMemo | None = None) -> Plan:
    """The pass's decisions, in the order the daemon used to take them one by one."""
    unreachable = frozenset(inputs.unreachable)
    # A since-time in the future (the wall clock was set back after it was recorded) counts from
    # now: the host gets its docker.downAfter grace from here (remembered so), never less or more.
    since_times = {h: min(since, inputs.now) for h, since in inputs.unreachable.items()}
    suspect = frozenset(h for h, since in since_times.items() if inputs.now - since < inputs.down_after)
    down = unreachable - suspect
    # 1. The inventory in line with what the hosts show.
    if inputs.inventory is None:
        rows: list[InventoryRow] | None = None
        owned: set[str] | None = None
        forget: list[tuple[str, str]] = []
        ids: list[tuple[str, str, str]] = []
        unready: list[tuple[str, str]] = []
    else:
        reconciled = reconcile_inventory(inputs.inventory, inputs.observed, unreachable)
        rows, owned = reconciled.rows, reconciled.owned
        forget, ids, unready = reconciled.forget, reconciled.container_ids, reconciled.unready
    # 2. What runs: the observation, plus what the inventory says runs on hosts within their grace
    #    (a blip must not reschedule everything).
    actual = list(inputs.observed)
    if rows is not None:
        actual += [r.as_observed() for r in rows if r.host in suspect and r.container_id and r.phase == "active"]
    # 3. How many replicas each serverless deployment should run (the autoscaler), then the
    #    desired state (pure, memoized on its inputs).
    demand, scaling = _autoscale(inputs, actual)
    desired = _desired(inputs, actual, down, demand, memo)
    wanted = {(r.host, r.model, r.environment, r.index, r.spec_hash): r for r in desired.replicas}
    markers = {failed_rollout_marker(r.model, r.environment, r.spec_hash) for r in desired.replicas}
    failed = {m: why for m, why in inputs.failed_rollouts.items() if m in markers}
    # 4. Lost state: managed containers that are exactly a desired replica are adopted, not duplicated.
    adopted: list[ObservedReplica] = []
    if rows is not None and owned is not None:
        adopted = adoptable(inputs.observed, owned, wanted)
        owned |= {r.container_id for r in adopted}
        rows += [adopted_row(r) for r in adopted]
    # 5. Readiness of the replicas that run, ready ones included (state/readiness.py).
    monitored = _readiness_checks(inputs, rows, wanted, desired, unreachable, failed)
    probed = inputs.probe_results is not None
    verdict = judge(monitored, inputs.probe_results or {}) if probed else ReadinessVerdict()
    checks = [] if probed else monitored  # Plan.probes: still to be answered
    ready_updates, unanswered = list(verdict.ready), list(verdict.unanswered)
    unready = unready + list(verdict.unready)
    if rows is not None:
        rows = with_verdict(rows, verdict)
    probe_failures = failures_after(inputs.probe_failures, monitored if probed else (), verdict, rows or ())
    # 6. Diff, then hold what this pass must not do.
    proposed = diff(desired, actual, owned)
    actions, held = _hold(proposed, failed, rows, wanted, suspect, since_times, inputs.now)
    safety = deletion_hold(proposed, actual, owned, inputs.revision, inputs.max_deletion_percent,
                           inputs.deletion_confirmed)
    if safety.held:  # what runs keeps running (and routed); the rest of the commit applies
        kept = {id(a) for a in safety.held}
        already = {id(h.action) for h in held}
        actions = [a for a in actions if id(a) not in kept]
        held = held + [HeldAction(a, safety.message or "") for a in safety.held if id(a) not in already]
    changes = InventoryChanges(tuple(forget), tuple(ids), tuple(unready), tuple(adopted), tuple(ready_updates))
    route_keys = frozenset(route_key(*k) for k, s in desired.deployments.items() if s.enabled or s.frozen) \
        | {route_key(*k) for k in safety.keys}
    notes = _notes(inputs.catalog, desired)
    outcomes = _outcomes(desired, actions, held, failed)
    return Plan(inputs.catalog, desired, actions, held, changes, rows, checks, unanswered, unreachable, suspect,
                down, since_times, failed, route_keys, outcomes, notes, scaling,
                monitored=_monitored(monitored, actions), probe_failures=probe_failures,
                not_ready=_not_ready(verdict, unanswered),
                left_routes=[verdict.why[c.key] for c in monitored if (c.host, c.name) in verdict.unready],
                deletion_hold=safety.message, deletion_held=safety.keys)


def _autoscale(inputs: PlanInputs, actual: list[ObservedReplica]) -> tuple[Mapping[Key, int] | None,
                                                                            dict[Key, ScaleDecision]]:
    """Replicas to run per serverless deployment: as given (``demand``), from the autoscaler when
    the load is known, else as many as run now (nothing is scaled on load that is not known)."""
    running: dict[Key, int] = {}
    for replica in actual:
        if replica.running:
            running[replica.key] = running.get(replica.key, 0) + 1
    if inputs.demand is not None:
        return inputs.demand, {}
    demand: dict[Key, int] = {}
    scaling: dict[Key, ScaleDecision] = {}
    for entry in inputs.catalog.deployments():
        spec = entry.spec
        if spec is None or spec.serverless is None or not spec.enabled:
            continue
        current = running.get(entry.key, 0)
        if inputs.load is None:
            demand[entry.key] = current
            continue
        decision = decide(spec.serverless, inputs.load.get(route_key(*entry.key), ()),
                          inputs.scaler_memory.get(entry.key), inputs.monotonic, current=current,
                          watching_since=inputs.watching_since)
        scaling[entry.key] = decision
        demand[entry.key] = decision.desired
    return demand, scaling


def _desired(inputs: PlanInputs, actual: list[ObservedReplica], down: frozenset[str],
             demand: Mapping[Key, int] | None, memo: DesiredMemo | None) -> DesiredState:
    facts = inputs.origin_facts or OriginFacts()
    previous = previous_placement(actual)
    key = None
    if memo is not None:
        key = memo.key(inputs.catalog, list(inputs.hosts), inputs.revision, down, previous, demand, facts,
                       inputs.artifacts)
        cached = memo.get(key)
        if cached is not None:
            return cached
    desired = compute_desired(inputs.catalog, inputs.hosts, inputs.revision, down_hosts=down, previous=previous,
                              demand=demand, origin_facts=facts, artifacts=inputs.artifacts)
    if memo is not None and key is not None:
        memo.put(key, desired)
    return desired


def _readiness_checks(inputs: PlanInputs, rows: list[InventoryRow] | None,
                      wanted: Mapping[tuple[str, str, str, int, str], DesiredReplica], desired: DesiredState,
                      unreachable: frozenset[str], failed: Mapping[str, str]) -> list[ReadinessCheck]:
    if rows is None:
        return []  # offline planning: no inventory, nothing is routed
    # A failed version left in place (rollout.autoRevert: false) is never probed, so never routed.
    candidates = [r for r in rows if failed_rollout_marker(r.model, r.environment, r.spec_hash) not in failed]
    runtimes = {k: s.runtime for k, s in desired.deployments.items() if s.runtime is not None}
    return readiness_checks(candidates, inputs.observed, inputs.ports, inputs.hosts, wanted, runtimes,
                            unreachable, inputs.probe_failures)


def _monitored(checks: list[ReadinessCheck], actions: list[Action]) -> list[ReadinessCheck]:
    """The checks the monitor repeats after this plan: not of a container the actions stop, pause,
    remove or replace (a replica drained for a stop must not be routed again because it still answers)."""
    leaving = {(a.current.host, a.current.container_id) for a in actions
               if a.current is not None and a.op in ("stop", "pause", "remove", "replace")}
    return [c for c in checks if (c.host, c.container_id) not in leaving]


def _not_ready(verdict: ReadinessVerdict, unanswered: Sequence[ReadinessCheck]) -> dict[Key, dict[str, str]]:
    """Why replicas that run are not ready, per deployment (for its status)."""
    result: dict[Key, dict[str, str]] = {}
    for check in unanswered:
        result.setdefault((check.model, check.environment), {})[check.name] = (
            verdict.why.get(check.key) or f"{check.label} does not answer its readiness probe")
    return result


def _hold(proposed: list[Action], failed: Mapping[str, str], rows: list[InventoryRow] | None,
          wanted: Mapping[tuple[str, str, str, int, str], DesiredReplica], suspect: frozenset[str],
          unreachable: Mapping[str, float], now: float) -> tuple[list[Action], list[HeldAction]]:
    # Slots whose desired replica (the one that stays) is ready: only then may a duplicate go.
    ready_slots = {r.slot for r in rows if r.ready and r.phase == "active"
                   and (r.host, r.model, r.environment, r.replica, r.spec_hash) in wanted} if rows is not None else None
    actions: list[Action] = []
    held: list[HeldAction] = []
    for action in proposed:
        why = None
        if action.desired is not None and action.op in ("create", "replace", "pause"):
            # (a standby that never got ready to be paused stays stopped: a stopped standby still serves)
            marker = failed_rollout_marker(action.model, action.environment, action.desired.spec_hash)
            if marker in failed:
                why = (f"version {action.desired.spec_hash[:8]} failed its rollout and is not retried until "
                       f"the spec changes: {failed[marker]}")
        if why is None and action.op == "remove" and action.reason == "duplicate" and ready_slots is not None \
                and (action.model, action.environment, action.replica) not in ready_slots:
            # Never remove a duplicate of a slot before the replica that stays is ready (e.g. after a
            # restart in the middle of a blue-green switch).
            why = "the replica that stays in this slot is not ready yet"
        if why is None:
            on = action.host if action.host in suspect else (
                action.current.host if action.current is not None and action.current.host in suspect else None)
            if on is not None:
                why = (f"host {on} is unreachable since {now - unreachable[on]:.0f}s, within docker.downAfter: "
                       "its replicas stay put until it is back or down")
        if why is None:
            actions.append(action)
        else:
            held.append(HeldAction(action, why))
    return actions, held


def _notes(catalog: Catalog, desired: DesiredState) -> dict[Key, list[str]]:
    """Settings the manifest sets that are accepted but not in effect yet: said, never silently ignored."""
    # None at the moment (readinessProbe.failureThreshold is in effect: state/readiness.py).
    return {}


def _outcomes(desired: DesiredState, actions: list[Action], held: list[HeldAction],
              failed: Mapping[str, str]) -> dict[Key, Outcome]:
    touched = {(a.model, a.environment) for a in actions}
    holds: dict[Key, list[HeldAction]] = {}
    for h in held:
        holds.setdefault((h.action.model, h.action.environment), []).append(h)
    outcomes: dict[Key, Outcome] = {}
    for key, state in desired.deployments.items():
        outcomes[key] = _outcome(state, key in touched, holds.get(key, []), failed)
    return outcomes


def _outcome(state: DeploymentState, touched: bool, holds: list[HeldAction], failed: Mapping[str, str]) -> Outcome:
    if state.errors:
        message = str(state.errors[0]) + (f" (+{len(state.errors) - 1} more)" if len(state.errors) > 1 else "")
        return Outcome("failure", INVALID_MANIFEST, message + "; what runs keeps running")
    if not state.enabled:
        if any(h.why.startswith(DELETION_HELD_PREFIX) for h in holds):
            return Outcome("failure", DELETION_HELD, holds[0].why)
        return Outcome("success", DISABLED, "disabled: no replicas, endpoint answers 404")
    marker = failed_rollout_marker(state.model, state.environment, state.spec_hash or "")
    if marker in failed:
        return Outcome("failure", ROLLOUT_FAILED, failed[marker])
    if state.unschedulable:
        return Outcome("failure", UNSCHEDULABLE, f"unschedulable: {state.unschedulable}")
    if touched:
        return Outcome("pending", PROGRESSING, f"rolling out to {', '.join(state.hosts) or 'the pool'}")
    if holds:
        return Outcome("pending", PROGRESSING, f"waiting: {holds[0].why}")
    if state.serverless and not state.replicas:
        return Outcome("success", STANDBY, "scaled to zero (standby)")
    return Outcome("success", READY, "up to date")


def plan_json(desired: DesiredState, actions: Sequence[Action], explain: bool = True,
              outcomes: Mapping[Key, Outcome] | None = None,
              notes: Mapping[Key, list[str]] | None = None) -> dict[str, object]:
    deployments = []
    for key in sorted(desired.deployments):
        state = desired.deployments[key]
        item: dict[str, object] = {
            "model": state.model,
            "environment": state.environment,
            "enabled": state.enabled,
            "source": state.source,
            "eligible_hosts": state.eligible_hosts,
            "hosts": state.hosts,
            "errors": [str(e) for e in state.errors] + ([state.unschedulable] if state.unschedulable else []),
            "replicas": state.replicas,
            "serverless": state.serverless,
            "spec_hash": state.spec_hash,
            "origin": state.origin,
        }
        if state.runtime is not None:
            item["runtime"] = {"type": state.runtime.type, "image": state.runtime.image,
                               "reason": state.runtime.reason, "port": state.runtime.port,
                               "cpus": state.runtime.cpus, "memory": state.runtime.memory}
        if explain:
            item["excluded_hosts"] = state.excluded
        if outcomes is not None and key in outcomes:
            item["outcome"] = outcomes[key].to_json()
        if notes is not None and notes.get(key):
            item["notes"] = list(notes[key])
        deployments.append(item)
    return {
        "revision": desired.revision,
        "valid": not desired.errors,
        "errors": [str(e) for e in desired.errors],
        "deployments": deployments,
        "actions": [a.to_json() for a in actions],
    }


@dataclass
class PlanResult:
    """The bare plan: desired state and its diff against what runs, without the pass's facts."""

    catalog: Catalog
    desired: DesiredState
    actions: list[Action]

    def to_json(self, explain: bool = True) -> dict[str, object]:
        return plan_json(self.desired, self.actions, explain)


def previous_placement(actual: Iterable[ObservedReplica]) -> dict[tuple[str, str], dict[int, str]]:
    """Where each replica slot runs now (running replicas win), the input that keeps placement stable."""
    placed: dict[tuple[str, str], dict[int, str]] = {}
    for replica in sorted(actual, key=lambda r: (not r.running, r.container_id)):
        placed.setdefault(replica.key, {}).setdefault(replica.index, replica.host)
    return placed


def make_plan(
    files: Mapping[str, bytes],
    hosts: list[Host],
    revision: str,
    actual: list[ObservedReplica] | None = None,
    owned: Collection[str] | None = None,
    down_hosts: frozenset[str] = frozenset(),
    demand: Mapping[tuple[str, str], int] | None = None,
    hf_commits: Mapping[tuple[str, str], str] | None = None,
    catalog: Catalog | None = None,
    origin_facts: OriginFacts | None = None,
    memo: DesiredMemo | None = None,
    artifacts: Mapping[str, frozenset[str]] | None = None,
) -> PlanResult:
    """``catalog``: an already loaded catalog of the same files (the daemon caches it per commit);
    ``memo``: reuse the desired state of the last pass when none of its inputs changed."""
    actual = actual or []
    catalog = catalog if catalog is not None else load_tree(files)
    facts = origin_facts or OriginFacts(commits=dict(hf_commits or {}))
    previous = previous_placement(actual)
    desired = None
    key = None
    if memo is not None:
        key = memo.key(catalog, hosts, revision, down_hosts, previous, demand, facts, artifacts)
        desired = memo.get(key)
    if desired is None:
        desired = compute_desired(catalog, hosts, revision, down_hosts=down_hosts, previous=previous,
                                  demand=demand, origin_facts=facts, artifacts=artifacts)
        if memo is not None and key is not None:
            memo.put(key, desired)
    return PlanResult(catalog, desired, diff(desired, actual, owned))


class DesiredMemo:
    """The last desired state and the inputs it came from. compute_desired is pure, so on a no-op
    pass (same commit, pool, placement, demand, origins) its result can be reused as is."""

    def __init__(self) -> None:
        self._key: object = None
        self._value: DesiredState | None = None

    @staticmethod
    def key(catalog: Catalog, hosts: list[Host], revision: str, down_hosts: frozenset[str],
            previous: Mapping[tuple[str, str], Mapping[int, str]], demand: Mapping[tuple[str, str], int] | None,
            facts: OriginFacts, artifacts: Mapping[str, frozenset[str]] | None = None) -> object:
        # Compared with ==, never hashed: copies of the dicts (cheap), not frozensets of their items
        # (a pass's placement of 1,000 deployments would take milliseconds to freeze).
        return (
            dict(artifacts or {}),
            id(catalog), revision, tuple(hosts), down_hosts,
            {k: dict(v) for k, v in previous.items()},
            dict(demand or {}),
            dict(facts.commits), dict(facts.errors), facts.prefer_official,
            dict(facts.file_errors), facts.unavailable, dict(facts.metadata_errors),
            {k: dict(v) for k, v in facts.metadata.items()},
        )

    def get(self, key: object) -> DesiredState | None:
        return self._value if key == self._key else None

    def put(self, key: object, value: DesiredState) -> None:
        self._key, self._value = key, value
