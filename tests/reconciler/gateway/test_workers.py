"""`gateway.workers`: several processes on one port (SO_REUSEPORT), metrics summed over them,
a dead worker started again, all of them stopped by one SIGTERM."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from modelfleet.reconciler.gateway.routes import RouteStore
from tests.http_server import bound_socket
from tests.reconciler.gateway.harness import route, wait_for
from tests.reconciler.test_metrics_promtool import check_metrics

pytestmark = pytest.mark.timeout(90)


def free_port() -> int:
    sock = bound_socket()
    try:
        return int(sock.getsockname()[1])
    finally:
        sock.close()


@contextlib.contextmanager
def gateway_process(tmp_path: Path, workers: int) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    config = tmp_path / "modelfleet.yaml"
    config.write_text(yaml.safe_dump({"stateDir": str(tmp_path / "state"),
                                      "api": {"listen": f"127.0.0.1:{free_port()}"},
                                      "gateway": {"listen": f"127.0.0.1:{port}", "workers": workers}}))
    log = open(tmp_path / "gateway.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen([sys.executable, "-m", "modelfleet.reconciler.cli", "gateway", "--config", str(config)],
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process, f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log.close()


def children(pid: int) -> set[int]:
    found = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(pid):
                    found.add(int(entry.name))
    return found


def healthy_pid(url: str) -> int | None:
    try:  # a new connection each time: the kernel picks the worker
        with httpx.Client(trust_env=False, timeout=2) as client:
            return int(client.get(f"{url}/healthz").json()["pid"])
    except (httpx.HTTPError, ValueError, KeyError):
        return None


def test_two_workers_share_the_port_and_their_metrics(tmp_path: Path, backends: Any) -> None:
    _, a = backends("a")
    store = RouteStore(tmp_path / "state")
    store.publish({"m/production": (route(a),)})
    with gateway_process(tmp_path, 2) as (process, url):
        wait_for(lambda: len(children(process.pid)) == 2, "two workers", timeout=20)
        workers = children(process.pid)
        seen: set[int] = set()

        def both_answered() -> bool:
            seen.add(healthy_pid(url) or 0)
            return workers <= seen

        wait_for(both_answered, "both workers answering", timeout=30)
        for _ in range(40):
            with httpx.Client(trust_env=False, timeout=5) as client:
                assert client.post(f"{url}/models/m/predict").status_code == 200

        def total() -> float:
            text = httpx.get(f"{url}/metrics", timeout=5).text
            match = re.search(r'modelfleet_gateway_requests_total\{code="200",environment="production",model="m"\} '
                              r'([0-9.]+)', text)
            return float(match.group(1)) if match else 0.0

        # Each worker hands its request counts over every 0.5 s (GatewayMetrics.sync): within that,
        # whichever worker answers /metrics shows the sum over both.
        wait_for(lambda: total() == 40.0, "the sum over both workers", timeout=5)
        time.sleep(0.6)
        for _ in range(6):
            assert total() == 40.0
        check_metrics(httpx.get(f"{url}/metrics", timeout=5).text)  # the combined exposition is valid too

        # A worker that dies is started again; SIGTERM to the supervisor stops them all.
        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(children(process.pid)) == 2 and victim not in children(process.pid),
                 "the worker started again", timeout=20)
        wait_for(lambda: healthy_pid(url) is not None, "serving", timeout=20)
        survivors = children(process.pid)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=40) == 0
        for pid in survivors:  # reaped by the supervisor before it exits
            assert not Path(f"/proc/{pid}").exists()
    store.close()


def test_a_port_in_use_fails_before_any_worker_starts(tmp_path: Path) -> None:
    taken = bound_socket()
    taken.listen(1)
    try:
        config = tmp_path / "modelfleet.yaml"
        config.write_text(yaml.safe_dump({"stateDir": str(tmp_path / "state"),
                                          "gateway": {"listen": f"127.0.0.1:{taken.getsockname()[1]}", "workers": 3}}))
        result = subprocess.run([sys.executable, "-m", "modelfleet.reconciler.cli", "gateway", "--config", str(config)],
                                capture_output=True, text=True, timeout=30, check=False)
    finally:
        taken.close()
    assert result.returncode == 3 and "cannot listen on" in result.stderr, result.stderr
