"""End-to-end benchmark of the daemon on three real Docker hosts (netns dockerd), on demand, as root:

    .venv/bin/python benchmarks/bench_daemon.py                  # everything (~5-10 min)
    .venv/bin/python benchmarks/bench_daemon.py --deployments 300 --rounds 5 --passes 10
    .venv/bin/python benchmarks/bench_daemon.py --only scale --profile

It starts its own hosts (dev/netns_hosts.py, prefix ``mfbd``, a free 10.N subnet), imports the
busybox and echo test images, runs ``modelfleet run`` as a real process on a local bare repository,
and measures, each figure next to its target and a baseline measured in the same run:

1. trigger latency: commit pushed → pass started (``started_at`` of the first pass at that commit
   in ``/api/v1/history``), for the ref watcher (``repo.watch: true``, hourly poll) and for the
   webhook (watch off, ``POST /webhook`` signed like GitHub). Target <= 1 s.
   Baselines: a raw watchfiles watcher on the same refs (the floor of any watcher), and the round
   trip of the webhook POST itself.
2. rollout latency: commit pushed (a VERSION change of a 1-replica echo deployment) → the gateway
   answers with the new VERSION. Target p50 <= 5 s. Baseline: docker-py create+start of the same
   container on the same host → first 200 on /ping (the floor of any rollout).
3. no-op pass with N (default 1,000) deployments over 3 hosts, in-process ``Daemon.reconcile()``
   (``status.last_pass['seconds']``), interleaved with the baseline: one label-filtered container
   list per host, the 3 hosts in parallel (what the daemon's observe does). Target <= 1.5x.
   The deployments are serverless standbys (created, never started: no containerd shims).
4. RSS of the ``modelfleet run`` process converged on the N deployments. Target <= 150 MB.
   Baselines: the same daemon with one deployment, and a bare interpreter that imports it.
   The gateway child's RSS is shown separately.

Everything is bounded in time (``--timeout`` for the whole run), talks only to loopback and to its
own netns hosts, and cleans up (daemons, gateway, hosts with their containers, temp dirs) in a
``finally``, also on Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import hashlib
import hmac
import io
import json
import os
import pstats
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "dev"))

import docker  # noqa: E402
import httpx  # noqa: E402
import netns_hosts  # noqa: E402
import yaml  # noqa: E402

PREFIX = "mfbd"
HOST_COUNT = 3
API = "modelfleet.dev/v1alpha1"
ECHO = "modelfleet/echo:latest"
MANAGED = "modelfleet.managed=true"
BENCH_LABEL = "modelfleet.bench"  # the baseline's own containers: never managed, never touched by the daemon
GIT_ENV = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost", "GIT_COMMITTER_NAME": "bench",
           "GIT_COMMITTER_EMAIL": "bench@localhost", "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0"}
WEBHOOK_SECRET = "bench-secret"
MODELS_PER_FILE = 100

TARGET_TRIGGER = 1.0  # s, commit pushed -> pass started
TARGET_ROLLOUT = 5.0  # s, p50 push -> new version served
TARGET_NOOP_RATIO = 1.5  # no-op pass / parallel label-filtered list
TARGET_RSS_MB = 150.0


class Abort(BaseException):
    """Ctrl-C, SIGTERM or the global timeout: unwind to the cleanup."""


# --- small helpers ------------------------------------------------------------------------------


def say(text: str = "") -> None:
    print(text, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def git(cwd: Path, *args: str, timeout: float = 60) -> str:
    env = {**os.environ, **GIT_ENV}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True,
                          timeout=timeout).stdout.strip()


def p50(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM = peak RSS) of a process, in MB (10^6 bytes)."""
    values = {"VmRSS": 0.0, "VmHWM": 0.0}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in values:
                values[key] = int(rest.split()[0]) * 1024 / 1e6
    return values["VmRSS"], values["VmHWM"]


