"""Placement: which eligible host runs each replica.

Rules, in order:
1. Stable: a replica that already runs on a host that is still eligible, healthy and not over
   capacity stays there. These are reserved first, for every deployment, so that adding a
   deployment or a host never moves an existing replica.
2. Capacity: CPUs and memory requested by the runtime must fit in what is left on the host.
3. Spread: a new replica goes to the location with the fewest replicas of its deployment, then to
   the host with the fewest, then by rendezvous hash (deterministic, and only the replicas that
   must move do move).
Unschedulable replicas are reported per deployment, never raised.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from modelfleet.state.pool import Host
from modelfleet.state.units import format_cpus, format_memory

Key = tuple[str, str]  # (model, environment)


@dataclass(frozen=True)
class PlacementRequest:
    key: Key
    replicas: int
    cpus: float
    memory: int
    eligible: tuple[str, ...]  # host names that pass policies, flavors and health


@dataclass
class _Free:
    cpus: float
    memory: int

    def fits(self, cpus: float, memory: int) -> bool:
        # Small epsilon: 0.1 + 0.2 CPUs must fit in 0.3.
        return self.cpus + 1e-9 >= cpus and self.memory >= memory

    def take(self, cpus: float, memory: int) -> None:
        self.cpus -= cpus
        self.memory -= memory


@dataclass
class PlacementResult:
    # key -> replica index -> host name
    assignments: dict[Key, dict[int, str]] = field(default_factory=dict)
    # key -> human-readable reasons why some replicas could not be placed
    unschedulable: dict[Key, str] = field(default_factory=dict)
    free: dict[str, tuple[float, int]] = field(default_factory=dict)


def _score(key: Key, index: int, host: str) -> int:
    digest = hashlib.blake2b(f"{key[0]}\0{key[1]}\0{index}\0{host}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def place(
    requests: Iterable[PlacementRequest],
    hosts: Sequence[Host],
    previous: Mapping[Key, Mapping[int, str]] | None = None,
) -> PlacementResult:
    ordered = sorted(requests, key=lambda r: r.key)
    location_of = {h.name: h.location.name for h in hosts}
    host_bytes = {h.name: h.name.encode() for h in hosts}
    free = {h.name: _Free(h.capacity.cpus, h.capacity.memory) for h in hosts}
    result = PlacementResult()
    previous = previous or {}

    # 1. Sticky: keep replicas where they are when still allowed and still fitting.
    for req in ordered:
        placed: dict[int, str] = {}
        eligible = set(req.eligible)
        for index, host in sorted(previous.get(req.key, {}).items()):
            if index < req.replicas and host in eligible and free[host].fits(req.cpus, req.memory):
                free[host].take(req.cpus, req.memory)
                placed[index] = host
        result.assignments[req.key] = placed

    # 2. New replicas: spread across locations, then hosts; rendezvous hash breaks ties.
    for req in ordered:
        placed = result.assignments[req.key]
        missing = [i for i in range(req.replicas) if i not in placed]
        if not missing:
            continue
        per_location: dict[str, int] = {}
        per_host: dict[str, int] = {}
        for host in placed.values():
            per_location[location_of[host]] = per_location.get(location_of[host], 0) + 1
            per_host[host] = per_host.get(host, 0) + 1
        cpus, memory = req.cpus, req.memory
        for index in missing:
            # The fitting hosts of the least-used location, and among them the least-used hosts.
            best_rank: tuple[int, int] | None = None
            tied: list[str] = []
            for h in req.eligible:
                if not free[h].fits(cpus, memory):
                    continue
                rank = (per_location.get(location_of[h], 0), per_host.get(h, 0))
                if best_rank is None or rank < best_rank:
                    best_rank, tied = rank, [h]
                elif rank == best_rank:
                    tied.append(h)
            if not tied:
                result.unschedulable[req.key] = _why_unschedulable(req, len(missing), free)
                break
            best = tied[0] if len(tied) == 1 else _highest_score(req.key, index, tied, host_bytes)
            free[best].take(cpus, memory)
            placed[index] = best
            per_location[location_of[best]] = per_location.get(location_of[best], 0) + 1
            per_host[best] = per_host.get(best, 0) + 1
    result.free = {name: (f.cpus, f.memory) for name, f in free.items()}
    return result


def _highest_score(key: Key, index: int, hosts: list[str], host_bytes: Mapping[str, bytes]) -> str:
    """The host with the highest rendezvous score: the same as ``max(hosts, key=_score)``, with
    the common prefix hashed once."""
    prefix = hashlib.blake2b(f"{key[0]}\0{key[1]}\0{index}\0".encode(), digest_size=8)
    best, best_score = hosts[0], -1
    for host in hosts:
        digest = prefix.copy()
        digest.update(host_bytes[host])
        score = int.from_bytes(digest.digest(), "big")
        if score > best_score:
            best, best_score = host, score
    return best


def _why_unschedulable(req: PlacementRequest, missing: int, free: Mapping[str, _Free]) -> str:
    need = f"{format_cpus(req.cpus)} cpus / {format_memory(req.memory)} per replica"
    if not req.eligible:
        return f"no eligible host for {missing} replica(s) (see excluded hosts)"
    room = ", ".join(
        f"{h} has {format_cpus(max(free[h].cpus, 0))} cpus / {format_memory(max(free[h].memory, 0))} free"
        for h in req.eligible
    )
    return f"not enough capacity for {missing} replica(s): needs {need}; {room}"
