"""The torch runtime against real TorchServe on the same .mar, with and without dynamic batching.

    .venv/bin/python benchmarks/bench_torch_batching.py                    # ~2 min
    .venv/bin/python benchmarks/bench_torch_batching.py --duration 10 --rounds 3 --batch-size 8 --max-batch-delay-ms 5
    .venv/bin/python benchmarks/bench_torch_batching.py --no-gateway       # direct only

Needs (installs nothing itself): ``wrk``, TorchServe 0.12 and its Java (``apt-get install -y wrk
openjdk-17-jre-headless``; ``.venv/bin/pip install torchserve==0.12.0 torch-model-archiver==0.12.0``,
both in the dev extra). Exit code 2 when one is missing.

The archive is tests/runtimes/mar_builder.py's eager TinyNet with its BaseHandler subclass (a tiny
model: what the servers themselves cost shows). For each batch setting (TorchServe's defaults
batchSize 1 / maxBatchDelay 100 ms, then ``--batch-size`` / ``--max-batch-delay-ms``), on loopback:

* TorchServe (``torchserve --foreground``, one worker, token auth off, the settings in its
  config.properties ``models``), then the torch runtime (``python -m modelfleet.runtimes.torch_server``,
  the settings as the daemon gives them: MODELFLEET_BATCH_SIZE / MODELFLEET_MAX_BATCH_DELAY);
* each measured with ``wrk -t1 -c<connections>`` (default 8) POSTing a small JSON input, directly and
  through the modelfleet gateway (``run_gateway`` with one route to the server);

then prints requests/s, p50/p99, the servers' CPU time per request (all their processes and threads,
from /proc: the fair figure when other jobs share the cores, as the scheduler gives a many-threaded
JVM a larger share than one Python process) and the ratios runtime / TorchServe for the same
setting and path.
Both servers get ``OMP_NUM_THREADS`` (default 1) and share the machine's cores with wrk and the
gateway. Every process is stopped in a ``finally`` (TorchServe with its whole process group).
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
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BODY = '{"inputs": [0.5, -1.0, 2.0, 0.25]}'
MODEL = "tiny"
GATEWAY_CODE = """
import logging, sys
logging.basicConfig(level=logging.WARNING)
from modelfleet.reconciler.config import load_config
from modelfleet.reconciler.gateway.server import run_gateway
run_gateway(load_config(sys.argv[1]))
"""


@dataclass
class Result:
    rps: float
    p50: float  # ms
    p99: float  # ms
    errors: int
    requests: int
    cpu_us: float = 0.0  # CPU time of the server (all its processes and threads) per request, in µs


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU of every live process in process group ``pgid`` (TorchServe: the Java
    frontend and its Python worker; the runtime: one process)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:  # field 5, pgrp
            total += int(fields[11]) + int(fields[12])  # fields 14, 15: utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_answering(url: str, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    """Until ``url`` answers the benchmark's POST with 200 (the model is loaded and serving)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            answer = httpx.post(url, content=BODY, headers={"content-type": "application/json"}, timeout=2)
            if answer.status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s:\n{log.read_text(errors='replace')[-3000:]}")


@contextlib.contextmanager
def process(args: list[str], log: Path, env: dict[str, str],
            cwd: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A process in its own session; on exit its whole process group gets SIGTERM, then SIGKILL."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            time.sleep(0.5)  # TorchServe's workers leave after the frontend
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not match:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def run_wrk(url: str, connections: int, duration: int, work: Path) -> Result:
    script = work / "post.lua"
    script.write_text(f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                      f"wrk.body = {json.dumps(BODY)}\n")
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "5s",
                          "-s", str(script), url], check=True, capture_output=True, text=True,
                         timeout=duration + 60).stdout
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.MULTILINE))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = 0
    if non2xx := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(non2xx.group(1))
    if sock := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(n) for n in sock.groups())
    return Result(rps, _ms(percentiles["50"]), _ms(percentiles["99"]), errors, requests)