@dataclass
class Figure:
    name: str
    value: str
    target: str
    baseline: str
    ok: bool | None  # None: information only


FIGURES: list[Figure] = []


def record(name: str, value: str, target: str, baseline: str, ok: bool | None) -> None:
    FIGURES.append(Figure(name, value, target, baseline, ok))
    verdict = "" if ok is None else ("  PASS" if ok else "  MISS")
    say(f"  => {name}: {value}   (target {target}; baseline {baseline}){verdict}")


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (httpx.HTTPError, OSError, ValueError, KeyError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r:.300})")


# --- manifests ----------------------------------------------------------------------------------


def environments() -> list[dict[str, Any]]:
    return [{"apiVersion": API, "kind": "Environment", "metadata": {"name": "production"},
             "spec": {"policies": []}}]


def echo_model(version: str) -> dict[str, Any]:
    deployment = {
        "environment": "production", "replicas": 1,
        "runtime": {"type": "custom", "image": ECHO, "port": 8080, "env": {"VERSION": version},
                    "resources": {"cpus": 0.1, "memory": "32Mi"},
                    "readinessProbe": {"path": "/ping", "period": "100ms", "timeout": "1s"}},
    }
    return {"apiVersion": API, "kind": "Model", "metadata": {"name": "echo"}, "spec": {"deployments": [deployment]}}


def standby_model(index: int) -> dict[str, Any]:
    deployment = {
        "environment": "production", "serverless": {"minReplicas": 0, "maxReplicas": 1},
        "runtime": {"type": "custom", "image": ECHO, "port": 8080, "env": {"VERSION": f"s{index}"},
                    "resources": {"cpus": 0.01, "memory": "8Mi"},
                    "readinessProbe": {"path": "/ping", "period": "100ms", "timeout": "1s"}},
    }
    return {"apiVersion": API, "kind": "Model", "metadata": {"name": f"m{index:05d}"},
            "spec": {"deployments": [deployment]}}


def standby_files(count: int) -> dict[str, str]:
    files = {}
    for start in range(0, count, MODELS_PER_FILE):
        docs = [standby_model(i) for i in range(start, min(count, start + MODELS_PER_FILE))]
        files[f"models/standby-{start // MODELS_PER_FILE:03d}.yaml"] = yaml.safe_dump_all(docs, sort_keys=False)
    return files


# --- a fleet: bare repo, working clone, config, `modelfleet run` ---------------------------------


