"""Applying a paused standby (serverless.standby: paused) against a recording host: which Docker
calls happen in which order, what the store and the routes say, and what a standby that never
gets ready becomes (stopped again, never removed, never paused)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from modelfleet.reconciler.config import RolloutSettings
from modelfleet.reconciler.daemon.store import Store
from modelfleet.reconciler.pool.adapter import ContainerInfo, ContainerSpec
from modelfleet.reconciler.rollout.apply import Applier
from modelfleet.state.actual import ObservedReplica, container_name
from modelfleet.state.desired import DesiredReplica, compute_desired
from modelfleet.state.loader import load_tree
from modelfleet.state.plan import Action
from tests.state.helpers import fixture_pool

ENV = b"apiVersion: modelfleet.dev/v1alpha1\nkind: Environment\nmetadata: {name: production}\n"
MODEL = b"""apiVersion: modelfleet.dev/v1alpha1
kind: Model
metadata: {name: echo}
spec:
  deployments:
    - environment: production
      serverless: {minReplicas: 0, standby: paused}
      runtime: {type: custom, image: "modelfleet/echo:latest", port: 8080,
                readinessProbe: {path: /ping, period: 100ms}}
"""
PORT = 32000


class Host:
    """Records the container calls; the container answers its probe once ``answers`` is set."""

    def __init__(self) -> None:
        self.name = "h"
        self.calls: list[str] = []
        self.state = "none"  # none | running | paused | exited
        self.container = "mf"

    def create_and_start(self, spec: ContainerSpec, start: bool = True) -> ContainerInfo:
        self.calls.append(f"create start={start}")
        self.state = "running" if start else "exited"
        self.container = spec.name
        return self.inspect("cid")

    def inspect(self, container_id: str) -> ContainerInfo:
        return ContainerInfo(container_id, self.container, {}, self.state == "running", {8080: PORT},
                             self.state == "paused")

    def start(self, container_id: str) -> None:
        self.calls.append("start")
        self.state = "running"

    def stop(self, container_id: str, timeout: int = 10) -> None:
        self.calls.append("stop")
        self.state = "exited"

    def pause(self, container_id: str) -> None:
        assert self.state == "running", self.state
        self.calls.append("pause")
        self.state = "paused"

    def unpause(self, container_id: str) -> None:
        assert self.state == "paused", self.state
        self.calls.append("unpause")
        self.state = "running"

    def remove(self, container_id: str) -> None:
        self.calls.append("remove")
        self.state = "none"

    def logs_tail(self, container_id: str) -> str:
        return "still loading"


class Prober:
    def __init__(self, host: Host, answers: bool) -> None:
        self.host, self.answers, self.probed = host, answers, 0

    def probe(self, url: str, timeout: float) -> bool:
        self.probed += 1
        return self.answers and self.host.state == "running"


def _setup(tmp_path: Path, answers: bool = True,
           deadline: float = 300.0) -> tuple[Applier, Host, Prober, DesiredReplica, list[int]]:
    desired = compute_desired(load_tree({"env.yaml": ENV, "echo.yaml": MODEL}), fixture_pool(), "rev")
    [want] = desired.replicas
    assert not want.running and want.standby == "paused"
    host = Host()
    published: list[int] = []

    def publish() -> int:
        published.append(len(published) + 1)
        return len(published)

    applier = Applier({want.host: host}, {h.name: h for h in fixture_pool()}, Store(tmp_path),  # type: ignore[dict-item]
                      RolloutSettings(healthy_deadline=deadline, progress_deadline=max(deadline, 600.0)),
                      publish, drain_seconds=0.0)
    prober = Prober(host, answers)
    applier.prober = prober  # type: ignore[assignment]
    return applier, host, prober, want, published


def _observed(want: DesiredReplica, host: Host) -> ObservedReplica:
    name = container_name(want.model, want.environment, want.index, want.spec_hash)
    return ObservedReplica(want.host, "cid", name, want.model, want.environment, want.index, want.spec_hash,
                           want.revision, host.state == "running", host.state == "paused")


def _row(applier: Applier) -> tuple[bool, str | None]:
    [row] = applier.store.inventory()
    return row.ready, row.container_id


def test_a_new_paused_standby_is_started_waited_for_and_paused_never_ready_in_the_routes(tmp_path: Path) -> None:
    applier, host, prober, want, _ = _setup(tmp_path)
    outcome = applier._run(1, Action("create", want.model, want.environment, want.host, 0, "missing", want))
    assert outcome.ok, outcome.error
    assert host.calls == ["create start=True", "pause"] and prober.probed >= 1
    assert _row(applier) == (False, "cid")  # never marked ready: never routed


def test_the_first_request_unpauses_it_and_routes_it(tmp_path: Path) -> None:
    applier, host, _, want, published = _setup(tmp_path)
    applier._run(1, Action("create", want.model, want.environment, want.host, 0, "missing", want))
    host.calls.clear()
    running = replace(want, running=True)
    start = Action("start", want.model, want.environment, want.host, 0, "paused", running, _observed(want, host))
    assert applier._run(2, start).ok
    assert host.calls == ["unpause"]  # not a docker start: the loaded process thaws
    assert _row(applier) == (True, "cid") and published


def test_idle_again_it_leaves_the_routes_and_is_paused(tmp_path: Path) -> None:
    applier, host, _, want, _ = _setup(tmp_path)
    applier._run(1, Action("create", want.model, want.environment, want.host, 0, "missing", want))
    running = replace(want, running=True)
    applier._run(2, Action("start", want.model, want.environment, want.host, 0, "paused", running,
                           _observed(want, host)))
    host.calls.clear()
    pause = Action("pause", want.model, want.environment, want.host, 0, "scaled to zero", want, _observed(want, host))
    assert applier._run(3, pause).ok
    assert host.calls == ["pause"] and _row(applier) == (False, "cid")


def test_a_stopped_standby_that_never_gets_ready_is_left_stopped_not_removed(tmp_path: Path) -> None:
    applier, host, _, want, _ = _setup(tmp_path, answers=False, deadline=0.3)
    host.state = "exited"
    applier.store.record_intent(want.host, "mf", want.model, want.environment, 0, want.spec_hash, want.revision)
    applier.store.record_created(want.host, "mf", "cid", "u", "p")
    pause = Action("pause", want.model, want.environment, want.host, 0, "standby is paused (found stopped)", want,
                   _observed(want, host))
    outcome = applier._run(1, pause)
    assert not outcome.ok and outcome.failed_version
    assert outcome.error is not None and "left stopped" in outcome.error and "still loading" in outcome.error
    assert host.calls == ["start", "stop"] and host.state == "exited"
    assert _row(applier) == (False, "cid")


@pytest.mark.parametrize("found", ["paused", "exited"])
def test_a_stop_of_a_standby_that_does_not_run_does_not_drain(tmp_path: Path, found: str) -> None:
    applier, host, _, want, published = _setup(tmp_path)
    host.state = found
    stop = Action("stop", want.model, want.environment, want.host, 0, "standby is stopped (found paused)",
                  replace(want, standby="stopped"), _observed(want, host))
    applier.store.record_intent(want.host, "mf", want.model, want.environment, 0, want.spec_hash, want.revision)
    applier.store.record_created(want.host, "mf", "cid", "u", "p")
    assert applier._run(1, stop).ok
    assert host.calls == ["stop"] and not published
