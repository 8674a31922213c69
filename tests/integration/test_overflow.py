"""Overflow from an on-prem model on the real pool: a serverless deployment (at zero) whose requests
go to an endpoint outside the pool first — a real HTTP server in a network namespace of its own.
Killing it mid-load moves the traffic to the pool (activated from zero) with no failed request;
bringing it back moves the traffic back; a burst above maxConcurrency spills to the pool."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import netns_hosts
import pytest
from netns_hosts import TestHost

from tests.integration.fleet import BASE_MANIFESTS, Fleet, echo_model, make_fleet

PORT = 8080
# The on-prem model: answers {"onprem": true, ...}; /ping is its health check; /slow waits 1 s.
RESPONDER = r'''
import json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self):
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        if self.path.startswith("/slow"):
            time.sleep(1.0)
        body = json.dumps({"onprem": True, "path": self.path}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass

ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Handler).serve_forever()
'''


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


class OnPrem:
    """A network namespace with an HTTP server: the model on the user's own infrastructure."""

    def __init__(self, root: Path) -> None:
        self.name = f"mfop{os.getpid()}"
        self.veth = f"mfopv{os.getpid()}"[:15]
        self.script = root / "onprem.py"
        self.script.write_text(RESPONDER)
        self.log = root / "onprem.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.cleanup()  # leftovers of an earlier run with the same pid
        base = netns_hosts.pick_subnet_base(1, first=200, last=230)
        self.root_address, self.address = f"{base}.0.1", f"{base}.0.2"
        _ip("netns", "add", self.name)
        _ip("link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.name)
        _ip("addr", "add", f"{self.root_address}/24", "dev", self.veth)
        _ip("link", "set", self.veth, "up")
        _ip("-n", self.name, "addr", "add", f"{self.address}/24", "dev", "eth0")
        _ip("-n", self.name, "link", "set", "eth0", "up")
        _ip("-n", self.name, "link", "set", "lo", "up")

    @property
    def url(self) -> str:
        return f"http://{self.address}:{PORT}"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(["ip", "netns", "exec", self.name, sys.executable, str(self.script),
                                             str(PORT)], stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/ping", timeout=1, trust_env=False).status_code == 200:
                    return
            time.sleep(0.05)
        raise AssertionError(f"the on-prem responder did not start: {self.log.read_text()}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)  # `ip netns exec` execs: this is the server
            self.process.wait(10)
        self.process = None

    def cleanup(self) -> None:
        self.kill()
        _ip("link", "del", self.veth, check=False)
        _ip("netns", "del", self.name, check=False)


@pytest.fixture
def onprem(tmp_path: Path) -> Iterator[OnPrem]:
    reason = netns_hosts.check_prerequisites()
    if reason:
        pytest.skip(f"needs network namespaces: {reason}")
    server = OnPrem(tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


def _running(fleet: Fleet, model: str) -> list[dict[str, Any]]:
    return [c for c in fleet.containers() if c["labels"].get("modelfleet.model") == model and c["state"] == "running"]


def _overflow(fleet: Fleet) -> dict[str, Any]:
    routes = httpx.get(f"http://127.0.0.1:{fleet.gateway_port}/routes", timeout=2, trust_env=False).json()
    return dict(routes["overflow"].get("ov/development") or {})


def _where(response: httpx.Response) -> str:
    """"onprem", "pool" or the failure."""
    if response.status_code != 200:
        return f"{response.status_code}: {response.text[:200]}"
    data = response.json()
    return "onprem" if data.get("onprem") else "pool" if "version" in data else f"?{data}"


def test_overflow_to_the_pool_when_the_endpoint_dies_and_back(tmp_path: Path, clean_hosts: list[TestHost],
                                                              onprem: OnPrem) -> None:
    fleet = make_fleet(tmp_path, clean_hosts)
    model = echo_model("ov", replicas=0, environment="development")
    deployment = model["spec"]["deployments"][0]
    del deployment["replicas"]
    deployment["serverless"] = {"minReplicas": 0, "maxReplicas": 2, "scaleToZeroGrace": "60s",
                                "activationTimeout": "30s"}
    deployment["overflow"] = {
        "endpoint": onprem.url, "maxConcurrency": 2,
        "healthCheck": {"path": "/ping", "period": "300ms", "timeout": "500ms", "failureThreshold": 2},
        "outlierDetection": {"consecutiveFailures": 2, "ejectionTime": "2s"},
    }
    fleet.push({**BASE_MANIFESTS, "models/ov.yaml": model})
    fleet.start()
    try:
        fleet.wait(lambda: fleet.deployment("ov", "development").get("reason") == "ScaledToZero", 60, "standby")
        fleet.wait(fleet.routed, 10, "gateway follows the table")
        fleet.wait(lambda: _overflow(fleet).get("available"), 10, "the endpoint known to the gateway")

        # 1. Traffic goes to the endpoint; the pool stays at zero.
        with httpx.Client(trust_env=False, timeout=10) as client:
            first = Counter(_where(fleet.call("ov", "/infer", environment="development", client=client))
                            for _ in range(20))
        assert first == {"onprem": 20}, first
        assert not _running(fleet, "ov")
        status = fleet.wait(lambda: (d := fleet.deployment("ov", "development")).get("overflow") and d, 10,
                            "the status says where traffic goes")
        assert status["overflow"]["endpointHealthy"] is True, status
        assert "traffic goes to the overflow endpoint" in status["message"], status

        # 2. The endpoint dies mid-load: every request is still answered, by the pool (from zero).
        results: Counter[str] = Counter()
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(trust_env=False, timeout=40) as client:
                while not stop.is_set():
                    results[_where(fleet.call("ov", "/infer", environment="development", client=client))] += 1
                    time.sleep(0.02)

        workers = [threading.Thread(target=load, daemon=True) for _ in range(2)]  # within maxConcurrency
        for worker in workers:
            worker.start()
        time.sleep(1.0)
        before = dict(results)
        onprem.kill()
        fleet.wait(lambda: results["pool"] >= 20, 40, "the pool takes the traffic")
        stop.set()
        for worker in workers:
            worker.join(45)
        assert set(results) == {"onprem", "pool"}, (results, fleet.log())
        assert before.get("onprem", 0) > 0 and "pool" not in before, before
        assert _running(fleet, "ov"), "the pool activated"
        view = _overflow(fleet)
        assert not view["available"] and view["toPool"] >= 20, view
        assert view["routing"].startswith("pool:"), view
        fleet.wait(lambda: fleet.deployment("ov", "development").get("overflow", {}).get("endpointHealthy") is False,
                   10, "the status says the endpoint is unhealthy")

        # 3. Back: the traffic returns to the endpoint.
        onprem.start()
        fleet.wait(lambda: _overflow(fleet).get("available"), 15, "the endpoint healthy again")
        with httpx.Client(trust_env=False, timeout=10) as client:
            back = Counter(_where(fleet.call("ov", "/infer", environment="development", client=client))
                           for _ in range(10))
        assert back == {"onprem": 10}, back

        # 4. A burst above maxConcurrency (2) spills to the pool.
        with ThreadPoolExecutor(6) as pool:
            burst = Counter(pool.map(lambda _: _where(fleet.call("ov", "/slow", environment="development")),
                                     range(6)))
        assert burst == {"onprem": 2, "pool": 4}, burst
        assert _overflow(fleet)["toPoolBy"].get("maxConcurrency") == 4
    finally:
        fleet.stop()
        fleet.kill_gateway()
