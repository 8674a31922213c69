"""Glue between inputs and the pure core: load → desired → diff, and the plan's JSON shape."""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterable, Mapping
from dataclasses import dataclass

from modelfleet.state.actual import ObservedReplica
from modelfleet.state.desired import DesiredState, OriginFacts, compute_desired
from modelfleet.state.loader import Catalog, load_tree
from modelfleet.state.plan import Action, diff
from modelfleet.state.pool import Host


@dataclass
class PlanResult:
    catalog: Catalog
    desired: DesiredState
    actions: list[Action]

    def to_json(self, explain: bool = True) -> dict[str, object]:
        deployments = []
        for key in sorted(self.desired.deployments):
            state = self.desired.deployments[key]
            item: dict[str, object] = {
                "model": state.model,
                "environment": state.environment,
                "enabled": state.enabled,
                "source": state.source,
                "eligible_hosts": state.eligible_hosts,
                "hosts": state.hosts,
                "errors": [str(e) for e in state.errors]
                + ([state.unschedulable] if state.unschedulable else []),
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
            deployments.append(item)
        return {
            "revision": self.desired.revision,
            "valid": not self.desired.errors,
            "errors": [str(e) for e in self.desired.errors],
            "deployments": deployments,
            "actions": [a.to_json() for a in self.actions],
        }


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
