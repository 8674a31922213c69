"""Gateway overhead benchmark: nginx as the baseline, in the same run, at 1 and N workers.

    .venv/bin/python benchmarks/bench_gateway.py [--duration 10] [--connections 32] [--light 1] [--rounds 1]
        [--backend-delay-ms 5] [--workers 1 2] [--pure-python]

Separate processes on loopback only: a backend (an uvicorn ASGI app answering a small JSON document,
after ``--backend-delay-ms``), nginx (Debian ``nginx-light``) as a reverse proxy with a keep-alive
upstream and ``worker_processes`` = the worker count, the gateway (``modelfleet gateway`` with
``gateway.workers`` = the same count) and the load generator (``wrk`` when installed, else a
bounded async httpx client, much slower than wrk, which then caps what can be measured). For each
worker count (default: 1 and the number of cores), each measurement lasts ``--duration`` seconds:

* saturation (``--connections`` concurrent connections): requests/s through nginx and through the
  gateway, the ratio of the two (target >= 0.5 on a trivial backend, >= 0.97 with a 5 ms one);
* light load (``--light`` connections): p50/p99 latency direct, through nginx and through the
  gateway, and the p99 the gateway adds to the direct one (target <= 1 ms).

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
    if sys.argv[2] == "pure":  # asyncio's own loop instead of uvloop (httptools parses requests either way)
        sys.modules["uvloop"] = None
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
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.MULTILINE))
    if "50" not in percentiles or "99" not in percentiles:
        raise RuntimeError(f"wrk against {url} gave no latency distribution:\n{out}")
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


NGINX_CONF = """worker_processes {workers};
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {work}/nginx-body;
    proxy_temp_path {work}/nginx-proxy;
    fastcgi_temp_path {work}/nginx-fastcgi;
    uwsgi_temp_path {work}/nginx-uwsgi;
    scgi_temp_path {work}/nginx-scgi;
    upstream backend {{ server 127.0.0.1:{backend}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }}
    }}
}}
"""


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
                        help="repeat every measurement, alternating the targets; medians are shown")
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="gateway (and nginx) worker counts to measure (default: 1 and the number of cores)")
    parser.add_argument("--pure-python", action="store_true",
                        help="run the gateway on asyncio's loop instead of uvloop (1 worker)")
    args = parser.parse_args()
    tool = args.loadgen if args.loadgen != "auto" else ("wrk" if shutil.which("wrk") else "httpx")
    if tool == "wrk" and not shutil.which("wrk"):
        parser.error("wrk is not installed (apt-get install -y wrk)")
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        parser.error("nginx is not installed (apt-get install -y nginx-light): it is the baseline")
    worker_counts = args.workers or sorted({1, os.cpu_count() or 1})
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    rows: list[tuple[int, str, str, int, Result]] = []  # (workers, scenario, target, connections, result)
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        workdir = Path(tmp)
        backend_port = free_port()
        sys.path.insert(0, str(ROOT))
        from modelfleet.reconciler.gateway.routes import Backend, RouteStore, route_key

        store = RouteStore(workdir / "state")
        bench_backend = Backend(f"http://127.0.0.1:{backend_port}", "bench-1", "local")
        store.publish({route_key("bench", "production"): (bench_backend,)})
        store.close()
        load_before = os.getloadavg()[0]
        with process([sys.executable, "-c", BACKEND_CODE, str(backend_port), str(args.backend_delay_ms)],
                     env) as backend:
            wait_port(backend_port, backend)
            direct_url = f"http://127.0.0.1:{backend_port}/predict"
            for workers in worker_counts:
                gateway_port, nginx_port = free_port(), free_port()
                config = workdir / f"modelfleet-{workers}.yaml"
                config.write_text(f"stateDir: {workdir / 'state'}\n"
                                  f"gateway: {{listen: '127.0.0.1:{gateway_port}', workers: {workers}}}\n")
                nginx_conf = workdir / f"nginx-{workers}.conf"
                nginx_conf.write_text(NGINX_CONF.format(workers=workers, work=workdir, backend=backend_port,
                                                        port=nginx_port))
                gateway_command = ([sys.executable, "-m", "modelfleet.reconciler.cli", "gateway", "--config",
                                    str(config)] if not args.pure_python or workers > 1 else
                                   [sys.executable, "-c", GATEWAY_CODE, str(config), "pure"])
                with process(gateway_command, env) as gateway, \
                        process([nginx, "-c", str(nginx_conf), "-p", str(workdir)], env) as proxy:
                    wait_port(gateway_port, gateway)
                    wait_port(nginx_port, proxy)
                    gateway_url = f"http://127.0.0.1:{gateway_port}/models/bench/predict"
                    nginx_url = f"http://127.0.0.1:{nginx_port}/models/bench/predict"
                    targets = [("nginx", nginx_url), ("gateway", gateway_url)]
                    if workers == worker_counts[0]:
                        targets.insert(0, ("direct", direct_url))
                    for _, url in targets:  # warm every path (connection pools, code paths)
                        measure(url, args.light, 2, args.method, workdir, tool)
                    for scenario, connections in (("saturation", args.connections), ("light load", args.light)):
                        runs: dict[str, list[Result]] = {name: [] for name, _ in targets}
                        for _ in range(args.rounds):
                            for name, url in targets:
                                runs[name].append(measure(url, connections, args.duration, args.method, workdir,
                                                          tool))
                        for name, results in runs.items():
                            rows.append((workers, scenario, name, connections, _median(results)))
        load_after = os.getloadavg()[0]

    import platform

    print(f"\nGateway benchmark: {args.method} small JSON, {args.duration:g}s per run, load generator {tool}, "
          f"backend delay {args.backend_delay_ms:g} ms, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"gateway {'asyncio loop' if args.pure_python else _stack()}, "
          f"{args.rounds} round(s), load average {load_before:.1f} before / {load_after:.1f} after")
    print(f"{'workers':>7}  {'scenario':<12}{'target':<9}{'conns':>6}{'req/s':>11}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'errors':>8}")
    for workers, scenario, target, connections, r in rows:
        print(f"{workers:>7}  {scenario:<12}{target:<9}{connections:>6}{r.rps:>11.0f}{r.p50:>9.2f}{r.p99:>9.2f}"
              f"{r.errors:>8}")
    by = {(w, s, t): r for w, s, t, _, r in rows}
    direct = {s: r for (w, s, t), r in by.items() if t == "direct"}
    target_ratio = 0.97 if args.backend_delay_ms >= 5 else 0.5
    for workers in worker_counts:
        gateway, baseline = by[workers, "saturation", "gateway"], by[workers, "saturation", "nginx"]
        ratio = gateway.rps / baseline.rps
        added = by[workers, "light load", "gateway"].p99 - direct["light load"].p99
        added_nginx = by[workers, "light load", "nginx"].p99 - direct["light load"].p99
        print(f"{workers} worker(s): gateway/nginx throughput {ratio:.2f} (target >= {target_ratio:g}) "
              f"{'OK' if ratio >= target_ratio else 'MISSED'}; added p99 at light load: gateway {added:.2f} ms "
              f"(target <= 1 ms) {'OK' if added <= 1 else 'MISSED'}, nginx {added_nginx:.2f} ms; "
              f"gateway/direct {gateway.rps / direct['saturation'].rps:.2f}")
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