@dataclass
class Fleet:
    root: Path
    hosts: list[netns_hosts.TestHost]
    repo: dict[str, Any] = field(default_factory=dict)
    docker_timeout: str = "30s"
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True)
        self.origin, self.work, self.state_dir = self.root / "origin.git", self.root / "work", self.root / "state"
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(self.origin)], check=True, timeout=30)
        git(self.root, "clone", "-q", str(self.origin), str(self.work))
        self.api_port, self.gateway_port = free_port(), free_port()
        pool = [{"name": f"h{i}", "url": host.docker_url,
                 "location": {"name": f"site-{i}", "country": "FR", "continent": "EU"},
                 "flavors": [{"name": "intel-sapphire-rapids", "type": "cpu"}],
                 "capacity": {"cpus": 64, "memory": "64Gi"}} for i, host in enumerate(self.hosts)]
        config = {
            "repo": {"url": str(self.origin), "branch": "main", "pollInterval": "1h", "watch": True, **self.repo},
            "stateDir": str(self.state_dir),
            "pool": {"hosts": pool},
            "gateway": {"listen": f"127.0.0.1:{self.gateway_port}"},
            "api": {"listen": f"127.0.0.1:{self.api_port}"},
            "status": {"provider": "git-notes"},
            "rollout": {"healthyDeadline": "30s"},
            "docker": {"timeout": self.docker_timeout},
        }
        self.config_path = self.root / "modelfleet.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = self.root / "daemon.log"
        self.http = httpx.Client(trust_env=False, timeout=10)

    # git
    def push(self, files: dict[str, Any], message: str) -> tuple[str, float, float]:
        """Commit and push; returns (commit, wall time before `git push`, wall time after it returned)."""
        for path, content in files.items():
            target = self.work / path
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, str):
                target.write_text(content)
            else:
                docs = content if isinstance(content, list) else [content]
                target.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        git(self.work, "add", "-A")
        git(self.work, "commit", "-q", "--allow-empty", "-m", message)
        sha = git(self.work, "rev-parse", "HEAD")
        before = time.time()
        git(self.work, "push", "-q", "origin", "main")
        return sha, before, time.time()

    # daemon
    def start(self, timeout: float = 60) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "modelfleet.reconciler.cli", "run", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT)
        wait_until(lambda: self.alive() and self.api("/readyz").status_code == 200, timeout, "daemon ready")

    def alive(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError(f"modelfleet run exited; log tail:\n{self.log_tail()}")
        return True

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def gateway_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.state_dir / "gateway.pid").read_text().strip())
        return None

    def stop(self) -> None:
        """Stop the daemon (it terminates its gateway child), then make sure the gateway is gone too."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None
        pid = self.gateway_pid()
        if pid is not None and _is_our_gateway(pid, self.config_path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.http.close()

    # HTTP
    def api(self, path: str, method: str = "GET", **kwargs: Any) -> httpx.Response:
        return self.http.request(method, f"http://127.0.0.1:{self.api_port}{path}", **kwargs)

    def passes(self) -> list[dict[str, Any]]:
        return list(self.api("/api/v1/history").json()["passes"])

    def deployments(self) -> list[dict[str, Any]]:
        return list(self.api("/api/v1/status").json().get("deployments", []))

    def pass_at(self, sha: str, since: float, trigger: str | None = None) -> dict[str, Any] | None:
        """The first finished pass that started at/after ``since`` and converged on ``sha``."""
        found = [p for p in self.passes() if p["finished_at"] and p["revision"] == sha and p["started_at"] >= since
                 and (trigger is None or p["trigger"] == trigger)]
        return min(found, key=lambda p: p["id"]) if found else None

    def wait_idle(self, quiet: float = 0.3, timeout: float = 120, interval: float = 0.05) -> None:
        """No pass running and none started for ``quiet`` seconds."""
        def idle() -> bool:
            self.alive()
            latest = self.passes()
            if not latest:
                return False
            last = latest[0]
            return bool(last["finished_at"]) and time.time() - last["finished_at"] >= quiet
        wait_until(idle, timeout, "daemon idle", interval=interval)

    def call_version(self, client: httpx.Client) -> str | None:
        try:
            response = client.get(f"http://127.0.0.1:{self.gateway_port}/models/echo/", timeout=2)
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        try:
            return str(response.json().get("version"))
        except ValueError:
            return None


def _is_our_gateway(pid: int, config_path: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return "gateway" in cmdline and str(config_path) in cmdline


def remove_managed(clients: Sequence[docker.DockerClient]) -> None:
    for client in clients:
        for c in client.api.containers(all=True, filters={"label": MANAGED}):
            with contextlib.suppress(docker.errors.NotFound):
                client.api.remove_container(c["Id"], force=True)


def parallel_list(clients: Sequence[docker.DockerClient]) -> tuple[float, int]:
    """The baseline of a no-op pass: one label-filtered list per host, the hosts in parallel, as the
    daemon's observe does (a fresh 3-thread pool per call, like observe)."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(clients)) as pool:
        lists = list(pool.map(lambda c: c.api.containers(all=True, filters={"label": MANAGED}), clients))
    return time.perf_counter() - started, sum(len(x) for x in lists)


# --- 1. trigger latency -------------------------------------------------------------------------


