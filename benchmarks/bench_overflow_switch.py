"""Overflow switch benchmark: an on-prem endpoint goes down mid-load and comes back.

    .venv/bin/python benchmarks/bench_overflow_switch.py [--rounds 3] [--health-period 1]

Real processes on loopback: the "on-prem" model and the deployment's pool replica (two small
uvicorn servers that answer with their name), and `modelfleet gateway` (one worker) following a
``routes.db`` whose deployment has overflow settings: traffic to the endpoint first, a health check
every ``--health-period`` seconds, 2 failed checks to mark it unhealthy. A client sends requests
back to back through the gateway. Each round kills the endpoint (SIGKILL: connections refused), then
starts it again, and measures:

* **away**: from the kill to the first answer from the pool, and the failed requests meanwhile
  (target: 0; a request refused by the endpoint before any response byte is sent to the pool);
* **back**: from the endpoint's restart (listening again) to the first answer from it. The
  baseline is what the settings allow: the requests refused while it was down ejected it for
  ``--ejection-time`` (the manifest's ``ejectionTime``, default 30 s, as Envoy's outlier
  detection), then one health check period.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_gateway import free_port, wait_port  # noqa: E402
from modelfleet.reconciler.gateway.routes import Backend, Overflow, RouteStore, route_key  # noqa: E402

KEY = route_key("bench", "production")
NAMED_BACKEND = textwrap.dedent('''
    import sys, uvicorn
    BODY = ('{"served_by": "%s"}' % sys.argv[2]).encode()
    HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": BODY})

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), lifespan="off", access_log=False,
                log_level="warning")
''')


@contextlib.contextmanager
def started(args: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(args, env=env, start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class Client:
    """Requests back to back through the gateway on a thread: (time, who answered) or failures."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: list[tuple[float, str]] = []
        self.failures: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(trust_env=False, timeout=10) as client:
            while not self._stop.is_set():
                try:
                    response = client.post(self.url, content=b'{"inputs": [1, 2, 3]}')
                except httpx.HTTPError as exc:
                    self.failures.append((time.monotonic(), f"{type(exc).__name__}: {exc}"))
                    continue
                if response.status_code == 200:
                    self.answers.append((time.monotonic(), str(response.json()["served_by"])))
                else:
                    self.failures.append((time.monotonic(), f"{response.status_code} {response.text[:120]}"))

    def first(self, who: str, after: float, timeout: float = 60.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hits = [at for at, name in self.answers if at >= after and name == who]
            if hits:
                return hits[0] - after
            time.sleep(0.002)
        raise RuntimeError(f"no answer from {who} within {timeout}s")

    def __enter__(self) -> Client:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--health-period", type=float, default=1.0, help="seconds between health checks")
    parser.add_argument("--ejection-time", type=float, default=30.0,
                        help="overflow.ejectionTime: how long failed requests keep the endpoint out (default 30 s, "
                             "the manifest's)")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    away: list[float] = []
    back: list[float] = []
    failed = 0
    with tempfile.TemporaryDirectory(prefix="bench-overflow-") as temporary:
        work = Path(temporary)
        onprem_port, pool_port, gateway_port = free_port(), free_port(), free_port()
        store = RouteStore(work / "state")
        store.publish({KEY: (Backend(f"http://127.0.0.1:{pool_port}", "bench-1", "local"),)},
                      overflow={KEY: Overflow(endpoint=f"http://127.0.0.1:{onprem_port}", health_path="/",
                                              health_period=args.health_period,
                                              health_timeout=min(0.5, args.health_period), failure_threshold=2,
                                              ejection_time=args.ejection_time)})
        store.close()
        config = work / "modelfleet.yaml"
        config.write_text(f"stateDir: {work / 'state'}\napi: {{listen: '127.0.0.1:{free_port()}'}}\n"
                          f"gateway: {{listen: '127.0.0.1:{gateway_port}', workers: 1}}\nlogging: {{level: warning}}\n")
        onprem_command = [sys.executable, "-c", NAMED_BACKEND, str(onprem_port), "onprem"]
        with started([sys.executable, "-c", NAMED_BACKEND, str(pool_port), "pool"], env) as pool, \
                started([sys.executable, "-m", "modelfleet.reconciler.cli", "gateway", "--config", str(config)],
                        env) as gateway:
            wait_port(pool_port, pool)
            wait_port(gateway_port, gateway)
            onprem = subprocess.Popen(onprem_command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
            try:
                wait_port(onprem_port, onprem)
                with Client(f"http://127.0.0.1:{gateway_port}/models/bench/predict") as client:
                    client.first("onprem", time.monotonic() - 60, timeout=30)  # steady on the endpoint
                    for _ in range(args.rounds):
                        time.sleep(1.0)
                        failures_before = len(client.failures)
                        killed = time.monotonic()
                        os.killpg(onprem.pid, signal.SIGKILL)
                        onprem.wait()
                        away.append(client.first("pool", killed))
                        time.sleep(max(3.0, 3 * args.health_period))  # marked unhealthy, all on the pool
                        failed += len(client.failures) - failures_before
                        onprem = subprocess.Popen(onprem_command, env=env, start_new_session=True,
                                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                        wait_port(onprem_port, onprem)
                        listening = time.monotonic()
                        back.append(client.first("onprem", listening))
                    requests = len(client.answers) + len(client.failures)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(onprem.pid, signal.SIGKILL)
                onprem.wait()
    pause = max(3.0, 3 * args.health_period)  # from the kill to the restart
    bound = max(args.ejection_time - pause, 0.0) + args.health_period
    print(f"overflow switch, {args.rounds} rounds, health check every {args.health_period:g}s, "
          f"{requests} requests in all")
    print(f"  away (endpoint killed -> first answer from the pool): median {statistics.median(away) * 1000:.1f} ms, "
          f"max {max(away) * 1000:.1f} ms; failed requests: {failed} (target 0) {'OK' if failed == 0 else 'MISSED'}")
    print(f"  back (endpoint listening again -> first answer from it): median {statistics.median(back):.2f} s, "
          f"max {max(back):.2f} s; baseline: the endpoint was ejected by its failed requests for ejectionTime "
          f"{args.ejection_time:g} s from the kill, then one health check ({args.health_period:g} s): "
          f"{bound:.1f} s at most after the restart ({statistics.median(back) / bound:.2f}x)")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
