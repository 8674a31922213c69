"""Serverless on the real pool: a deployment at zero wakes on its first request (held by the
gateway, started by the daemon), scales up under load with no failed request, returns to zero
when idle, and the hold's limits (queue, activationTimeout) answer 503 with Retry-After."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from netns_hosts import TestHost

from tests.integration.fleet import BASE_MANIFESTS, Fleet, echo_model, make_fleet

SERVERLESS = {"minReplicas": 0, "maxReplicas": 3, "metric": "rps", "target": 4, "scaleToZeroGrace": "4s",
              "scaleDownDelay": "2s", "stableWindow": "6s", "panicWindow": "2s", "activationTimeout": "4s",
              "queue": 2}


def _running(fleet: Fleet, model: str) -> list[dict[str, Any]]:
    return [c for c in fleet.containers() if c["labels"].get("modelfleet.model") == model and c["state"] == "running"]


def _of(fleet: Fleet, model: str) -> list[dict[str, Any]]:
    return [c for c in fleet.containers() if c["labels"].get("modelfleet.model") == model]


def test_scale_from_zero_up_and_back_to_zero(tmp_path: Path, clean_hosts: list[TestHost]) -> None:
    fleet = make_fleet(tmp_path, clean_hosts)
    model = echo_model("sl", replicas=0, environment="development")
    deployment = model["spec"]["deployments"][0]
    del deployment["replicas"]
    deployment["serverless"] = SERVERLESS
    fleet.push({**BASE_MANIFESTS, "models/sl.yaml": model})
    fleet.start()
    try:
        # At zero: one stopped standby, nothing running, the status says so.
        fleet.wait(lambda: fleet.deployment("sl", "development").get("reason") == "ScaledToZero", 60, "standby")
        assert len(_of(fleet, "sl")) == 1 and not _running(fleet, "sl")
        fleet.wait(fleet.routed, 10, "gateway follows the table")

        # 1. The first request is held, a replica is started for it, and it is answered (not 503).
        started = time.monotonic()
        first = fleet.call("sl", "/infer", environment="development")
        cold = time.monotonic() - started
        assert first.status_code == 200, (first.status_code, first.text, fleet.log())
        assert len(_running(fleet, "sl")) == 1
        assert cold < 4.0, cold  # within activationTimeout (4s), in practice ~1 s

        # 2. A ramp to ~20 requests/s (target 4 rps per replica) scales up within maxReplicas, with
        #    no failed request.
        codes: Counter[int] = Counter()
        peak = 0
        stop = threading.Event()

        def watch() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, len(_running(fleet, "sl")))
                time.sleep(0.3)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        with httpx.Client(trust_env=False, timeout=10) as client, ThreadPoolExecutor(4) as pool:
            def one(_: int) -> int:
                return fleet.call("sl", "/infer", environment="development", client=client).status_code

            deadline = time.monotonic() + 14
            while time.monotonic() < deadline and peak < 3:
                codes.update(pool.map(one, range(5)))
                time.sleep(0.25)
        stop.set()
        watcher.join()
        assert set(codes) == {200}, (codes, fleet.log())
        assert 2 <= peak <= 3, (peak, fleet.deployment("sl", "development"))
        status = fleet.deployment("sl", "development")
        assert status["autoscaler"]["metric"] == "rps", status

        # 3. Idle: back to zero running containers; the replicas stay as stopped standbys.
        fleet.wait(lambda: not _running(fleet, "sl"), 60, "scaled back to zero")
        assert len(_of(fleet, "sl")) >= 1
        fleet.wait(lambda: fleet.deployment("sl", "development").get("reason") == "ScaledToZero", 20, "standby again")
        assert "idle" in fleet.deployment("sl", "development")["message"]

        # 4. With no daemon to activate it (killed: the gateway child lives on), held requests are
        #    answered 503 with Retry-After: past the queue (2) at once, the others after activationTimeout.
        fleet.stop(signal.SIGKILL)
        with ThreadPoolExecutor(3) as pool:
            started = time.monotonic()
            responses = list(pool.map(lambda _: fleet.call("sl", "/infer", environment="development"), range(3)))
            waited = time.monotonic() - started
        by_code = Counter(r.status_code for r in responses)
        assert by_code == {503: 3}, [(r.status_code, r.text) for r in responses]
        errors = sorted(r.json()["type"] for r in responses)
        assert errors == ["ActivationQueueFull", "ActivationTimeout", "ActivationTimeout"], errors
        assert all(r.headers.get("retry-after") for r in responses)
        assert 3.5 <= waited < 10, waited

        # 5. A new daemon takes over: the next request is served again.
        fleet.start()
        again = fleet.call("sl", "/infer", environment="development")
        assert again.status_code == 200, (again.status_code, again.text, fleet.log())

        # 6. The gateway killed while it holds a request: the client gets an error at once (never a
        #    hang); the daemon restarts the gateway and the deployment serves again.
        fleet.wait(lambda: not _running(fleet, "sl"), 60, "back to zero before the gateway test")
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(fleet.call, "sl", "/infer", "development")
            time.sleep(0.05)
            fleet.kill_gateway()
            started = time.monotonic()
            cut = held.result(timeout=10)
        assert cut.status_code in (200, 599), (cut.status_code, cut.text)  # served just in time, or cut off
        assert time.monotonic() - started < 6
        served = fleet.wait(lambda: fleet.call("sl", "/infer", environment="development").status_code == 200, 30,
                            "a new gateway serves again")
        assert served
    finally:
        fleet.stop()
        fleet.kill_gateway()


def test_a_concurrency_ramp_scales_up_without_failures_and_back_to_zero(tmp_path: Path,
                                                                         clean_hosts: list[TestHost]) -> None:
    """metric: concurrency, target 1 in flight per replica: three clients that each keep a slow
    request (0.4 s) in flight scale the deployment from zero to maxReplicas (3), and no request fails."""
    fleet = make_fleet(tmp_path, clean_hosts)
    model = echo_model("slc", replicas=0, environment="development")
    deployment = model["spec"]["deployments"][0]
    del deployment["replicas"]
    deployment["serverless"] = {**SERVERLESS, "metric": "concurrency", "target": 1, "queue": 20,
                                "activationTimeout": "20s"}
    fleet.push({**BASE_MANIFESTS, "models/slc.yaml": model})
    fleet.start()
    try:
        fleet.wait(lambda: fleet.deployment("slc", "development").get("reason") == "ScaledToZero", 60, "standby")
        fleet.wait(fleet.routed, 10, "gateway follows the table")
        url = f"http://127.0.0.1:{fleet.gateway_port}/models/slc/infer?environment=development&sleep=0.4"
        codes: Counter[int] = Counter()
        peak = 0
        stop = threading.Event()

        def client_loop() -> None:
            with httpx.Client(trust_env=False, timeout=30) as client:
                while not stop.is_set():
                    try:
                        codes[client.get(url).status_code] += 1
                    except httpx.HTTPError as exc:
                        codes[599] += 1
                        print("request failed:", exc)

        clients = [threading.Thread(target=client_loop, daemon=True) for _ in range(3)]
        for thread in clients:
            thread.start()
        deadline = time.monotonic() + 40
        try:
            while time.monotonic() < deadline and peak < 3:
                peak = max(peak, len(_running(fleet, "slc")))
                time.sleep(0.3)
            time.sleep(1)  # requests in flight while the last replica joins
        finally:
            stop.set()
            for thread in clients:
                thread.join(timeout=30)
        assert set(codes) == {200}, (codes, fleet.log())
        assert peak == 3, (peak, fleet.deployment("slc", "development"))
        status = fleet.deployment("slc", "development")
        assert status["autoscaler"]["metric"] == "concurrency", status
        # Idle: back to zero running containers, the replicas kept as stopped standbys.
        fleet.wait(lambda: not _running(fleet, "slc"), 60, "scaled back to zero")
        assert len(_of(fleet, "slc")) >= 1
    finally:
        fleet.stop()
        fleet.kill_gateway()


def test_the_daemon_killed_mid_activation_converges_and_the_held_requests_are_answered(
        tmp_path: Path, clean_hosts: list[TestHost]) -> None:
    """The daemon dies after it started the standby for held requests and before the replica is
    ready (READY_DELAY: ready 2 s after its start): the gateway keeps holding them, the next daemon
    finds the replica running, probes and routes it, and the held requests are served; nothing is
    left behind but the one replica."""
    fleet = make_fleet(tmp_path, clean_hosts)
    model = echo_model("mid", replicas=0, environment="development", env={"READY_DELAY": "2"})
    deployment = model["spec"]["deployments"][0]
    del deployment["replicas"]
    deployment["serverless"] = {**SERVERLESS, "maxReplicas": 1, "activationTimeout": "30s", "queue": 4,
                                "scaleToZeroGrace": "60s"}
    fleet.push({**BASE_MANIFESTS, "models/mid.yaml": model})
    fleet.start()
    try:
        fleet.wait(lambda: fleet.deployment("mid", "development").get("reason") == "ScaledToZero", 60, "standby")
        fleet.wait(fleet.routed, 10, "gateway follows the table")
        with httpx.Client(trust_env=False, timeout=40) as client, ThreadPoolExecutor(2) as pool:
            held = [pool.submit(fleet.call, "mid", "/infer", "development", client) for _ in range(2)]
            fleet.wait(lambda: _running(fleet, "mid"), 15, "the standby started for the held requests")
            assert not any(h.done() for h in held)  # not ready yet: still held
            fleet.stop(signal.SIGKILL)
            fleet.start()
            answers = [h.result(timeout=40) for h in held]
        assert [a.status_code for a in answers] == [200, 200], ([(a.status_code, a.text) for a in answers],
                                                                 fleet.log())
        mine = _of(fleet, "mid")
        assert len(mine) == 1 and mine[0]["state"] == "running", mine
        fleet.wait(lambda: fleet.deployment("mid", "development").get("state") == "success", 20, "converged")
    finally:
        fleet.stop()
        fleet.kill_gateway()
