"""Benchmark of the inference runtimes (on demand, not part of the test suite).

    .venv/bin/python benchmarks/bench_runtimes.py                 # both parts
    .venv/bin/python benchmarks/bench_runtimes.py --only torch    # requests/s only (no Docker needed)
    .venv/bin/python benchmarks/bench_runtimes.py --only coldstart [--host tcp://10.0.0.2:2375]

1. torch runtime throughput: a real .mar (eager TinyNet + custom BaseHandler, built with
   torch-model-archiver) served by ``python -m modelfleet.runtimes.torch_server`` on 127.0.0.1,
   driven by N concurrent keep-alive clients, against the same handler called in-process
   (``LoadedModel.predict``, i.e. TorchServe's handler contract without HTTP). Prints both
   requests/s and their ratio (the HTTP + event loop + thread hand-off overhead).
2. transformers cold start: container created -> first successful ``/v1/embeddings`` answer for
   all-MiniLM-L6-v2 in the runtime image, with the reconciler's container settings (1 CPU, 2 GiB,
   cap_drop ALL, model read-only at /model). Needs root: without ``--host`` it starts its own
   Docker host in a network namespace (dev/netns_hosts.py) and removes it afterwards; the images
   come from the build cache (``modelfleet runtimes build``'s, /var/cache/modelfleet).

All traffic goes to 127.0.0.1 or to the Docker host this script created; every loop is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "dev"))

X = [0.5, -1.0, 2.0, 0.25]


def bench_torch(requests_total: int, concurrency: int, time_cap: float) -> dict[str, Any]:
    import httpx

    from modelfleet.runtimes import torch_server
    from tests.runtimes import mar_builder
    from tests.runtimes.conftest import TorchServer

    work = Path(tempfile.mkdtemp(prefix="bench-rt-"))
    try:
        mar = mar_builder.build_eager_mar(work / "build")
        model_dir = work / "model"
        model_dir.mkdir()
        shutil.copy(mar, model_dir / mar.name)

        # In-process: the handler through LoadedModel.predict (the server's own call path).
        old_cwd = os.getcwd()
        loaded = torch_server.open_model(model_dir, work / "inproc")
        os.chdir(old_cwd)
        row, types = {"body": {"inputs": X}}, {"body": "application/json"}
        for _ in range(50):
            loaded.predict(row, types, [])
        n_inproc = min(requests_total, 5000)
        t0 = time.perf_counter()
        for _ in range(n_inproc):
            loaded.predict(row, types, [])
        inproc_rps = n_inproc / (time.perf_counter() - t0)

        server = TorchServer(model_dir, work / "server.log", env={"OMP_NUM_THREADS": ""})
        try:
            server.wait()
            url = f"{server.base}/predictions/tiny"
            body = json.dumps({"inputs": X}).encode()
            headers = {"content-type": "application/json"}
            wrk = shutil.which("wrk")
            if wrk:  # a C load generator in its own process: the server is measured, not the client
                script = work / "post.lua"
                script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                                  f"wrk.body = '{body.decode()}'\n")
                seconds = max(2, int(min(time_cap, 10)))
                out = subprocess.run([wrk, "-t1", f"-c{concurrency}", f"-d{seconds}s", "-s", str(script), url],
                                     capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
                rps = float(out.split("Requests/sec:")[1].split()[0])
                total = int(out.split(" requests in ")[0].split()[-1])
                non2xx = int(out.split("Non-2xx or 3xx responses:")[1].split()[0]) if "Non-2xx" in out else 0
                return {"server_rps": rps, "inprocess_rps": inproc_rps, "ratio": rps / inproc_rps,
                        "requests": total, "errors": non2xx, "concurrency": concurrency, "client": "wrk"}
            counter = {"done": 0, "errors": 0}
            lock = threading.Lock()
            deadline = time.monotonic() + time_cap

            def client() -> None:
                with httpx.Client(timeout=10) as http:
                    for _ in range(10):  # warm-up of this connection
                        http.post(url, content=body, headers=headers)
                    while time.monotonic() < deadline:
                        with lock:
                            if counter["done"] >= requests_total:
                                return
                            counter["done"] += 1
                        if http.post(url, content=body, headers=headers).status_code != 200:
                            with lock:
                                counter["errors"] += 1

            threads = [threading.Thread(target=client) for _ in range(concurrency)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - t0
            server_rps = counter["done"] / elapsed
        finally:
            server.stop()
        return {"server_rps": server_rps, "inprocess_rps": inproc_rps, "ratio": server_rps / inproc_rps,
                "requests": counter["done"], "errors": counter["errors"], "concurrency": concurrency,
                "client": "httpx threads"}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_coldstart(host_url: str | None, runs: int) -> dict[str, Any]:
    import httpx

    from modelfleet.reconciler.images import build, content
    from modelfleet.reconciler.pool.adapter import ContainerSpec, HostClient
    from modelfleet.state.pool import Host
    from tests.runtimes import hf_builder

    started_prefix = None
    if host_url is None:
        import netns_hosts

        reason = netns_hosts.check_prerequisites()
        if reason:
            raise SystemExit(f"cold start needs a Docker host: {reason} (or pass --host)")
        started_prefix = "mfbench"
        host_url = netns_hosts.start_hosts(1, started_prefix, "10.243")[0].docker_url
    volume = Path("/var/lib/modelfleet-test") / f"bench-{uuid.uuid4().hex[:8]}"
    try:
        t0 = time.monotonic()
        report = build.build_runtime_images([host_url], base_image="local", progress=False)
        print(f"images ready in {time.monotonic() - t0:.1f} s\n{report.summary()}")
        model_dir = hf_builder.copy_minilm(volume / "minilm")
        host = Host(name="bench", url=host_url, location={"name": "b", "country": "FR", "continent": "EU"},
                    flavors=[{"name": "cpu"}], capacity={"cpus": 2, "memory": "4Gi"})
        client = HostClient(host, timeout=60)
        address = host.reach_address
        times: list[float] = []
        for _ in range(runs):
            spec = ContainerSpec(name=f"mf-bench-{uuid.uuid4().hex[:6]}", image=content.IMAGE_TRANSFORMERS,
                                 command=None, environment={}, labels={"modelfleet.managed": "true"}, port=8080,
                                 cpus=1.0, memory=2 * 2**30,
                                 volumes={str(model_dir): {"bind": "/model", "mode": "ro"}})
            t0 = time.monotonic()
            info = client.create_and_start(spec)
            url = f"http://{address}:{info.ports[8080]}/v1/embeddings"
            try:
                while time.monotonic() - t0 < 300:
                    try:
                        if httpx.post(url, json={"input": "hello"}, timeout=5).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    time.sleep(0.05)
                else:
                    raise SystemExit(f"no embedding within 300 s: {client.logs_tail(info.id, 20)}")
                times.append(time.monotonic() - t0)
            finally:
                client.remove(info.id)
        client.close()
        return {"runs": times, "median_s": statistics.median(times), "min_s": min(times),
                "image_mib": {k: v / 2**20 for k, v in report.hosts[0].images.items()}}
    finally:
        shutil.rmtree(volume, ignore_errors=True)
        if started_prefix is not None:
            import netns_hosts

            netns_hosts.stop_hosts(started_prefix)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["torch", "coldstart"])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--time-cap", type=float, default=60.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--host", help="Docker host for the cold start (default: start a netns host)")
    args = parser.parse_args()
    if args.only in (None, "torch"):
        result = bench_torch(args.requests, args.concurrency, args.time_cap)
        print(f"torch runtime: {result['server_rps']:.0f} req/s over HTTP ({result['client']}, "
              f"{result['concurrency']} connections, "
              f"{result['requests']} requests, {result['errors']} errors) vs {result['inprocess_rps']:.0f} calls/s "
              f"in-process: ratio {result['ratio']:.2f}")
    if args.only in (None, "coldstart"):
        cold = bench_coldstart(args.host, args.runs)
        print(f"MiniLM cold start (container created -> first embedding): median {cold['median_s']:.2f} s, "
              f"min {cold['min_s']:.2f} s, runs {[round(t, 2) for t in cold['runs']]}; "
              f"images {', '.join(f'{k} {v:.0f} MiB' for k, v in cold['image_mib'].items())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
