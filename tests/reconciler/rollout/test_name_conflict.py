"""A create whose container name is taken: the holder is replaced only when its labels prove it is
exactly this replica (a leftover of an interrupted attempt); any other container is never removed,
whether or not the daemon still has its inventory (a lost or recreated store)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from modelfleet.reconciler.config import RolloutSettings
from modelfleet.reconciler.daemon.store import Store
from modelfleet.reconciler.errors import DockerOperationError, TerminalError
from modelfleet.reconciler.pool.adapter import ContainerInfo, ContainerSpec
from modelfleet.reconciler.rollout.apply import Applier
from modelfleet.state.actual import container_name, labels_for
from modelfleet.state.desired import DesiredReplica, compute_desired
from modelfleet.state.loader import load_tree
from tests.state.helpers import fixture_pool

ENV = b"apiVersion: modelfleet.dev/v1alpha1\nkind: Environment\nmetadata: {name: production}\n"
MODEL = b"""apiVersion: modelfleet.dev/v1alpha1
kind: Model
metadata: {name: echo}
spec:
  deployments:
    - environment: production
      runtime: {type: custom, image: "modelfleet/echo:latest", port: 8080}
"""


class NameTaken:
    """A host where the replica's name is held by ``holder``: the first create conflicts."""

    def __init__(self, holder: ContainerInfo) -> None:
        self.name = "h"
        self.holder: ContainerInfo | None = holder
        self.removed: list[str] = []
        self.created: list[ContainerSpec] = []

    def create_and_start(self, spec: ContainerSpec, start: bool = True) -> ContainerInfo:
        if self.holder is not None:
            raise DockerOperationError("h", "create container", f"409 Conflict: name {spec.name} already in use")
        self.created.append(spec)
        return ContainerInfo("new-id", spec.name, dict(spec.labels), start, {})

    def find(self, name: str) -> ContainerInfo | None:
        return self.holder

    def remove(self, container_id: str) -> None:
        self.removed.append(container_id)
        self.holder = None


def _standby(tmp_path: Path) -> tuple[Applier, DesiredReplica]:
    desired = compute_desired(load_tree({"env.yaml": ENV, "echo.yaml": MODEL}), fixture_pool(), "rev")
    want = replace(desired.replicas[0], running=False)  # a standby: created, not started (no probe)
    return Applier({}, {}, Store(tmp_path), RolloutSettings(), lambda: None), want


def _bring_up(applier: Applier, client: NameTaken, want: DesiredReplica) -> None:
    applier.clients = {want.host: client}  # type: ignore[dict-item]
    applier._bring_up(want)


@pytest.mark.parametrize("labels", [
    {},  # not a modelfleet container at all
    {"modelfleet.managed": "true", "modelfleet.model": "echo", "modelfleet.environment": "production",
     "modelfleet.replica": "0", "modelfleet.spec-hash": "another-spec"},  # another replica's, or another daemon's
])
def test_a_container_not_proven_to_be_this_replica_is_never_removed(tmp_path: Path, labels: dict[str, str]) -> None:
    applier, want = _standby(tmp_path)
    name = container_name(want.model, want.environment, want.index, want.spec_hash)
    client = NameTaken(ContainerInfo("foreign-id", name, labels, True, {}))
    with pytest.raises(TerminalError, match=f"a container named {name} .* already exists on host {want.host}"):
        _bring_up(applier, client, want)
    assert client.removed == [] and client.created == []


def test_a_leftover_of_this_very_replica_is_replaced(tmp_path: Path) -> None:
    applier, want = _standby(tmp_path)
    name = container_name(want.model, want.environment, want.index, want.spec_hash)
    labels: dict[str, Any] = labels_for(want.model, want.environment, want.index, want.spec_hash, "older-rev")
    client = NameTaken(ContainerInfo("leftover-id", name, labels, False, {}))
    _bring_up(applier, client, want)
    assert client.removed == ["leftover-id"] and [s.name for s in client.created] == [name]
    assert [(r.name, r.container_id) for r in applier.store.inventory()] == [(name, "new-id")]