class RefWatcher:
    """Baseline: a bare watchfiles watcher on the origin's refs (no debounce to speak of)."""

    def __init__(self, path: Path) -> None:
        from watchfiles import watch

        self.events: list[float] = []
        self.stop = threading.Event()
        self.ready = threading.Event()

        def loop() -> None:
            self.ready.set()
            for _ in watch(path, stop_event=self.stop, debounce=1, step=1, rust_timeout=200,
                           yield_on_timeout=False, raise_interrupt=False):
                self.events.append(time.time())

        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()
        self.ready.wait(5)
        time.sleep(0.3)  # the inotify watches are in place

    def first_after(self, since: float, timeout: float = 5) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hits = [t for t in self.events if t >= since]
            if hits:
                return min(hits)
            time.sleep(0.01)
        return None

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=3)


def bench_watch_trigger(fleet: Fleet, rounds: int) -> None:
    say(f"\n[1a] ref watcher: push -> pass started, {rounds} pushes (watch on, poll 1h)")
    watcher = RefWatcher(fleet.origin / "refs" / "heads")
    latencies, floors, pushes = [], [], []
    try:
        for i in range(rounds):
            fleet.wait_idle()
            sha, before, after = fleet.push({"bench/trigger.txt": f"watch {i}\n"}, f"watch trigger {i}")
            found = wait_until(functools.partial(fleet.pass_at, sha, before, "watch"), 15,
                               f"watch pass at {sha[:7]}")
            latencies.append(found["started_at"] - after)
            pushes.append(after - before)
            seen = watcher.first_after(before)
            if seen is not None:
                floors.append(seen - after)
            say(f"  push {i + 1:2d}: pass started {ms(latencies[-1]):>7} after the push returned"
                f" (git push took {ms(pushes[-1])}; raw watcher {ms(floors[-1]) if seen else '-'})")
    finally:
        watcher.close()
    record("1a watch: push -> pass started", f"p50 {ms(p50(latencies))}, max {ms(max(latencies))}",
           "<= 1000 ms", f"raw watchfiles event p50 {ms(p50(floors))}; git push itself p50 {ms(p50(pushes))}",
           max(latencies) <= TARGET_TRIGGER)


def bench_webhook_trigger(fleet: Fleet, rounds: int) -> None:
    say(f"\n[1b] webhook: push -> pass started, {rounds} pushes (watch off, poll 1h)")
    latencies, posts = [], []
    for i in range(rounds):
        fleet.wait_idle()
        sha, before, after = fleet.push({"bench/trigger.txt": f"webhook {i}\n"}, f"webhook trigger {i}")
        body = json.dumps({"ref": "refs/heads/main", "after": sha}).encode()
        signature = "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
        sent = time.time()
        response = fleet.api("/webhook", method="POST", content=body,
                             headers={"X-Hub-Signature-256": signature, "Content-Type": "application/json",
                                      "X-GitHub-Event": "push"})
        answered = time.time()
        if response.status_code != 202:
            raise RuntimeError(f"webhook answered {response.status_code}: {response.text[:300]}")
        found = wait_until(functools.partial(fleet.pass_at, sha, before, "webhook"), 15,
                           f"webhook pass at {sha[:7]}")
        latencies.append(found["started_at"] - after)
        posts.append(answered - sent)
        say(f"  push {i + 1:2d}: pass started {ms(latencies[-1]):>7} after the push returned"
            f" (webhook POST round trip {ms(posts[-1])})")
    record("1b webhook: push -> pass started", f"p50 {ms(p50(latencies))}, max {ms(max(latencies))}",
           "<= 1000 ms", f"webhook POST round trip p50 {ms(p50(posts))}", max(latencies) <= TARGET_TRIGGER)


# --- 2. rollout latency -------------------------------------------------------------------------


