"""The plan of a pass, decided in one place: facts in, actions and per-deployment outcome out.

``plan(PlanInputs) -> Plan`` is what the daemon applies and what ``modelfleet plan`` prints: the
daemon gathers the inputs (commit, observation, inventory, failed rollouts, host reachability,
probe results), applies ``Plan.actions`` and writes ``Plan.inventory`` — it decides nothing itself.
Every action the diff proposes but the pass will not take is in ``Plan.held``, with the reason.

``make_plan`` is the bare load → desired → diff, without the pass's facts.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from modelfleet.state.actual import ObservedReplica
from modelfleet.state.desired import DeploymentState, DesiredReplica, DesiredState, OriginFacts, compute_desired
from modelfleet.state.inventory import (
    InventoryChanges,
    InventoryRow,
    ReadyUpdate,
    adoptable,
    adopted_row,
    reconcile_inventory,
)
from modelfleet.state.loader import Catalog, load_tree
from modelfleet.state.plan import Action, diff
from modelfleet.state.pool import Host
from modelfleet.state.routes import route_key
from modelfleet.state.status import (
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
SERVERLESS_NOT_ACTIVE = ("serverless autoscaling (metric, target, scaleDownDelay) is not active yet: "
                         "the deployment keeps minReplicas running (a stopped standby at 0)")
FAILURE_THRESHOLD_NOT_ACTIVE = ("readinessProbe.failureThreshold is not active yet: a replica is probed until it is "
                                "ready, then the gateway's retries cover a replica that stops answering")


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
    origin_facts: OriginFacts | None = None
    demand: Mapping[Key, int] | None = None
    now: float = 0.0
    down_after: float = 10.0  # docker.downAfter
    auto_revert: bool = True  # rollout.autoRevert


@dataclass(frozen=True)
class HeldAction:
    """An action the diff proposes that this pass does not take, and why."""

    action: Action
    why: str

    def to_json(self) -> dict[str, object]:
        return {**self.action.to_json(), "held": self.why}


@dataclass(frozen=True)
class ReadinessCheck:
    """A replica that runs but is not known ready (after a restart mid-rollout, or restarted by
    Docker): the shell probes it and plans again with the answer."""

    host: str
    name: str
    container_id: str
    url: str
    probe_url: str
    fill_urls: bool


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

    def pending_touched(self) -> set[Key]:
        return {(a.model, a.environment) for a in self.actions}

    def to_json(self, explain: bool = True) -> dict[str, object]:
        data = plan_json(self.desired, self.actions, explain, self.outcomes, self.notes)
        data["held"] = [h.to_json() for h in self.held]
        if self.inventory:
            data["inventory"] = self.inventory.to_json()
        data["hosts"] = {"unreachable": sorted(self.suspect_hosts), "down": sorted(self.down_hosts)}
        return data


def plan(inputs: PlanInputs, memo: DesiredMemo | None = None) -> Plan:
    """The pass's decisions, in the order the daemon used to take them one by one."""
    unreachable = frozenset(inputs.unreachable)
    suspect = frozenset(h for h, since in inputs.unreachable.items() if inputs.now - since < inputs.down_after)
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
    # 3. Desired state (pure, memoized on its inputs).
    desired = _desired(inputs, actual, down, memo)
    wanted = {(r.host, r.model, r.environment, r.index, r.spec_hash): r for r in desired.replicas}
    markers = {failed_rollout_marker(r.model, r.environment, r.spec_hash) for r in desired.replicas}
    failed = {m: why for m, why in inputs.failed_rollouts.items() if m in markers}
    # 4. Lost state: managed containers that are exactly a desired replica are adopted, not duplicated.
    adopted: list[ObservedReplica] = []
    if rows is not None and owned is not None:
        adopted = adoptable(inputs.observed, owned, wanted)
        owned |= {r.container_id for r in adopted}
        rows += [adopted_row(r) for r in adopted]
    # 5. Readiness of replicas that run but are not known ready.
    checks: list[ReadinessCheck] = []
    ready_updates: list[ReadyUpdate] = []
    unanswered: list[ReadinessCheck] = []
    if rows is not None:
        checks = _readiness_checks(inputs, rows, wanted, unreachable, failed)
        if inputs.probe_results is not None:
            results = inputs.probe_results
            answered = [c for c in checks if results.get((c.host, c.name))]
            unanswered = [c for c in checks if not results.get((c.host, c.name))]
            ready_updates = [ReadyUpdate(c.host, c.name, c.container_id, c.url, c.probe_url, c.fill_urls)
                             for c in answered]
            rows = _with_ready(rows, ready_updates)
            checks = []
    # 6. Diff, then hold what this pass must not do.
    proposed = diff(desired, actual, owned)
    actions, held = _hold(proposed, failed, rows, wanted, suspect, inputs.unreachable, inputs.now)
    changes = InventoryChanges(tuple(forget), tuple(ids), tuple(unready), tuple(adopted), tuple(ready_updates))
    route_keys = frozenset(route_key(*k) for k, s in desired.deployments.items() if s.enabled or s.frozen)
    notes = _notes(inputs.catalog, desired)
    outcomes = _outcomes(desired, actions, held, failed)
    return Plan(inputs.catalog, desired, actions, held, changes, rows, checks, unanswered, unreachable, suspect,
                down, dict(inputs.unreachable), failed, route_keys, outcomes, notes)


