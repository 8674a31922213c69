"""Gateway overhead benchmark: direct-to-backend vs through the gateway, in the same run.

    .venv/bin/python benchmarks/bench_gateway.py [--duration 10] [--connections 32] [--light 1] [--rounds 1]

Three separate processes on loopback only: a fast backend (an uvicorn ASGI app answering a small
JSON document), the gateway (``run_gateway`` on a generated config) and the load generator (``wrk``
when installed, else a bounded async httpx client with fixed concurrency, which is itself much slower
than wrk and then caps what can be measured). Each measurement lasts ``--duration`` seconds:

* saturation (``--connections`` concurrent connections): requests/s direct and through the gateway,
  the ratio of the two (target >= 0.8);
* light load (``--light`` connections): p50/p99 latency direct and through the gateway, and the p99
  the gateway adds (target <= 2 ms).

All three processes share the machine's cores: on a 2-core machine the gateway competes with the
backend and the load generator for CPU, which is part of what the figures show.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUEST_BODY = '{"inputs": "the gateway adds almost nothing to this request, hopefully"}'

BACKEND_CODE = textwrap.dedent('''
    import asyncio, sys, uvicorn
    BODY = b'{"label": "positive", "score": 0.9871}'
    HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]
    DELAY = float(sys.argv[2]) / 1000

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        if DELAY:
            await asyncio.sleep(DELAY)
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": BODY})

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), lifespan="off", access_log=False,
                log_level="warning", timeout_keep_alive=30)
''')

GATEWAY_CODE = textwrap.dedent('''
    import logging, sys
    if sys.argv[2] == "pure":  # as installed without uvicorn[standard]: asyncio loop, h11 parsing
        sys.modules["uvloop"] = sys.modules["httptools"] = None
    logging.basicConfig(level=logging.WARNING)
    from modelfleet.reconciler.config import load_config
    from modelfleet.reconciler.gateway.server import run_gateway
    run_gateway(load_config(sys.argv[1]))
''')

LOADGEN_CODE = textwrap.dedent('''
    import asyncio, json, sys, time
    import httpx

    async def main(url, connections, duration, method, body):
        latencies, errors = [], 0
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        async with httpx.AsyncClient(limits=limits, timeout=10) as client:
            deadline = time.perf_counter() + duration

            async def worker():
                nonlocal errors
                while time.perf_counter() < deadline:
                    started = time.perf_counter()
                    try:
                        response = await client.request(method, url, content=body or None)
                        await response.aread()
                        if response.status_code >= 400:
                            errors += 1
                    except httpx.HTTPError:
                        errors += 1
                    latencies.append(time.perf_counter() - started)

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(connections)))
            elapsed = time.perf_counter() - started
        latencies.sort()
        pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000
        print(json.dumps({"rps": len(latencies) / elapsed, "p50": pick(0.5), "p99": pick(0.99),
                          "errors": errors, "requests": len(latencies)}))

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]))
''')


@dataclass
class Result:
    rps: float
    p50: float  # ms
    p99: float  # ms
    errors: int
    tool: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


@contextlib.contextmanager
def process(args: list[str], env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(args, env=env, start_new_session=True, stdin=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _wrk_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not match:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def run_wrk(url: str, connections: int, duration: float, method: str, workdir: Path) -> Result:
    script = workdir / "request.lua"
    script.write_text(f'wrk.method = "{method}"\n'
                      + (f"wrk.body = {json.dumps(REQUEST_BODY)}\n"
                         'wrk.headers["Content-Type"] = "application/json"\n' if method == "POST" else ""))
    threads = max(1, min(2, connections))
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{int(duration)}s", "--latency", "--timeout", "5s",
         "-s", str(script), url], check=True, capture_output=True, text=True, timeout=duration + 30).stdout
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.MULTILINE))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = 0
    if non2xx := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(non2xx.group(1))
    if sock := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(n) for n in sock.groups())
    return Result(rps, _wrk_ms(percentiles["50"]), _wrk_ms(percentiles["99"]), errors, "wrk")


def run_httpx(url: str, connections: int, duration: float, method: str) -> Result:
    out = subprocess.run(
        [sys.executable, "-c", LOADGEN_CODE, url, str(connections), str(duration), method,
         REQUEST_BODY if method == "POST" else ""],
        check=True, capture_output=True, text=True, timeout=duration + 60).stdout
    data = json.loads(out.strip().splitlines()[-1])
    return Result(data["rps"], data["p50"], data["p99"], data["errors"], "httpx")


def measure(url: str, connections: int, duration: float, method: str, workdir: Path, tool: str) -> Result:
    if tool == "wrk":
        return run_wrk(url, connections, duration, method, workdir)
    return run_httpx(url, connections, duration, method)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement (default 10)")
    parser.add_argument("--connections", type=int, default=32, help="connections for the throughput runs")
    parser.add_argument("--light", type=int, default=1,
                        help="connections for the latency runs (1: no queueing, the added latency itself)")
    parser.add_argument("--method", choices=["GET", "POST"], default="POST")
    parser.add_argument("--backend-delay-ms", type=float, default=0.0, help="simulated inference time")
    parser.add_argument("--loadgen", choices=["auto", "wrk", "httpx"], default="auto")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat every measurement, alternating direct and gateway; medians are shown")
    parser.add_argument("--pure-python", action="store_true",
                        help="run the gateway without uvloop and httptools even when they are installed")
    args = parser.parse_args()
    tool = args.loadgen if args.loadgen != "auto" else ("wrk" if shutil.which("wrk") else "httpx")
    if tool == "wrk" and not shutil.which("wrk"):
        parser.error("wrk is not installed (apt-get install -y wrk)")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        workdir = Path(tmp)
        backend_port, gateway_port = free_port(), free_port()
        config = workdir / "modelfleet.yaml"
        config.write_text(f"stateDir: {workdir / 'state'}\ngateway: {{listen: '127.0.0.1:{gateway_port}'}}\n")
        sys.path.insert(0, str(ROOT))
        from modelfleet.reconciler.gateway.routes import Backend, RouteStore, route_key

        store = RouteStore(workdir / "state")
        bench_backend = Backend(f"http://127.0.0.1:{backend_port}", "bench-1", "local")
        store.publish({route_key("bench", "production"): (bench_backend,)})
        store.close()

        with process([sys.executable, "-c", BACKEND_CODE, str(backend_port), str(args.backend_delay_ms)],
                     env) as backend, \
                process([sys.executable, "-c", GATEWAY_CODE, str(config),
                         "pure" if args.pure_python else "auto"], env) as gateway:
            wait_port(backend_port, backend)
            wait_port(gateway_port, gateway)
            direct_url = f"http://127.0.0.1:{backend_port}/predict"
            gateway_url = f"http://127.0.0.1:{gateway_port}/models/bench/predict"
            # Warm both paths (connection pools, code paths) before measuring.
            measure(direct_url, args.light, 2, args.method, workdir, tool)
            measure(gateway_url, args.light, 2, args.method, workdir, tool)
            load_before = os.getloadavg()[0]
            rows: list[tuple[str, str, int, Result]] = []
            for scenario, connections in (("saturation", args.connections), ("light load", args.light)):
                runs: dict[str, list[Result]] = {"direct": [], "gateway": []}
                for _ in range(args.rounds):
                    for target, url in (("direct", direct_url), ("gateway", gateway_url)):
                        runs[target].append(measure(url, connections, args.duration, args.method, workdir, tool))
                for target, results in runs.items():
                    rows.append((scenario, target, connections, _median(results)))
            load_after = os.getloadavg()[0]

    import platform

    print(f"\nGateway benchmark: {args.method} small JSON, {args.duration:g}s per run, load generator {tool}, "
          f"backend delay {args.backend_delay_ms:g} ms, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"gateway {'pure Python (asyncio, h11)' if args.pure_python else _stack()}, "
          f"{args.rounds} round(s), load average {load_before:.1f} before / {load_after:.1f} after")
    print(f"{'scenario':<12}{'target':<9}{'conns':>6}{'req/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for scenario, target, connections, r in rows:
        print(f"{scenario:<12}{target:<9}{connections:>6}{r.rps:>11.0f}{r.p50:>9.2f}{r.p99:>9.2f}{r.errors:>8}")
    by = {(s, t): r for s, t, _, r in rows}
    ratio = by["saturation", "gateway"].rps / by["saturation", "direct"].rps
    added_p99 = by["light load", "gateway"].p99 - by["light load", "direct"].p99
    added_p99_sat = by["saturation", "gateway"].p99 - by["saturation", "direct"].p99
    print(f"throughput ratio (saturation): {ratio:.2f}  (target >= 0.8) {'OK' if ratio >= 0.8 else 'MISSED'}")
    print(f"added p99 (light load): {added_p99:.2f} ms  (target <= 2 ms) {'OK' if added_p99 <= 2 else 'MISSED'}")
    print(f"added p99 (saturation): {added_p99_sat:.2f} ms")
    errors = sum(r.errors for *_, r in rows)
    if errors:
        print(f"ERRORS: {errors} failed requests")
    return 0 if errors == 0 else 1


def _median(results: list[Result]) -> Result:
    def mid(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    return Result(mid([r.rps for r in results]), mid([r.p50 for r in results]), mid([r.p99 for r in results]),
                  sum(r.errors for r in results), results[0].tool)


def _stack() -> str:
    parts = []
    for name in ("uvloop", "httptools"):
        try:
            __import__(name)
            parts.append(f"{name} yes")
        except ImportError:
            parts.append(f"{name} no")
    return ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