def direct_start_baseline(host: netns_hosts.TestHost, rounds: int) -> list[float]:
    """docker-py create+start of the echo container → first 200 on /ping, on the same host."""
    client = host.client(timeout=30)
    times = []
    try:
        with httpx.Client(trust_env=False) as http:
            for i in range(rounds):
                started = time.perf_counter()
                host_config = client.api.create_host_config(
                    port_bindings={8080: ("0.0.0.0", None)}, nano_cpus=int(0.1 * 1e9), mem_limit=32 * 2**20,
                    init=True, cap_drop=["ALL"], security_opt=["no-new-privileges"])
                created = client.api.create_container(ECHO, name=f"bench-direct-{i}", environment={"VERSION": "d"},
                                                      labels={BENCH_LABEL: "direct"}, ports=[8080],
                                                      host_config=host_config, detach=True)
                try:
                    client.api.start(created["Id"])
                    port = int(client.api.inspect_container(created["Id"])["NetworkSettings"]["Ports"]
                               ["8080/tcp"][0]["HostPort"])

                    def up(port: int = port) -> bool:
                        try:
                            return http.get(host.url(port, "/ping"), timeout=1).status_code == 200
                        except httpx.HTTPError:
                            return False
                    wait_until(up, 15, "direct echo container", interval=0.01)
                    times.append(time.perf_counter() - started)
                finally:
                    client.api.remove_container(created["Id"], force=True)
    finally:
        client.close()
    return times


def bench_rollout(fleet: Fleet, rounds: int, floor: list[float]) -> None:
    say(f"\n[2] rollout: push VERSION change -> gateway answers the new version, {rounds} rounds")
    latencies, triggers, passes = [], [], []
    with httpx.Client(trust_env=False) as client:
        for i in range(rounds):
            fleet.wait_idle()
            version = f"r{i + 2}"
            sha, before, after = fleet.push({"models/echo.yaml": echo_model(version)}, f"echo {version}")

            def served(version: str = version) -> bool:
                fleet.alive()
                return fleet.call_version(client) == version
            wait_until(served, 30, f"version {version} through the gateway", interval=0.01)
            latencies.append(time.time() - after)
            found = wait_until(functools.partial(fleet.pass_at, sha, before), 30, f"pass at {sha[:7]}")
            triggers.append(found["started_at"] - after)
            passes.append(found["finished_at"] - found["started_at"])
            say(f"  round {i + 1:2d}: {version} served {ms(latencies[-1]):>7} after the push"
                f" (pass started +{ms(triggers[-1])}, pass took {ms(passes[-1])} incl. removing the old replica)")
    record("2 push -> new version served via gateway", f"p50 {ms(p50(latencies))}, max {ms(max(latencies))}",
           "p50 <= 5000 ms", f"direct create+start -> first 200 p50 {ms(p50(floor))}",
           p50(latencies) <= TARGET_ROLLOUT)


# --- 3 + 4. 1,000 deployments --------------------------------------------------------------------


def converge_standbys(fleet: Fleet, count: int, clients: Sequence[docker.DockerClient], timeout: float) -> float:
    say(f"\n[3/4] {count} serverless standby deployments: the daemon creates their containers (not started)")
    sha, _, _ = fleet.push({"environments.yaml": environments(), **standby_files(count)}, f"{count} standbys")
    fleet.start(timeout=120)
    started = time.monotonic()
    last_print = 0.0
    while True:
        fleet.alive()
        elapsed = time.monotonic() - started
        if elapsed > timeout:
            raise TimeoutError(f"{count} standbys not created within {timeout:g}s")
        _, created = parallel_list(clients)
        if time.monotonic() - last_print >= 5 or created >= count:
            say(f"  {elapsed:6.1f}s: {created:5d}/{count} containers created")
            last_print = time.monotonic()
        if created >= count:
            break
        time.sleep(1.0)

    # Converged: a later pass at this commit with nothing to do, every deployment successful.
    def converged() -> bool:
        fleet.alive()
        latest = [p for p in fleet.passes() if p["finished_at"] and p["revision"] == sha]
        if not latest or (latest[0]["summary"] or {}).get("actions") != 0:
            fleet.api("/api/v1/sync", method="POST")
            return False
        deployments = fleet.deployments()
        return len(deployments) == count and all(d["state"] == "success" for d in deployments)
    wait_until(converged, timeout, "convergence on the standbys", interval=1.0)
    took = time.monotonic() - started
    say(f"  converged in {took:.1f}s (first pass with {count} creates, parallelism 8)")
    return took


