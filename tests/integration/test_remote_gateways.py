"""Gateways on more machines than one: two remote gateways, each in the network namespace of a pool
host of its own location, follow the daemon's route table over HTTP (`gateway.follow: controlPlane`).

Without IP forwarding between the namespaces, a gateway can only reach the replicas on its own host:
a request sent anywhere else would fail, so answers prove that each serves from its local replicas.
Each keeps serving while the daemon is down, and sees a blue-green switch with zero failed requests.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from netns_hosts import TestHost

from tests.integration.fleet import BASE_MANIFESTS, Fleet, echo_model, free_port, make_fleet, running

TOKEN = "api-t0ken-of-the-remote-gateways-test"
ENVIRONMENT = "development"  # no location policy: replicas on every host


@dataclass
class RemoteGateway:
    host: TestHost
    location: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{self.host.address}:{self.port}"

    def call(self, client: httpx.Client) -> httpx.Response:
        try:
            return client.get(f"{self.url}/models/echo/predict?environment={ENVIRONMENT}", timeout=5)
        except httpx.HTTPError as exc:
            return httpx.Response(599, text=str(exc))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


@contextlib.contextmanager
def remote_gateway(fleet: Fleet, host: TestHost, location: str) -> Iterator[RemoteGateway]:
    """`modelfleet gateway` inside ``host``'s namespace, following the daemon's API at the root side of its link."""
    config = yaml.safe_load(fleet.config_path.read_text())
    port = free_port()
    config["gateway"] = {"listen": f"0.0.0.0:{port}", "follow": "controlPlane", "location": location,
                         "controlPlane": f"http://{host.gateway}:{fleet.api_port}",
                         "controlPlaneTokenFile": str(fleet.root / "api-token"),
                         "cacheDir": str(fleet.root / f"cache-{location}"), "id": f"gw-{location}"}
    config["stateDir"] = str(fleet.root / f"gateway-state-{location}")
    path = fleet.root / f"gateway-{location}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = fleet.root / f"gateway-{location}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            ["nsenter", f"--net=/var/run/netns/{host.netns}", sys.executable, "-m", "modelfleet.reconciler.cli",
             "gateway", "--config", str(path)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    gateway = RemoteGateway(host, location, port, process, log_path)
    try:
        yield gateway
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture
def fleet(clean_hosts: list[TestHost], tmp_path: Path) -> Iterator[Fleet]:
    (tmp_path / "api-token").write_text(TOKEN + "\n")
    fleet = make_fleet(tmp_path, clean_hosts)
    config = yaml.safe_load(fleet.config_path.read_text())
    config["api"] = {"listen": f"0.0.0.0:{fleet.api_port}", "tokenFile": str(tmp_path / "api-token")}
    fleet.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    fleet.api_token = TOKEN
    fleet.push({**BASE_MANIFESTS, "models/echo.yaml": echo_model(replicas=3, environment=ENVIRONMENT)}, "initial")
    with running(fleet):
        yield fleet


def daemon_log(fleet: Fleet) -> str:
    return "".join(path.read_text(errors="replace") for path in sorted(fleet.root.glob("daemon-*.log")))


def replica_hosts(fleet: Fleet) -> dict[str, str]:
    """Container hostname (its short id, what echo answers with) -> the pool host it runs on."""
    return {c["id"][:12]: c["host"] for c in fleet.containers() if c["state"] == "running"}


class Load:
    """Requests in a loop through one gateway, on a thread: answers by pool host and version, failures."""

    def __init__(self, gateway: RemoteGateway) -> None:
        self.gateway = gateway
        self.answers: list[tuple[str, str]] = []  # (container hostname, version)
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(trust_env=False) as client:
            deadline = time.monotonic() + 150
            while not self._stop.is_set() and time.monotonic() < deadline:
                response = self.gateway.call(client)
                if response.status_code == 200:
                    body = response.json()
                    self.answers.append((body["host"], body["version"]))
                else:
                    self.failures.append(f"{response.status_code} {response.text[:200]}")
                time.sleep(0.01)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def test_two_remote_gateways_serve_locally_through_an_outage_and_a_blue_green_switch(fleet: Fleet) -> None:
    fleet.wait(lambda: fleet.deployment("echo", ENVIRONMENT).get("ready_replicas") == 3, 60, "three replicas")
    hosts = fleet.hosts
    by_host = {c["host"] for c in fleet.containers()}
    assert by_host == set(fleet.host_names), by_host  # one replica per host: spread
    with remote_gateway(fleet, hosts[0], "paris-1") as paris, remote_gateway(fleet, hosts[2], "virginia-1") as virginia:
        with httpx.Client(trust_env=False) as client:
            for gateway in (paris, virginia):
                fleet.wait(lambda g=gateway: g.call(client).status_code == 200, 30,  # type: ignore[misc]
                           f"{gateway.location} gateway serving\n{gateway.log()}")
            where = replica_hosts(fleet)
            for gateway, host_name in ((paris, fleet.host_names[0]), (virginia, fleet.host_names[2])):
                served = {where.get(gateway.call(client).json()["host"]) for _ in range(10)}
                assert served == {host_name}, (gateway.location, served)
            routes = client.get(f"{paris.url}/routes", headers={"authorization": f"Bearer {TOKEN}"}).json()
            assert routes["location"] == "paris-1" and "/api/v1/routes" in routes["source"]

            # The daemon goes down: both keep serving from the table they follow.
            fleet.stop()
            for gateway in (paris, virginia):
                answers = [gateway.call(client).status_code for _ in range(5)]
                assert answers == [200] * 5, (gateway.location, answers, gateway.log())
            fleet.start()

        # A blue-green switch: every request through either gateway is answered, v1 then v2.
        with Load(paris) as paris_load, Load(virginia) as virginia_load:
            time.sleep(0.5)
            fleet.push({"models/echo.yaml": echo_model(version="v2", replicas=3, environment=ENVIRONMENT)}, "v2")

            def switched() -> bool:
                return all(load.answers and load.answers[-1][1] == "v2" for load in (paris_load, virginia_load))

            fleet.wait(switched, 90, "both gateways serving v2")
            time.sleep(0.5)
        for load in (paris_load, virginia_load):
            assert load.failures == [], (load.gateway.location, load.failures[:5], load.gateway.log())
            versions = [version for _, version in load.answers]
            assert versions[0] == "v1" and versions[-1] == "v2"
            assert versions == sorted(versions), "v1 again after v2"  # one switch, never back

        # A gateway that does not follow for a while (frozen, still counted live for up to 10 s): the
        # rollout waits for it before removing an old replica, and says which one it waits for.
        fleet.wait(lambda: fleet.deployment("echo", ENVIRONMENT).get("state") == "success", 60, "v2 rolled out")
        waits_before = daemon_log(fleet).count("waiting for gateway(s) gw-paris-1-w")
        os.killpg(paris.process.pid, signal.SIGSTOP)
        try:
            revision = fleet.push({"models/echo.yaml": echo_model(version="v3", replicas=3, environment=ENVIRONMENT)},
                                  "v3")
            fleet.wait(lambda: daemon_log(fleet).count("waiting for gateway(s) gw-paris-1-w") > waits_before, 30,
                       "the rollout waiting for the frozen paris gateway")
        finally:
            os.killpg(paris.process.pid, signal.SIGCONT)
        fleet.wait(lambda: (d := fleet.deployment("echo", ENVIRONMENT)).get("revision") == revision
                   and d.get("state") == "success", 60, "v3 ready")
        with httpx.Client(trust_env=False) as client:
            fleet.wait(lambda: paris.call(client).json().get("version") == "v3", 20, "paris serving v3")