def torchserve_command(work: Path, store: Path, port: int, batch_size: int, delay_ms: int) -> list[str]:
    exe = Path(sys.executable).with_name("torchserve")
    config = work / "config.properties"
    models = {MODEL: {"1.0": {"defaultVersion": True, "marName": f"{MODEL}.mar", "minWorkers": 1, "maxWorkers": 1,
                              "batchSize": batch_size, "maxBatchDelay": delay_ms, "responseTimeout": 120}}}
    config.write_text(f"inference_address=http://127.0.0.1:{port}\n"
                      f"management_address=http://127.0.0.1:{free_port()}\n"
                      f"metrics_address=http://127.0.0.1:{free_port()}\n"
                      f"disable_token_authorization=true\nmodel_store={store}\nload_models={MODEL}.mar\n"
                      f"default_workers_per_model=1\nmodels={json.dumps(models)}\n")
    return [str(exe), "--start", "--foreground", "--ncs", "--ts-config", str(config), "--disable-token-auth"]


def measure_both(url: str, gateway_url: str | None, args: argparse.Namespace, work: Path,
                 pgid: int) -> dict[str, Result]:
    def timed(target: str) -> Result:
        before = group_cpu_seconds(pgid)
        result = run_wrk(target, args.connections, args.duration, work)
        result.cpu_us = (group_cpu_seconds(pgid) - before) / max(1, result.requests) * 1e6
        return result

    run_wrk(url, args.connections, 2, work)  # warm-up (JIT, connection pools), not counted
    results = {"direct": [timed(url) for _ in range(args.rounds)]}
    if gateway_url is not None:
        run_wrk(gateway_url, args.connections, 2, work)
        results["gateway"] = [timed(gateway_url) for _ in range(args.rounds)]
    return {path: _median(rs) for path, rs in results.items()}