def bench_rss(fleet: Fleet, count: int, small: tuple[float, float] | None, floor: float) -> None:
    fleet.wait_idle(quiet=1.0)
    assert fleet.process is not None
    rss, peak = rss_mb(fleet.process.pid)
    gateway = fleet.gateway_pid()
    gw_rss, gw_peak = rss_mb(gateway) if gateway else (float("nan"), float("nan"))
    small_text = f"{small[0]:.1f} MB with 1 deployment (peak {small[1]:.1f})" if small else "n/a"
    record(f"4 daemon RSS, {count} deployments", f"{rss:.1f} MB (peak {peak:.1f} MB)", "<= 150 MB",
           f"{small_text}; bare import of the daemon {floor:.1f} MB", rss <= TARGET_RSS_MB)
    record(f"4 gateway child RSS, {count} deployments", f"{gw_rss:.1f} MB (peak {gw_peak:.1f} MB)",
           "info", "-", None)


def bench_api_noop(fleet: Fleet, rounds: int = 5) -> None:
    """No-op passes inside the real `modelfleet run` process, triggered by POST /api/v1/sync (info).
    Polled gently (4/s): the API shares the daemon's GIL, fast polling would slow the pass down."""
    seconds = []
    for _ in range(rounds):
        fleet.wait_idle(quiet=0.2, interval=0.25)
        last = fleet.passes()[0]["id"]
        fleet.api("/api/v1/sync", method="POST")

        def finished(last: int = last) -> list[dict[str, Any]]:
            return [p for p in fleet.passes() if p["id"] > last and p["finished_at"]]
        done = wait_until(finished, 60, "API-triggered pass", interval=0.25)
        summary = done[-1]["summary"] or {}
        if summary.get("actions"):
            raise RuntimeError(f"the API-triggered pass was not a no-op: {summary}")
        seconds.append(float(summary["seconds"]))
    record("3 no-op pass in `modelfleet run` (POST /api/v1/sync)", f"p50 {ms(p50(seconds))}, max {ms(max(seconds))}",
           "info", "see the in-process figure", None)


def bench_noop_inprocess(config_path: Path, clients: Sequence[docker.DockerClient], count: int, passes: int,
                         profile: bool) -> None:
    from modelfleet.reconciler.config import load_config
    from modelfleet.reconciler.daemon.reconcile import Daemon
    from modelfleet.reconciler.daemon.service import make_status_writer

    config = load_config(config_path)
    daemon = Daemon(config)
    daemon.status_writer = make_status_writer(config, daemon)
    try:
        first = daemon.reconcile("bench-warmup").last_pass
        if first.get("actions") or first.get("result") != "ok":
            raise RuntimeError(f"the warm-up pass was not a clean no-op: {first}")
        say(f"  in-process warm-up pass (loads the {count} manifests): {ms(first['seconds'])}")
        pass_times, list_times, observe_times = [], [], []
        for _ in range(passes):  # interleaved: both see the same conditions
            seconds, listed = parallel_list(clients)
            list_times.append(seconds)
            if listed != count:
                raise RuntimeError(f"baseline listed {listed} containers, expected {count}")
            last = daemon.reconcile("bench").last_pass
            if last.get("actions") or last.get("result") != "ok":
                raise RuntimeError(f"not a no-op pass: {last}")
            pass_times.append(float(last["seconds"]))
            observe_times.append(float(last["observe_seconds"]))
        ratio = p50(pass_times) / p50(list_times)
        say(f"  observe step inside the pass: p50 {ms(p50(observe_times))}")
        ok = ratio <= TARGET_NOOP_RATIO
        record(f"3 no-op pass, {count} deployments / {len(clients)} hosts (in-process)",
               f"p50 {ms(p50(pass_times))}, max {ms(max(pass_times))}; ratio {ratio:.2f}x",
               f"<= {TARGET_NOOP_RATIO}x the baseline",
               f"parallel label-filtered list p50 {ms(p50(list_times))}, max {ms(max(list_times))}", ok)
        if profile or not ok:
            profile_passes(daemon, 3)
    finally:
        daemon.close()


