"""Plan: the ordered actions that turn the actual state into the desired one (a pure diff).

Ops: ``create`` a missing replica; ``replace`` one whose spec changed or that must move host
(blue-green: the new one is ready before the old one goes); ``start`` a stopped (or paused) replica
that should run; ``stop`` a running one that should stand by; ``pause`` one that should stand by
paused (``serverless.standby: paused``: a running one is drained and frozen, a stopped one started,
waited for until ready, then frozen); ``remove`` what is no longer wanted. Only
replicas the inventory owns are ever removed; frozen (invalid) deployments are left alone.
Planning the desired state against itself yields no actions.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from modelfleet.state.actual import ObservedReplica
from modelfleet.state.desired import STANDBY_PAUSED, DesiredReplica, DesiredState

OP_ORDER = {"create": 0, "replace": 0, "start": 0, "stop": 1, "pause": 1, "remove": 2}


@dataclass(frozen=True)
class Action:
    op: str
    model: str
    environment: str
    host: str
    replica: int
    reason: str
    desired: DesiredReplica | None = None
    current: ObservedReplica | None = None  # the container acted on (replace: the old one)

    def sort_key(self) -> tuple[int, str, str, int, str, str]:
        container = self.current.container_id if self.current else ""
        return (OP_ORDER[self.op], self.environment, self.model, self.replica, self.host, container)

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = {
            "op": self.op,
            "model": self.model,
            "environment": self.environment,
            "host": self.host,
            "replica": self.replica,
            "reason": self.reason,
        }
        if self.desired is not None:
            data["spec_hash"] = self.desired.spec_hash
            data["image"] = self.desired.runtime.image
        if self.current is not None:
            data["container"] = self.current.name
            if self.current.host != self.host:
                data["from_host"] = self.current.host
        return data


@dataclass
class ActionOutcome:
    """What applying one action did: the fact the next decisions (status, held versions) start from."""

    action: Action
    ok: bool
    error: str | None = None
    terminal: bool = False
    seconds: float = 0.0
    # The new version never became ready: it is not retried until its spec changes.
    failed_version: bool = False


def _frozen(frozen: Collection[tuple[str, str]], replica: ObservedReplica) -> bool:
    return replica.key in frozen or (replica.model, "*") in frozen


def diff(
    desired: DesiredState,
    actual: Iterable[ObservedReplica],
    owned: Collection[str] | None = None,
) -> list[Action]:
    """Actions to converge. ``owned``: container ids in the inventory (None: all managed ones)."""
    wanted = {(r.model, r.environment, r.index): r for r in desired.replicas}
    observed = sorted(actual, key=lambda r: (r.model, r.environment, r.index, r.host, r.container_id))
    by_slot: dict[tuple[str, str, int], list[ObservedReplica]] = {}
    for replica in observed:
        by_slot.setdefault((replica.model, replica.environment, replica.index), []).append(replica)

    actions: list[Action] = []
    leftovers: list[ObservedReplica] = []
    for slot, want in wanted.items():
        candidates = by_slot.pop(slot, [])
        keep = _best_match(want, candidates)
        leftovers.extend(c for c in candidates if c is not keep)
        # A replace removes the old container once the new one is ready: only ours may be taken over.
        ours = [c for c in candidates if owned is None or c.container_id in owned]
        if keep is None:
            if ours:
                # Something stands in this slot but with an old spec or on the wrong host.
                old = _pick_old(want, ours)
                leftovers.remove(old)
                reason = ("spec changed" if old.spec_hash != want.spec_hash
                          else f"moves from {old.host}")
                actions.append(Action("replace", want.model, want.environment, want.host, want.index,
                                      reason, want, old))
            else:
                actions.append(Action("create", want.model, want.environment, want.host, want.index,
                                      "missing" if want.running else f"missing (standby, {want.standby})", want))
        elif want.running and not keep.running:
            actions.append(Action("start", want.model, want.environment, want.host, want.index,
                                  "paused" if keep.paused else "stopped", want, keep))
        elif not want.running:
            paused = want.standby == STANDBY_PAUSED
            if keep.running:
                actions.append(Action("pause" if paused else "stop", want.model, want.environment, want.host,
                                      want.index, "scaled to zero", want, keep))
            elif paused and not keep.paused:
                actions.append(Action("pause", want.model, want.environment, want.host, want.index,
                                      "standby is paused (found stopped)", want, keep))
            elif not paused and keep.paused:
                actions.append(Action("stop", want.model, want.environment, want.host, want.index,
                                      "standby is stopped (found paused)", want, keep))
    for rest in by_slot.values():
        leftovers.extend(rest)

    for replica in leftovers:
        if _frozen(desired.frozen, replica):
            continue
        if owned is not None and replica.container_id not in owned:
            continue  # managed by someone else (another daemon, or created by hand): never touched
        key = replica.key
        state = desired.deployments.get(key)
        if state is None and not desired.complete:
            continue  # some file did not load: "absent" may just mean "unreadable"
        if state is None:
            reason = "removed from Git"
        elif not state.enabled:
            reason = "deployment disabled"
        elif (replica.model, replica.environment, replica.index) in wanted:
            reason = "duplicate"
        else:
            reason = "scaled down" if state.hosts or not state.unschedulable else "unschedulable"
            if state.unschedulable and replica.running:
                # Capacity vanished (e.g. host down): keep what still runs rather than drop it.
                continue
        actions.append(Action("remove", replica.model, replica.environment, replica.host, replica.index,
                              reason, None, replica))
    return sorted(actions, key=Action.sort_key)


def _best_match(want: DesiredReplica, candidates: list[ObservedReplica]) -> ObservedReplica | None:
    fitting = [c for c in candidates if c.spec_hash == want.spec_hash and c.host == want.host]
    # Prefer one that runs, then the lowest id for determinism.
    fitting.sort(key=lambda c: (not c.running, c.container_id))
    return fitting[0] if fitting else None


def _pick_old(want: DesiredReplica, candidates: list[ObservedReplica]) -> ObservedReplica:
    """The container a replace takes over from: a running one on the same host first."""
    return sorted(candidates, key=lambda c: (not c.running, c.host != want.host, c.container_id))[0]
