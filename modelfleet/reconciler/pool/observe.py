"""Observe the pool: the managed containers on every reachable host, in parallel."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from modelfleet.reconciler.errors import HostUnavailable, ModelfleetError
from modelfleet.reconciler.pool.adapter import ContainerInfo, HostClient
from modelfleet.state.actual import ObservedReplica, from_labels


@dataclass
class Observation:
    replicas: list[ObservedReplica] = field(default_factory=list)
    containers: dict[tuple[str, str], ContainerInfo] = field(default_factory=dict)  # (host, id) -> info
    down_hosts: frozenset[str] = frozenset()
    errors: dict[str, str] = field(default_factory=dict)  # host -> why unreachable
    host_seconds: dict[str, float] = field(default_factory=dict)  # host -> how long its list took
    seconds: float = 0.0
    # host -> the model artifacts it holds (absent: not known this pass, e.g. its volume list failed)
    artifacts: dict[str, frozenset[str]] = field(default_factory=dict)


# How long a host's list of artifact volumes is reused by later passes (the daemon's own volume
# changes are seen at once: its shipper tells the host's client).
ARTIFACTS_MAX_AGE = 30.0

# One host's answer: its containers (or why it could not list them), how long it took, and the
# artifacts it holds (None: not known).
_Listed = tuple[list[ContainerInfo] | str, float, frozenset[str] | None]


def observe(clients: Sequence[HostClient], executor: ThreadPoolExecutor | None = None) -> Observation:
    """One label-filtered list of containers, then of artifact volumes, per host, in parallel.
    A host that has not answered within its client's timeout (docker.timeout) counts as unreachable
    for this pass: the pass does not wait for it (docker-py's timeout bounds each socket operation,
    not a whole call: a host that trickles its answer, or needs a round trip for the API version
    first, could take several). Its list goes on in the background; while it has not returned,
    later passes do not ask again.

    ``executor``: threads kept from pass to pass (the daemon's: starting threads on every pass
    costs more than a fast host's list); it needs a worker per client, since each host has at
    most one list in flight. None: threads of this call only."""
    started = time.monotonic()
    result = Observation()
    if not clients:
        return result

    def one(client: HostClient) -> _Listed:
        began = time.monotonic()
        try:
            listed = client.list_managed()
        except ModelfleetError as exc:
            client.listing.release()
            return str(exc), time.monotonic() - began, None
        held: frozenset[str] | None = None
        try:
            # Only a preference (placement's locality): a host that lists its containers but not
            # its volumes is up, its artifacts are just not known this pass.
            held = client.artifact_ids(max_age=ARTIFACTS_MAX_AGE)
        except ModelfleetError:
            pass
        finally:
            client.listing.release()
        return listed, time.monotonic() - began, held

    down: set[str] = set()
    outcomes: dict[str, list[ContainerInfo] | str] = {}
    seconds: dict[str, float] = {}
    pool = executor or ThreadPoolExecutor(max_workers=max(1, min(32, len(clients))), thread_name_prefix="observe")
    try:
        futures: dict[Future[_Listed], HostClient] = {}
        for client in clients:
            if not client.listing.acquire(blocking=False):
                outcomes[client.name] = str(HostUnavailable(
                    client.name, f"its previous container list has not returned after {client.timeout:g}s "
                    "(docker.timeout); not asked again until it does"))
                continue
            try:
                futures[pool.submit(one, client)] = client
            except BaseException:
                client.listing.release()
                raise
        deadline = started + max((c.timeout for c in futures.values()), default=0.0)
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=max(0.0, deadline - time.monotonic()),
                                 return_when=FIRST_COMPLETED)
            for future in done:
                name = futures[future].name
                outcomes[name], seconds[name], held = future.result()
                if held is not None:
                    result.artifacts[name] = held
            if not done:
                break
        for future in pending:
            client = futures[future]
            outcomes[client.name] = str(HostUnavailable(
                client.name, f"no answer to the container list within {client.timeout:g}s (docker.timeout)"))
    finally:
        if executor is None:
            pool.shutdown(wait=False)
    for client in clients:
        listed = outcomes[client.name]
        host = client.name
        if isinstance(listed, str):
            down.add(host)
            result.errors[host] = listed
            result.host_seconds[host] = round(seconds.get(host, time.monotonic() - started), 4)
            continue
        result.host_seconds[host] = round(seconds[host], 4)
        for info in listed:
            replica = from_labels(host, info.id, info.name, info.labels, info.running, info.paused)
            if replica is not None:
                result.replicas.append(replica)
                result.containers[(host, info.id)] = info
    result.down_hosts = frozenset(down)
    result.seconds = time.monotonic() - started
    return result


def observe_pool(config: object) -> Observation:
    """For `modelfleet plan` without --offline: a one-shot observation of the configured pool."""
    from modelfleet.reconciler.config import Config

    assert isinstance(config, Config)
    clients = [HostClient(h, timeout=min(config.docker.timeout, 10.0)) for h in config.pool.hosts]
    try:
        return observe(clients)
    finally:
        for client in clients:
            client.close()
