"""Observe the pool: the managed containers on every reachable host, in parallel."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from modelfleet.reconciler.errors import ModelfleetError
from modelfleet.reconciler.pool.adapter import ContainerInfo, HostClient
from modelfleet.state.actual import ObservedReplica, from_labels


@dataclass
class Observation:
    replicas: list[ObservedReplica] = field(default_factory=list)
    containers: dict[tuple[str, str], ContainerInfo] = field(default_factory=dict)  # (host, id) -> info
    down_hosts: frozenset[str] = frozenset()
    errors: dict[str, str] = field(default_factory=dict)  # host -> why unreachable
    seconds: float = 0.0


def observe(clients: Sequence[HostClient]) -> Observation:
    started = time.monotonic()

    def one(client: HostClient) -> tuple[str, list[ContainerInfo] | str]:
        try:
            return client.name, client.list_managed()
        except ModelfleetError as exc:
            return client.name, str(exc)

    result = Observation()
    down: set[str] = set()
    with ThreadPoolExecutor(max_workers=max(1, min(32, len(clients)))) as pool:
        for host, listed in pool.map(one, clients):
            if isinstance(listed, str):
                down.add(host)
                result.errors[host] = listed
                continue
            for info in listed:
                replica = from_labels(host, info.id, info.name, info.labels, info.running)
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
