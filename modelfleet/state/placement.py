"""Placement: which eligible host runs each replica.

Rules, in order:
1. Stable: a replica that already runs on a host that is still eligible, healthy and not over
   capacity stays there. These are reserved first, for every deployment, so that adding a
   deployment or a host never moves an existing replica.
2. Capacity: CPUs and memory requested by the runtime must fit in what is left on the host.
3. Locality: a host that already holds the model's artifact (``warm``: no transfer before the
   start) comes first for a serverless deployment, whose new replicas are cold starts on the
   request path; for the others it breaks ties after spread.
4. Spread: a new replica goes to the location with the fewest replicas of its deployment, then to
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
    warm: frozenset[str] = frozenset()  # hosts that hold the model's artifact already
    prefer_warm: bool = False  # warm hosts before spread (serverless), not only as a tie-break


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
    # What is left on each host, as two flat dicts: this loop runs per replica and eligible host.
    free_cpus = {h.name: h.capacity.cpus for h in hosts}
    free_memory = {h.name: h.capacity.memory for h in hosts}
    result = PlacementResult()
    previous = previous or {}

    # 1. Sticky: keep replicas where they are when still allowed and still fitting.
    for req in ordered:
        placed: dict[int, str] = {}
        was = previous.get(req.key)
        if was:
            eligible = set(req.eligible)
            for index, host in sorted(was.items()):
                # Small epsilon: 0.1 + 0.2 CPUs must fit in 0.3.
                if index < req.replicas and host in eligible and free_cpus[host] + _EPSILON >= req.cpus \
                        and free_memory[host] >= req.memory:
                    free_cpus[host] -= req.cpus
                    free_memory[host] -= req.memory
                    placed[index] = host
        result.assignments[req.key] = placed

    # 2. New replicas: spread across locations, then hosts; rendezvous hash breaks ties.
    # The least left on any host: a replica that fits in it fits on every host (the common case
    # of a roomy pool), and the per-host check is skipped.
    least_cpus = min(free_cpus.values(), default=0.0)
    least_memory = min(free_memory.values(), default=0)
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
            # The fitting hosts of the least-used location, and among them the least-used hosts:
            # the lowest (replicas in its location, replicas on it), in eligible order.
            if least_cpus + _EPSILON >= cpus and least_memory >= memory:
                tied = list(req.eligible)
            else:
                tied = [h for h in req.eligible if free_cpus[h] + _EPSILON >= cpus and free_memory[h] >= memory]
            if not tied:
                result.unschedulable[req.key] = _why_unschedulable(req, len(missing), free_cpus, free_memory)
                break
            if req.prefer_warm and req.warm:
                tied = _warm_or_all(tied, req.warm)
            if per_location:
                in_location = [per_location.get(location_of[h], 0) for h in tied]
                fewest = min(in_location)
                tied = [h for h, n in zip(tied, in_location, strict=True) if n == fewest]
                # A host with replicas is in a location with replicas: when the least-used
                # location has none, neither has any of its hosts.
                if fewest:
                    on_host = [per_host.get(h, 0) for h in tied]
                    fewest = min(on_host)
                    tied = [h for h, n in zip(tied, on_host, strict=True) if n == fewest]
            if len(tied) > 1 and req.warm and not req.prefer_warm:
                tied = _warm_or_all(tied, req.warm)
            best = tied[0] if len(tied) == 1 else _highest_score(req.key, index, tied, host_bytes)
            free_cpus[best] -= cpus
            free_memory[best] -= memory
            least_cpus = min(least_cpus, free_cpus[best])
            least_memory = min(least_memory, free_memory[best])
            placed[index] = best
            per_location[location_of[best]] = per_location.get(location_of[best], 0) + 1
            per_host[best] = per_host.get(best, 0) + 1
    result.free = {name: (free_cpus[name], free_memory[name]) for name in free_cpus}
    return result


_EPSILON = 1e-9


def _warm_or_all(hosts: list[str], warm: frozenset[str]) -> list[str]:
    """The hosts that hold the artifact, or all of them when none does."""
    return [h for h in hosts if h in warm] or hosts


def _highest_score(key: Key, index: int, hosts: list[str], host_bytes: Mapping[str, bytes]) -> str:
    """The host with the highest rendezvous score: the same as ``max(hosts, key=_score)`` (the
    first of equals), with the common prefix hashed once and the 8-byte big-endian digests
    compared as bytes (the same order as their integers)."""
    prefix = hashlib.blake2b(f"{key[0]}\0{key[1]}\0{index}\0".encode(), digest_size=8)

    def score(host: str) -> bytes:
        digest = prefix.copy()
        digest.update(host_bytes[host])
        return digest.digest()

    return max(hosts, key=score)


def _why_unschedulable(req: PlacementRequest, missing: int, free_cpus: Mapping[str, float],
                       free_memory: Mapping[str, int]) -> str:
    need = f"{format_cpus(req.cpus)} cpus / {format_memory(req.memory)} per replica"
    if not req.eligible:
        return f"no eligible host for {missing} replica(s) (see excluded hosts)"
    room = ", ".join(
        f"{h} has {format_cpus(max(free_cpus[h], 0))} cpus / {format_memory(max(free_memory[h], 0))} free"
        for h in req.eligible
    )
    return f"not enough capacity for {missing} replica(s): needs {need}; {room}"
