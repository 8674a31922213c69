"""Faults of one Docker host that must not hold up the others: a host whose dockerd hangs (frozen:
the kernel still accepts its connections, nothing answers) and a host that answers slowly (every
request delayed by a proxy in front of its API).

(The kernel of the CI machine has no sch_netem, so `tc qdisc ... netem delay` is not available:
the slow host is a delaying TCP proxy instead, the hung host a SIGSTOPped dockerd.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from netns_hosts import TestHost

from tests.integration.fleet import BASE_MANIFESTS, Fleet, dump, echo_model, make_fleet, running

DOCKER_TIMEOUT = 5.0  # make_fleet's docker.timeout
SLOW = "vir-2"  # the US host: production (eu-only) runs on par-0 and fra-1, never there


class DelayProxy:
    """A TCP proxy on 127.0.0.1 that holds every chunk the client sends for ``delay`` seconds
    before passing it on: each request to the host's Docker API takes ``delay`` longer."""

    def __init__(self, target: tuple[str, int], delay: float) -> None:
        self.target = target
        self.delay = delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self._sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, self.delay), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, 0.0), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, delay: float) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                if delay:
                    time.sleep(delay)
                sink.sendall(chunk)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed.set()
        self.listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


def host_status(fleet: Fleet, name: str, status: dict[str, Any] | None = None) -> dict[str, Any]:
    """The entry of ``/api/v1/status`` hosts for ``name`` (empty when not there yet)."""
    hosts = (status if status is not None else fleet.status()).get("hosts") or []
    return next((dict(h) for h in hosts if h.get("name") == name), {})


def host_of(fleet: Fleet, name: str) -> TestHost:
    return fleet.hosts[fleet.host_names.index(name)]


def ready_at(fleet: Fleet, revision: str) -> bool:
    d = fleet.deployment("echo")
    return (d.get("state") == "success" and d.get("ready_replicas") == 2 and d.get("revision") == revision
            and fleet.routed())


def versions(fleet: Fleet, calls: int = 10) -> set[str]:
    seen = set()
    for _ in range(calls):
        response = fleet.call("echo", "/")
        if response.status_code != 200:
            return set()
        seen.add(response.json()["version"])
    return seen


def roll_out_v2_beside(fleet: Fleet) -> dict[str, Any]:
    """Push echo v2 and check it rolls out on par-0/fra-1 and passes stay short; returns the status."""
    revision = fleet.push({"models/echo.yaml": echo_model(version="v2")}, "echo v2")
    fleet.api("/api/v1/sync", method="POST")
    started = time.monotonic()
    fleet.wait(lambda: ready_at(fleet, revision) and versions(fleet) == {"v2"}, 45,
               "echo v2 rolled out on the other hosts")
    took = time.monotonic() - started
    containers = [c for c in fleet.containers() if c["host"] != SLOW]
    assert sorted(c["host"] for c in containers) == ["fra-1", "par-0"], dump(containers)
    assert all(c["state"] == "running" for c in containers), dump(containers)
    # A pass takes its rollout (readiness of the new replicas) plus at most one docker.timeout for the
    # host that does not answer: not one timeout per call to it, nor an unbounded wait.
    assert took < 40, took
    status = fleet.status()
    return status


@pytest.fixture
def fleet(clean_hosts: list[TestHost], tmp_path: Path) -> Iterator[Fleet]:
    fleet = make_fleet(tmp_path, clean_hosts)
    fleet.push({**BASE_MANIFESTS, "models/echo.yaml": echo_model()}, "initial")
    yield fleet


def test_a_hung_host_does_not_stall_passes_for_the_others(fleet: Fleet) -> None:
    slow = host_of(fleet, SLOW)
    with running(fleet):
        first = fleet.wait(lambda: (d := fleet.deployment("echo")).get("state") == "success" and d, 30, "echo ready")
        os.kill(slow.pid, signal.SIGSTOP)  # dockerd frozen: connections are accepted, nothing answers
        try:
            fleet.wait(lambda: host_status(fleet, SLOW).get("up") is False, 30,
                       f"{SLOW} reported unreachable")
            status = roll_out_v2_beside(fleet)
            host = host_status(fleet, SLOW, status)
            assert host["up"] is False and host["state"].startswith(("unreachable", "down")), dump(host)
            assert SLOW in host["error"] and "unreachable" in host["error"], dump(host)
            for name in ("par-0", "fra-1"):
                assert host_status(fleet, name, status)["up"] is True, dump(status["hosts"])
            last = status["lastPass"]
            assert SLOW in last["down_hosts"], dump(last)
            # Observe waited for the hung host at most one docker.timeout (plus scheduling slack).
            assert last["observe_seconds"] < DOCKER_TIMEOUT + 2.0, dump(last)
            assert first["revision"] != status["lastPass"]["revision"]
        finally:
            os.kill(slow.pid, signal.SIGCONT)
        fleet.wait(lambda: host_status(fleet, SLOW).get("up") is True, 30,
                   f"{SLOW} up again")


def test_a_slow_host_is_reported_and_does_not_hold_up_the_others(fleet: Fleet) -> None:
    slow = host_of(fleet, SLOW)
    address, port = slow.docker_url.removeprefix("tcp://").rsplit(":", 1)
    proxy = DelayProxy((address, int(port)), delay=3.0)
    try:
        config = yaml.safe_load(fleet.config_path.read_text())
        for host in config["pool"]["hosts"]:
            if host["name"] == SLOW:
                host["url"] = f"tcp://127.0.0.1:{proxy.port}"
        fleet.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        with running(fleet):
            fleet.wait(lambda: fleet.deployment("echo").get("state") == "success", 40, "echo ready")
            status = roll_out_v2_beside(fleet)
            last = status["lastPass"]
            # Every request to it takes 3 s, under the 5 s docker.timeout: slow, not unreachable.
            # A pass waits for its list (3 s), not more.
            host = host_status(fleet, SLOW, status)
            assert last["observe_seconds"] < DOCKER_TIMEOUT + 2.0, dump(last)
            assert host.get("observe_seconds", 0) >= 2.5 or host["up"] is False, dump(host)
    finally:
        proxy.close()
