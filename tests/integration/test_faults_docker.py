"""Faults on real dockerd hosts: a dockerd restart, a replica that stops answering (failureThreshold),
a SIGKILLed daemon whose gateway keeps serving and is adopted by the next daemon."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import netns_hosts
import pytest
from netns_hosts import TestHost

from tests.integration.fleet import BASE_MANIFESTS, Fleet, dump, echo_model, make_fleet, running


@pytest.fixture
def fleet(clean_hosts: list[TestHost], tmp_path: Path) -> Iterator[Fleet]:
    fleet = make_fleet(tmp_path, clean_hosts)
    fleet.push({**BASE_MANIFESTS, "models/echo.yaml": echo_model()}, "initial")
    with running(fleet):
        yield fleet


def ready(fleet: Fleet, replicas: int = 2) -> bool:
    d = fleet.deployment("echo")
    return d.get("state") == "success" and d.get("ready_replicas") == replicas and fleet.routed()


def answering(fleet: Fleet, calls: int = 20) -> set[str]:
    """The containers (echo answers with its hostname: the container id's first 12 characters)
    that answered ``calls`` requests through the gateway; empty if any request failed."""
    seen = set()
    for _ in range(calls):
        response = fleet.call("echo", "/")
        if response.status_code != 200:
            return set()
        seen.add(response.json()["host"])
    return seen


def routed_containers(fleet: Fleet) -> set[str]:
    """Container names in the gateway's route table for echo/production."""
    try:
        table = httpx.get(f"http://127.0.0.1:{fleet.gateway_port}/routes", timeout=2, trust_env=False).json()
    except (httpx.HTTPError, ValueError):
        return set()
    return {b["container"] for b in table.get("routes", {}).get("echo/production", [])}


def daemon_logs(fleet: Fleet) -> str:
    """Every daemon log of this fleet, whole (Fleet.log keeps only their tails)."""
    return "\n".join(p.read_text(errors="replace") for p in sorted(fleet.root.glob("daemon-*.log")))


def signal_container(fleet: Fleet, container: dict[str, Any], sig: signal.Signals) -> list[int]:
    """Send ``sig`` to every process of the container (host pids, from `docker top`): SIGSTOP
    freezes the replica without Docker knowing (it still shows it running, unlike `docker pause`)."""
    client = fleet.hosts[fleet.host_names.index(container["host"])].client()
    try:
        top = client.api.top(container["id"])
    finally:
        client.close()
    column = top["Titles"].index("PID")
    pids = [int(p[column]) for p in top["Processes"]]
    for pid in pids:
        os.kill(pid, sig)
    return pids


# --- dockerd restart ---------------------------------------------------------------------------------


@pytest.mark.parametrize("down_for", [0.0, 4.0], ids=["between-passes", "seen-unreachable"])
def test_dockerd_restart_brings_the_replica_back_into_the_routes(fleet: Fleet, down_for: float) -> None:
    fleet.wait(lambda: ready(fleet), 30, "echo ready")
    before = {c["id"] for c in fleet.containers()}
    assert len(before) == 2
    victim = fleet.containers()[0]
    host = fleet.hosts[fleet.host_names.index(victim["host"])]
    # Restarted with its containers (stopped, then started again by their restart policy); Docker
    # may publish the replica on another port than before. down_for: passes see the host unreachable.
    netns_hosts.restart_dockerd(host, down_for=down_for)
    fleet.api("/api/v1/sync", method="POST")
    # Within a few passes (pollInterval 2 s): both replicas ready, routed, and answering.
    fleet.wait(lambda: ready(fleet) and {i[:12] for i in before} <= answering(fleet), 30,
               "both replicas answer through the gateway again")
    containers = fleet.containers()
    assert len(containers) == 2, dump(containers)  # nothing duplicated
    assert all(c["state"] == "running" for c in containers), dump(containers)
    assert {c["id"] for c in containers} == before  # back by their restart policy, not recreated


# --- failureThreshold ------------------------------------------------------------------------------


def test_a_replica_that_stops_answering_leaves_the_routes_after_failure_threshold_and_comes_back(
        fleet: Fleet) -> None:
    manifest = echo_model()
    manifest["spec"]["deployments"][0]["runtime"]["readinessProbe"] = {
        "path": "/ping", "period": "500ms", "timeout": "300ms", "failureThreshold": 3}
    revision = fleet.push({"models/echo.yaml": manifest}, "failureThreshold 3")
    fleet.wait(lambda: ready(fleet) and fleet.deployment("echo").get("revision") == revision, 30, "echo ready")
    containers = fleet.containers()
    ids = {c["id"] for c in containers}
    victim = containers[0]
    assert routed_containers(fleet) == {c["name"] for c in containers}
    try:
        # Frozen: the port still accepts connections (docker-proxy, the kernel's backlog), the probe times out.
        assert signal_container(fleet, victim, signal.SIGSTOP)
        fleet.wait(lambda: routed_containers(fleet) == {c["name"] for c in containers} - {victim["name"]},
                   20, "the frozen replica leaves the routes")
        assert "failed 3 readiness probes in a row (failureThreshold 3)" in daemon_logs(fleet)
        status = fleet.wait(lambda: (d := fleet.deployment("echo")).get("ready_replicas") == 1 and d, 20,
                            "status says 1/2")
        assert status["state"] == "error" and "readiness probe" in status["message"], dump(status)
        # The other replica serves everything meanwhile.
        assert answering(fleet) == {c["id"][:12] for c in containers if c is not victim}
    finally:
        signal_container(fleet, victim, signal.SIGCONT)
    fleet.wait(lambda: ready(fleet) and routed_containers(fleet) == {c["name"] for c in containers}, 20,
               "the replica is back in the routes once it answers")
    fleet.wait(lambda: answering(fleet) == {i[:12] for i in ids}, 10, "both answer")
    assert {c["id"] for c in fleet.containers()} == ids  # the same containers: nothing recreated


# --- the gateway outlives the daemon -------------------------------------------------------------------


class Traffic:
    """Requests through the gateway on a thread; every answer that is not a 200 is a failure."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(trust_env=False) as client:
            deadline = time.monotonic() + 120
            while not self._stop.is_set() and time.monotonic() < deadline:
                response = self.fleet.call("echo", "/", client=client)
                if response.status_code == 200:
                    self.ok += 1
                else:
                    self.failures.append(f"{response.status_code} {response.text[:200]}")
                time.sleep(0.01)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def gateway_pids(fleet: Fleet) -> list[int]:
    """Processes running `modelfleet ... gateway --config <this fleet's config>`."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            args = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"gateway" in args and str(fleet.config_path).encode() in args:
            found.append(int(entry.name))
    return found


def test_gateway_survives_a_sigkilled_daemon_and_the_next_daemon_adopts_it(fleet: Fleet) -> None:
    fleet.wait(lambda: ready(fleet), 30, "echo ready")
    pidfile = fleet.state_dir / "gateway.pid"
    gateway = int(pidfile.read_text())
    assert gateway_pids(fleet) == [gateway]
    with Traffic(fleet) as traffic:
        time.sleep(0.3)
        fleet.stop(signal.SIGKILL)
        served_before = traffic.ok
        time.sleep(2.0)  # no daemon: the gateway serves the last route table
        served_while_down = traffic.ok - served_before
        assert gateway_pids(fleet) == [gateway]
        fleet.start()
        fleet.wait(lambda: "adopted the running gateway" in daemon_logs(fleet), 20, "the new daemon adopts it")
        fleet.api("/api/v1/sync", method="POST")
        fleet.wait(lambda: ready(fleet), 30, "ready under the new daemon")
        time.sleep(3.0)  # a supervision round or two: nothing starts a second gateway
        assert gateway_pids(fleet) == [gateway], "a second gateway was started"
        assert int(pidfile.read_text()) == gateway
    assert traffic.failures == [], traffic.failures[:5]
    assert served_while_down > 20
    assert f"adopted the running gateway (pid {gateway})" in daemon_logs(fleet)
    # The daemon that adopted it stops it on a clean shutdown, like one it started itself.
    fleet.stop()
    assert gateway_pids(fleet) == []
    assert not pidfile.exists()