def profile_passes(daemon: Any, rounds: int) -> None:
    say(f"\n  cProfile of {rounds} no-op passes (top 25 by own time, then by cumulative time):")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(rounds):
        daemon.reconcile("bench-profile")
    profiler.disable()
    for order in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).strip_dirs().sort_stats(order).print_stats(25)
        lines = out.getvalue().splitlines()
        start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
        say("\n".join("    " + line for line in lines[start - 1:] if line.strip()))


def import_floor_rss() -> float:
    code = ("import modelfleet.reconciler.daemon.service, modelfleet.reconciler.cli.main\n"
            "for line in open('/proc/self/status'):\n"
            "    if line.startswith('VmRSS:'): print(int(line.split()[1]) * 1024 / 1e6)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                         check=True)
    return float(out.stdout.strip())


# --- main ---------------------------------------------------------------------------------------


def prepare_images(host: netns_hosts.TestHost) -> None:
    client = host.client(timeout=60)
    try:
        netns_hosts.import_busybox_image(client)
        netns_hosts.build_echo_image(client)
    finally:
        client.close()


@contextlib.contextmanager
def signals_abort(total_timeout: float) -> Iterator[None]:
    def on_signal(signum: int, _frame: object) -> None:
        raise Abort(f"signal {signal.Signals(signum).name}")

    def on_alarm(_signum: int, _frame: object) -> None:
        raise Abort(f"the whole run exceeded --timeout {total_timeout:g}s")

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(total_timeout))
    try:
        yield
    finally:
        signal.alarm(0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deployments", type=int, default=1000, help="standby deployments for 3/4 (1000)")
    parser.add_argument("--rounds", type=int, default=10, help="pushes per latency figure (10)")
    parser.add_argument("--passes", type=int, default=20, help="no-op passes timed in-process (20)")
    parser.add_argument("--only", choices=["trigger", "rollout", "scale"], action="append",
                        help="run only these parts (repeatable); default: all")
    parser.add_argument("--profile", action="store_true", help="cProfile the no-op passes even if on target")
    parser.add_argument("--timeout", type=float, default=2400, help="bound of the whole run, seconds (2400)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir and the dockerd logs after the run")
    args = parser.parse_args(argv)
    parts = set(args.only or ["trigger", "rollout", "scale"])

    if reason := netns_hosts.check_prerequisites():
        say(f"cannot run: {reason}")
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="mf-bench-daemon-"))
    fleets: list[Fleet] = []
    clients: list[docker.DockerClient] = []
    hosts_started = False
    failed = True
    t_start = time.monotonic()
    try:
        with signals_abort(args.timeout):
            say(f"starting {HOST_COUNT} netns dockerd hosts ({PREFIX}0..{PREFIX}{HOST_COUNT - 1}) ...")
            hosts = netns_hosts.start_hosts(HOST_COUNT, PREFIX, None)
            hosts_started = True
            with ThreadPoolExecutor(max_workers=HOST_COUNT) as pool:
                list(pool.map(prepare_images, hosts))
            clients = [docker.DockerClient(base_url=h.docker_url, timeout=60) for h in hosts]
            say(f"hosts up with images in {time.monotonic() - t_start:.1f}s: "
                + ", ".join(h.docker_url for h in hosts))
            cpus = os.cpu_count()
            say(f"machine: {cpus} CPUs; daemon under test = `modelfleet run` ({sys.executable})")

            small_rss: tuple[float, float] | None = None
            if parts & {"trigger", "rollout"}:
                fleet = Fleet(tmp / "watch", hosts)
                fleets.append(fleet)
                fleet.push({"environments.yaml": environments(), "models/echo.yaml": echo_model("r1")}, "initial")
                fleet.start()
                with httpx.Client(trust_env=False) as http:
                    wait_until(lambda: fleet.alive() and fleet.call_version(http) == "r1", 60, "echo r1 served")
                if "trigger" in parts:
                    bench_watch_trigger(fleet, args.rounds)
                if "rollout" in parts:
                    floor = direct_start_baseline(hosts[0], args.rounds)
                    bench_rollout(fleet, args.rounds, floor)
                fleet.wait_idle(quiet=1.0)
                assert fleet.process is not None
                small_rss = rss_mb(fleet.process.pid)
                fleet.stop()
                remove_managed(clients)

            if "trigger" in parts:
                secret = tmp / "webhook-secret"
                secret.write_text(WEBHOOK_SECRET + "\n")
                fleet = Fleet(tmp / "webhook", hosts, repo={"watch": False, "webhookSecretFile": str(secret)})
                fleets.append(fleet)
                fleet.push({"environments.yaml": environments(), "models/echo.yaml": echo_model("w1")}, "initial")
                fleet.start()
                with httpx.Client(trust_env=False) as http:
                    wait_until(lambda: fleet.alive() and fleet.call_version(http) == "w1", 60, "echo w1 served")
                bench_webhook_trigger(fleet, args.rounds)
                fleet.stop()
                remove_managed(clients)

            if "scale" in parts:
                fleet = Fleet(tmp / "scale", hosts, docker_timeout="60s")
                fleets.append(fleet)
                converge_standbys(fleet, args.deployments, clients, timeout=1200)
                bench_rss(fleet, args.deployments, small_rss, import_floor_rss())
                bench_api_noop(fleet)
                fleet.stop()  # the in-process daemon takes over the same state dir
                say(f"\n[3] in-process no-op passes: {args.passes} passes interleaved with {args.passes} baselines")
                bench_noop_inprocess(fleet.config_path, clients, args.deployments, args.passes, args.profile)
        failed = False
    except Abort as exc:
        say(f"\naborted: {exc}")
    except Exception as exc:
        say(f"\nFAILED: {type(exc).__name__}: {exc}")
        for fleet in fleets:
            if fleet.log_path.exists():
                say(f"--- {fleet.log_path} (tail) ---\n{fleet.log_tail()}")
    finally:
        # Cleanup is not interruptible by a second Ctrl-C halfway through.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        say("\ncleaning up: daemons, gateways, hosts (with their containers), temp dir ...")
        for fleet in fleets:
            with contextlib.suppress(Exception):
                fleet.stop()
        for client in clients:
            with contextlib.suppress(Exception):
                client.close()
        if hosts_started:
            try:
                netns_hosts.stop_hosts(PREFIX, keep_logs=args.keep)
            except Exception as exc:
                say(f"stopping the hosts failed: {exc} (retry: python dev/netns_hosts.py down --prefix {PREFIX})")
        if args.keep:
            say(f"kept {tmp} (daemon logs) and the dockerd logs under {netns_hosts.BASE_DIR}/{PREFIX}*")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)

    say(f"\nsummary ({time.monotonic() - t_start:.0f}s):")
    width = max((len(f.name) for f in FIGURES), default=10)
    for f in sorted(FIGURES, key=lambda f: f.name.split()[0]):
        verdict = "info" if f.ok is None else ("PASS" if f.ok else "MISS")
        say(f"  {verdict:4}  {f.name:<{width}}  {f.value}  [target {f.target}; baseline {f.baseline}]")
    if failed:
        return 3
    return 0 if all(f.ok is not False for f in FIGURES) else 1


if __name__ == "__main__":
    sys.exit(main())