def _desired(inputs: PlanInputs, actual: list[ObservedReplica], down: frozenset[str],
             memo: DesiredMemo | None) -> DesiredState:
    facts = inputs.origin_facts or OriginFacts()
    previous = previous_placement(actual)
    key = None
    if memo is not None:
        key = memo.key(inputs.catalog, list(inputs.hosts), inputs.revision, down, previous, inputs.demand, facts)
        cached = memo.get(key)
        if cached is not None:
            return cached
    desired = compute_desired(inputs.catalog, inputs.hosts, inputs.revision, down_hosts=down, previous=previous,
                              demand=inputs.demand, origin_facts=facts)
    if memo is not None and key is not None:
        memo.put(key, desired)
    return desired


def _readiness_checks(inputs: PlanInputs, rows: list[InventoryRow],
                      wanted: Mapping[tuple[str, str, str, int, str], DesiredReplica],
                      unreachable: frozenset[str], failed: Mapping[str, str]) -> list[ReadinessCheck]:
    by_name = {(r.host, r.name): r for r in inputs.observed}
    hosts = {h.name: h for h in inputs.hosts}
    checks = []
    for row in rows:
        if row.phase != "active" or row.ready or row.host in unreachable or not row.container_id:
            continue
        seen = by_name.get((row.host, row.name))
        if seen is None or not seen.running:
            continue  # a standby or a crashed replica: nothing to probe
        if failed_rollout_marker(row.model, row.environment, row.spec_hash) in failed:
            continue  # a failed version left in place (rollout.autoRevert: false) is not routed
        url, probe_url, fill = row.url or "", row.probe_url or "", False
        if not probe_url:
            want = wanted.get((row.host, row.model, row.environment, row.replica, row.spec_hash))
            ports = inputs.ports.get((row.host, row.container_id))
            host = hosts.get(row.host)
            if want is None or ports is None or host is None:
                continue
            port, probe = ports.get(want.runtime.port), ports.get(want.runtime.probe.port)
            if port is None or probe is None:
                continue
            url = f"http://{host.reach_address}:{port}"
            probe_url = f"http://{host.reach_address}:{probe}{want.runtime.probe.path}"
            fill = True
        checks.append(ReadinessCheck(row.host, row.name, row.container_id, url, probe_url, fill))
    return checks


def _with_ready(rows: list[InventoryRow], updates: list[ReadyUpdate]) -> list[InventoryRow]:
    by_name = {(u.host, u.name): u for u in updates}
    result = []
    for row in rows:
        update = by_name.get((row.host, row.name))
        if update is not None:
            row = replace(row, ready=True, url=update.url if update.fill_urls else row.url,
                          probe_url=update.probe_url if update.fill_urls else row.probe_url)
        result.append(row)
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
        if action.desired is not None and action.op in ("create", "replace"):
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
    notes: dict[Key, list[str]] = {}
    for entry in catalog.deployments():
        state = desired.deployments.get(entry.key)
        if state is None or state.errors or entry.spec is None:
            continue
        found = []
        if state.serverless:
            found.append(SERVERLESS_NOT_ACTIVE)
        runtime = entry.spec.runtime
        probe = runtime.readiness_probe if runtime is not None else None
        if probe is not None and "failure_threshold" in probe.model_fields_set:
            found.append(FAILURE_THRESHOLD_NOT_ACTIVE)
        if found:
            notes[entry.key] = found
    return notes


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
        key = memo.key(catalog, hosts, revision, down_hosts, previous, demand, facts)
        desired = memo.get(key)
    if desired is None:
        desired = compute_desired(catalog, hosts, revision, down_hosts=down_hosts, previous=previous,
                                  demand=demand, origin_facts=facts)
        if memo is not None and key is not None:
            memo.put(key, desired)
    return PlanResult(catalog, desired, diff(desired, actual, owned))


class DesiredMemo:
    """The last desired state and the inputs it came from. compute_desired is pure, so on a no-op
    pass (same commit, pool, placement, demand, origins) its result can be reused as is."""

    def __init__(self) -> None:
        self._key: Hashable | None = None
        self._value: DesiredState | None = None

    @staticmethod
    def key(catalog: Catalog, hosts: list[Host], revision: str, down_hosts: frozenset[str],
            previous: Mapping[tuple[str, str], Mapping[int, str]], demand: Mapping[tuple[str, str], int] | None,
            facts: OriginFacts) -> Hashable:
        return (
            id(catalog), revision, tuple(hosts), down_hosts,
            frozenset((k, frozenset(v.items())) for k, v in previous.items()),
            frozenset((demand or {}).items()),
            frozenset(facts.commits.items()), frozenset(facts.errors.items()), facts.prefer_official,
            frozenset(facts.file_errors.items()),
            frozenset((k, tuple(sorted((str(a), str(b)) for a, b in v.items()))) for k, v in facts.metadata.items()),
        )

    def get(self, key: Hashable) -> DesiredState | None:
        return self._value if key == self._key else None

    def put(self, key: Hashable, value: DesiredState) -> None:
        self._key, self._value = key, value
