"""A running modelfleet for integration tests: a real bare Git repo, a working clone to push from,
the daemon as a real process (`modelfleet run`, with its gateway child) on the netns test hosts."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from netns_hosts import TestHost

from modelfleet.reconciler.gateway.routes import RouteStore
from modelfleet.reconciler.status.git_notes import read_statuses

LOCATIONS = [
    ("paris-1", "FR", "EU", "intel-sapphire-rapids"),
    ("frankfurt-1", "DE", "EU", "amd-genoa"),
    ("virginia-1", "US", "NA", "intel-icelake"),
]
API = "modelfleet.dev/v1alpha1"
GIT_ENV = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "test",
           "GIT_COMMITTER_EMAIL": "t@localhost", "GIT_CONFIG_NOSYSTEM": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, **GIT_ENV}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def echo_model(name: str = "echo", version: str = "v1", replicas: int = 2, environment: str = "production",
               **extra: Any) -> dict[str, Any]:
    deployment: dict[str, Any] = {
        "environment": environment,
        "replicas": replicas,
        "runtime": {
            "type": "custom", "image": "modelfleet/echo:latest", "port": 8080,
            "env": {"VERSION": version, **extra.pop("env", {})},
            "resources": {"cpus": 0.1, "memory": "32Mi"},
            "readinessProbe": {"path": "/ping", "period": "100ms", "timeout": "1s"},
        },
        **extra,
    }
    return {"apiVersion": API, "kind": "Model", "metadata": {"name": name}, "spec": {"deployments": [deployment]}}


BASE_MANIFESTS: dict[str, Any] = {
    "environments.yaml": [
        {"apiVersion": API, "kind": "Environment", "metadata": {"name": "production"},
         "spec": {"policies": ["eu-only"]}},
        {"apiVersion": API, "kind": "Environment", "metadata": {"name": "development"}, "spec": {"policies": []}},
    ],
    "policies.yaml": [
        {"apiVersion": API, "kind": "Policy", "metadata": {"name": "eu-only"},
         "spec": {"type": "location", "locations": [{"type": "continent", "name": "EU"}]}},
        {"apiVersion": API, "kind": "Policy", "metadata": {"name": "us-only"},
         "spec": {"type": "location", "locations": [{"type": "country", "name": "US"}]}},
    ],
}


@dataclass
class Fleet:
    root: Path
    hosts: list[TestHost]
    config_path: Path
    gateway_port: int
    api_port: int
    host_names: list[str]
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=Path)
    api_token: str | None = None  # sent to the API when the config sets api.tokenFile

    @property
    def origin(self) -> Path:
        return self.root / "origin.git"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    # --- git ------------------------------------------------------------------------------------

    def write(self, files: dict[str, Any]) -> None:
        for path, content in files.items():
            target = self.work / path
            if content is None:
                target.unlink(missing_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, str):
                target.write_text(content)
            else:
                docs = content if isinstance(content, list) else [content]
                target.write_text(yaml.safe_dump_all(docs, sort_keys=False))

    def push(self, files: dict[str, Any], message: str = "change") -> str:
        self.write(files)
        git(self.work, "add", "-A")
        git(self.work, "commit", "-q", "--allow-empty", "-m", message)
        git(self.work, "push", "-q", "origin", "main")
        return git(self.work, "rev-parse", "HEAD")

    def notes(self, revision: str) -> dict[str, dict[str, Any]]:
        return read_statuses(str(self.origin), revision)

    # --- daemon ---------------------------------------------------------------------------------

    def start(self) -> None:
        self.log_path = self.root / f"daemon-{int(time.time() * 1000)}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "modelfleet.reconciler.cli", "run", "--config", str(self.config_path), "-v"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "COLUMNS": "200"},
            )
        self.wait(lambda: self.api("/readyz").status_code == 200, 30, "daemon ready")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill_gateway(self) -> None:
        pidfile = self.state_dir / "gateway.pid"
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)

    def log(self) -> str:
        texts = []
        for path in sorted(self.root.glob("daemon-*.log")):
            texts.append(path.read_text(errors="replace")[-6000:])
        gateway_log = self.state_dir / "gateway.log"
        if gateway_log.exists():
            texts.append("--- gateway ---\n" + gateway_log.read_text(errors="replace")[-3000:])
        return "\n".join(texts)

    # --- HTTP -----------------------------------------------------------------------------------

    def api(self, path: str, **kwargs: Any) -> httpx.Response:
        method = kwargs.pop("method", "GET")
        if self.api_token:
            kwargs["headers"] = {"authorization": f"Bearer {self.api_token}", **kwargs.get("headers", {})}
        try:
            return httpx.request(method, f"http://127.0.0.1:{self.api_port}{path}", timeout=5, trust_env=False,
                                 **kwargs)
        except httpx.HTTPError as exc:
            return httpx.Response(599, text=str(exc))

    def status(self) -> dict[str, Any]:
        response = self.api("/api/v1/status")
        return response.json() if response.status_code == 200 else {}

    def routed(self) -> bool:
        """The gateway serves the route table the daemon published last (it follows it within ~0.1 s)."""
        try:
            seen = httpx.get(f"http://127.0.0.1:{self.gateway_port}/routes", timeout=2, trust_env=False).json()
        except (httpx.HTTPError, ValueError):
            return False
        store = RouteStore(self.state_dir)
        try:
            return bool(seen.get("version") == store.latest_version())
        finally:
            store.close()

    def deployment(self, model: str, environment: str = "production") -> dict[str, Any]:
        for item in self.status().get("deployments", []):
            if item["model"] == model and item["environment"] == environment:
                return dict(item)
        return {}

    def call(self, model: str, path: str = "/", environment: str | None = None,
             client: httpx.Client | None = None) -> httpx.Response:
        query = f"?environment={environment}" if environment else ""
        url = f"http://127.0.0.1:{self.gateway_port}/models/{model}{path}{query}"
        try:
            if client is not None:
                return client.get(url, timeout=5)
            return httpx.get(url, timeout=5, trust_env=False)
        except httpx.HTTPError as exc:
            return httpx.Response(599, text=str(exc))

    # --- hosts ----------------------------------------------------------------------------------

    def containers(self) -> list[dict[str, Any]]:
        """Managed containers on every reachable host: host name, container name, labels, state."""
        found = []
        for name, host in zip(self.host_names, self.hosts, strict=True):
            try:
                client = host.client(timeout=2)
            except Exception:
                continue  # unreachable (partitioned): nothing to list there
            try:
                for c in client.api.containers(all=True, filters={"label": "modelfleet.managed=true"}):
                    found.append({"host": name, "name": c["Names"][0].lstrip("/"), "labels": c["Labels"],
                                  "state": c["State"], "id": c["Id"]})
            except Exception:
                continue
            finally:
                client.close()
        return found

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = predicate()
            except Exception as exc:  # the predicate may race with a restarting daemon
                last = exc
                last_ok = False
            else:
                last_ok = bool(last)
            if last_ok:
                return last
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"daemon exited ({self.process.returncode}) while waiting for {what}\n"
                                     + self.log())
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})\n{self.log()}")


def make_fleet(root: Path, hosts: list[TestHost], **settings: Any) -> Fleet:
    origin, work = root / "origin.git", root / "work"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
    git(root, "clone", "-q", str(origin), str(work))
    host_names = [f"{loc[0].split('-')[0][:3]}-{i}" for i, loc in enumerate(LOCATIONS[: len(hosts)])]
    pool = []
    for name, host, (loc, country, continent, flavor) in zip(host_names, hosts, LOCATIONS, strict=False):
        pool.append({"name": name, "url": host.docker_url,
                     "location": {"name": loc, "country": country, "continent": continent},
                     "flavors": [{"name": flavor, "type": "cpu"}], "capacity": {"cpus": 2, "memory": "2Gi"}})
    gateway_port, api_port = free_port(), free_port()
    config = {
        "repo": {"url": str(origin), "branch": "main", "pollInterval": "2s", "watch": True},
        "stateDir": str(root / "state"),
        "pool": {"hosts": pool},
        # One worker: tests look at the gateway's held requests and demand as one process's.
        "gateway": {"listen": f"127.0.0.1:{gateway_port}", "workers": 1},
        "api": {"listen": f"127.0.0.1:{api_port}"},
        "status": {"provider": "git-notes"},
        "rollout": {"healthyDeadline": "6s"},
        "docker": {"timeout": "5s"},
        **settings,
    }
    config_path = root / "modelfleet.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    fleet = Fleet(root, hosts, config_path, gateway_port, api_port, host_names)
    return fleet


def statuses_of(fleet: Fleet, revision: str) -> dict[str, str]:
    return {ctx: value["state"] for ctx, value in fleet.notes(revision).items()}


def dump(data: Any) -> str:
    return json.dumps(data, indent=1, default=str)[:4000]


@contextlib.contextmanager
def running(fleet: Fleet) -> Iterator[Fleet]:
    fleet.start()
    try:
        yield fleet
    finally:
        fleet.stop()
        fleet.kill_gateway()