def _median(results: list[Result]) -> Result:
    def mid(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    return Result(mid([r.rps for r in results]), mid([r.p50 for r in results]), mid([r.p99 for r in results]),
                  sum(r.errors for r in results), sum(r.requests for r in results), mid([r.cpu_us for r in results]))


@contextlib.contextmanager
def gateway_to(backend_port: int, work: Path, env: dict[str, str], enabled: bool) -> Iterator[str | None]:
    """The modelfleet gateway with one route (bench/production) to 127.0.0.1:backend_port."""
    if not enabled:
        yield None
        return
    from modelfleet.reconciler.gateway.routes import Backend, RouteStore, route_key

    state = work / f"gateway-{backend_port}"
    port = free_port()
    config = work / f"gateway-{backend_port}.yaml"
    config.write_text(f"stateDir: {state}\ngateway: {{listen: '127.0.0.1:{port}'}}\n")
    store = RouteStore(state)
    backend = Backend(f"http://127.0.0.1:{backend_port}", "bench-1", "local")
    store.publish({route_key("bench", "production"): (backend,)})
    store.close()
    log = work / f"gateway-{backend_port}.log"
    with process([sys.executable, "-c", GATEWAY_CODE, str(config)], log, env) as proc:
        url = f"http://127.0.0.1:{port}/models/bench/predictions/{MODEL}"
        wait_answering(url, proc, 30, log)
        yield url


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement (default 10)")
    parser.add_argument("--connections", type=int, default=8, help="wrk connections (default 8)")
    parser.add_argument("--rounds", type=int, default=1, help="measurements per server and path; medians shown")
    parser.add_argument("--batch-size", type=int, default=8, help="the batched setting's batchSize (default 8)")
    parser.add_argument("--max-batch-delay-ms", type=int, default=5, help="its maxBatchDelay (default 5)")
    parser.add_argument("--omp-threads", default="1", help="OMP_NUM_THREADS of both servers (default 1)")
    parser.add_argument("--no-gateway", action="store_true", help="measure the servers directly only")
    parser.add_argument("--only-batched", action="store_true", help="skip TorchServe's defaults (batchSize 1)")
    args = parser.parse_args()

    missing = [what for what, ok in (
        ("wrk (apt-get install -y wrk)", shutil.which("wrk")),
        ("java (apt-get install -y openjdk-17-jre-headless)", shutil.which("java")),
        ("torchserve (.venv/bin/pip install torchserve==0.12.0)",
         Path(sys.executable).with_name("torchserve").exists()),
    ) if not ok]
    if missing:
        print("cannot run here, missing: " + "; ".join(missing), file=sys.stderr)
        return 2

    from tests.runtimes import mar_builder

    settings = [(args.batch_size, args.max_batch_delay_ms)]
    if not args.only_batched:
        settings.insert(0, (1, 100))
    base_env = {**os.environ, "OMP_NUM_THREADS": args.omp_threads,
                "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                # torchserve starts its workers with the python on PATH: this interpreter's
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    rows: list[tuple[str, int, int, str, Result]] = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-torch-batching-") as tmp:
        work = Path(tmp)
        store = work / "store"
        store.mkdir()
        shutil.copy(mar_builder.build_eager_mar(work / "build"), store / f"{MODEL}.mar")
        for size, delay in settings:
            # TorchServe
            port = free_port()
            ts_work = work / f"ts-{size}-{delay}"
            ts_work.mkdir()
            env = {**base_env, "LOG_LOCATION": str(ts_work / "logs"), "METRICS_LOCATION": str(ts_work / "logs")}
            log = ts_work / "torchserve.log"
            with process(torchserve_command(ts_work, store, port, size, delay), log, env, cwd=ts_work) as proc:
                url = f"http://127.0.0.1:{port}/predictions/{MODEL}"
                wait_answering(url, proc, 180, log)
                with gateway_to(port, work, base_env, not args.no_gateway) as gateway_url:
                    for path, result in measure_both(url, gateway_url, args, work, proc.pid).items():
                        rows.append(("TorchServe 0.12", size, delay, path, result))
            # the torch runtime, told as the daemon tells it
            port = free_port()
            env = {**base_env, "HOST": "127.0.0.1", "PORT": str(port), "MODELFLEET_MODEL_DIR": str(store),
                   "MODELFLEET_WORK_DIR": str(work / "runtime-work"), "MODELFLEET_BATCH_SIZE": str(size),
                   "MODELFLEET_MAX_BATCH_DELAY": str(delay)}
            log = work / f"runtime-{size}-{delay}.log"
            with process([sys.executable, "-m", "modelfleet.runtimes.torch_server"], log, env) as proc:
                url = f"http://127.0.0.1:{port}/predictions/{MODEL}"
                wait_answering(url, proc, 120, log)
                with gateway_to(port, work, base_env, not args.no_gateway) as gateway_url:
                    for path, result in measure_both(url, gateway_url, args, work, proc.pid).items():
                        rows.append(("torch runtime", size, delay, path, result))
    load_after = os.getloadavg()[0]

    print(f"\ntorch runtime vs TorchServe 0.12, same .mar (TinyNet + BaseHandler), wrk -t1 -c{args.connections}, "
          f"{args.duration}s x {args.rounds}, OMP_NUM_THREADS={args.omp_threads}, {os.cpu_count()} CPUs, "
          f"load average {load_before:.1f} before / {load_after:.1f} after")
    print(f"{'server':<17}{'batch':>6}{'delay':>7}  {'path':<8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'CPU µs/req':>12}{'errors':>8}")
    for server, size, delay, path, r in rows:
        print(f"{server:<17}{size:>6}{delay:>5}ms  {path:<8}{r.rps:>9.0f}{r.p50:>9.2f}{r.p99:>9.2f}"
              f"{r.cpu_us:>12.0f}{r.errors:>8}")
    by = {(server, size, delay, path): r for server, size, delay, path, r in rows}
    failed = sum(r.errors for *_, r in rows) > 0
    baseline = by.get(("TorchServe 0.12", 1, 100, "direct"))
    for size, delay in settings:
        for path in ("direct", "gateway"):
            ours, theirs = by.get(("torch runtime", size, delay, path)), by.get(("TorchServe 0.12", size, delay, path))
            if ours is None or theirs is None:
                continue
            ratio = ours.rps / theirs.rps
            line = (f"batchSize {size:>3}, {path:<8}: runtime / TorchServe = {ratio:.2f}x req/s, "
                    f"{theirs.cpu_us / max(ours.cpu_us, 1e-9):.2f}x requests per CPU-second")
            if baseline is not None and (size, delay) != (1, 100):
                line += f"; / TorchServe's defaults direct ({baseline.rps:.0f} req/s) = {ours.rps / baseline.rps:.2f}x"
            print(line + ("  (target >= 2x)" if size > 1 else ""))
    if failed:
        print("ERRORS: some requests failed (see the errors column)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
