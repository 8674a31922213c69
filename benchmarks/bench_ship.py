"""Benchmark: ship a >= 5 GB model archive to 3 real Docker hosts, against a raw `docker cp`.

    .venv/bin/python benchmarks/bench_ship.py [--size-gib 5] [--prefix mfs] [--subnet-base 10.233]

Starts 3 dockerd hosts in network namespaces (dev/netns_hosts.py, own prefix and subnet, stopped
at the end), writes a valid .mar (ZIP_STORED, one big pseudo-random entry) straight into an
ArtifactStore under /tmp (hashed while written), then per host:

- baseline: `docker -H tcp://<host>:2375 cp FILE <created container>:/model/` into a fresh volume;
- ours: ArtifactShipper.ensure_on_host (generator tar → put_archive into a volume, then the
  sha256 recomputed on the host by a short-lived container), with the shipping process's RSS
  growth (VmHWM after resetting it through /proc/self/clear_refs) and throughput of the transfer;
- a second ensure_on_host (must send nothing), then gc.

And one parallel round: all 3 hosts at once (as the daemon does). Targets: RSS growth <= 50 MB,
transfer throughput >= 0.8x docker cp's. Needs root and ~3x the size free on the disk of /tmp
and /var/lib/modelfleet-test (each copy is removed before the next).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "dev"))

import netns_hosts  # noqa: E402

from modelfleet.reconciler.artifacts.shipping import ArtifactShipper, volume_name  # noqa: E402
from modelfleet.reconciler.artifacts.store import ArtifactStore, ArtifactWriter  # noqa: E402
from modelfleet.reconciler.pool.adapter import HostClient  # noqa: E402
from modelfleet.state.pool import Capacity, Host, HostFlavor, HostLocation  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
HANDLER = b"from ts.torch_handler.base_handler import BaseHandler\n\nclass H(BaseHandler):\n    pass\n"


# --- measurements ----------------------------------------------------------------------------------


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss() -> int:
    """Reset VmHWM to the current RSS (Linux >= 4.0) and return the current RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def peak_rss() -> int:
    return _status("VmHWM")


# --- the artifact ------------------------------------------------------------------------------------


class _Sink:
    """A write-only, unseekable file object over an ArtifactWriter (zipfile then streams with data
    descriptors, so the archive is written and hashed in one pass)."""

    def __init__(self, writer: ArtifactWriter) -> None:
        self.writer = writer
        self.position = 0

    def write(self, data: bytes) -> int:
        self.writer.write(data)
        self.position += len(data)
        return len(data)

    def tell(self) -> int:
        return self.position

    def seekable(self) -> bool:
        return False

    def flush(self) -> None:
        pass


def make_artifact(store: ArtifactStore, size: int) -> tuple[str, int]:
    block = bytearray(__import__("os").urandom(64 * MiB))
    writer = store.writer()
    with zipfile.ZipFile(_Sink(writer), "w", compression=zipfile.ZIP_STORED) as zf:  # type: ignore[call-overload]
        zf.writestr("MAR-INF/MANIFEST.json", (
            '{"createdOn": "01/01/2026 00:00:00", "runtime": "python", "model": {"modelName": "bench", '
            '"serializedFile": "model.pt", "handler": "handler.py", "modelVersion": "1.0"}, '
            '"archiverVersion": "0.12.0"}'))
        zf.writestr("handler.py", HANDLER)
        with zf.open(zipfile.ZipInfo("model.pt"), "w", force_zip64=True) as entry:
            written = 0
            counter = 0
            while written < size:
                block[:8] = counter.to_bytes(8, "little")  # every block differs a little
                counter += 1
                part = memoryview(block)[: min(len(block), size - written)]
                entry.write(part)
                written += len(part)
    stored = writer.commit()
    return stored.ref, stored.size


# --- hosts -----------------------------------------------------------------------------------------


def client_for(host: netns_hosts.TestHost) -> HostClient:
    return HostClient(Host(name=host.name, url=host.docker_url,
                           location=HostLocation(name="bench", country="FR", continent="EU"),
                           flavors=[HostFlavor(name="cpu")], capacity=Capacity(cpus=2, memory="2Gi")),
                      timeout=120)


def docker_cp(host: netns_hosts.TestHost, source: Path) -> float:
    """Seconds for the docker CLI to copy ``source`` into a fresh volume of a created container."""
    client = host.client()
    volume = client.volumes.create("bench-cp")
    container = client.containers.create(netns_hosts.BUSYBOX_TAG, ["true"],
                                         volumes={volume.name: {"bind": "/model", "mode": "rw"}})
    try:
        started = time.monotonic()
        subprocess.run(["docker", "-H", host.docker_url, "cp", str(source), f"{container.id}:/model/bench.mar"],
                       check=True, capture_output=True)
        return time.monotonic() - started
    finally:
        container.remove(force=True)
        volume.remove(force=True)
        client.close()


def ship(shipper: ArtifactShipper, client: HostClient, origin: dict[str, Any]) -> tuple[str, float]:
    last = [0.0]

    def progress(sent: int, total: int) -> None:
        if time.monotonic() - last[0] > 5 or sent == total:
            last[0] = time.monotonic()
            print(f"    {client.name}: {sent / GiB:5.2f} / {total / GiB:.2f} GiB", flush=True)

    started = time.monotonic()
    volume = shipper.ensure_on_host(client, origin, netns_hosts.BUSYBOX_TAG, progress)
    return volume, time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=5.0)
    parser.add_argument("--prefix", default="mfs")
    parser.add_argument("--subnet-base", default="10.233")
    parser.add_argument("--chunk-mib", type=int, default=4)
    parser.add_argument("--skip-parallel", action="store_true")
    args = parser.parse_args(argv)
    size = int(args.size_gib * GiB)

    tmp_root = Path(tempfile.gettempdir())
    for where in (tmp_root, netns_hosts.BASE_DIR if netns_hosts.BASE_DIR.exists() else Path("/var/lib")):
        free = shutil.disk_usage(where).free
        print(f"free on {where}: {free / GiB:.1f} GiB")
        if free < 4 * size:
            print(f"not enough disk: need {4 * size / GiB:.1f} GiB free on {where}", file=sys.stderr)
            return 1

    work = Path(tempfile.mkdtemp(prefix="mf-bench-ship-"))
    hosts: list[netns_hosts.TestHost] = []
    results: list[str] = []
    try:
        t0 = time.monotonic()
        hosts = netns_hosts.start_hosts(3, args.prefix, args.subnet_base)
        for host in hosts:
            docker = host.client()
            netns_hosts.import_busybox_image(docker)
            docker.close()
        print(f"3 hosts up in {time.monotonic() - t0:.1f} s: {', '.join(h.docker_url for h in hosts)}")

        store = ArtifactStore(work / "state")
        t0 = time.monotonic()
        ref, total = make_artifact(store, size)
        print(f"artifact {ref[:19]}… {total / GiB:.2f} GiB written+hashed in {time.monotonic() - t0:.1f} s")
        source = store.path(ref)
        origin = {"file": {"sha256": ref}}

        rows = []
        for host in hosts:
            client = client_for(host)
            cp_seconds = docker_cp(host, source)
            shipper = ArtifactShipper(store, None, chunk_size=args.chunk_mib * MiB)
            shipper.mar_info(ref)  # validation (central directory only) outside the measured window
            base_rss = reset_peak_rss()
            volume, seconds = ship(shipper, client, origin)
            rss_growth = peak_rss() - base_rss
            transfer = shipper.transfers[-1]
            again_started = time.monotonic()
            assert shipper.ensure_on_host(client, origin, netns_hosts.BUSYBOX_TAG) == volume
            again = time.monotonic() - again_started
            fresh = ArtifactShipper(store, None)
            fresh_started = time.monotonic()
            fresh.ensure_on_host(client, origin, netns_hosts.BUSYBOX_TAG)
            fresh_again = time.monotonic() - fresh_started
            assert shipper.bytes_sent == total and fresh.bytes_sent == 0
            assert shipper.gc(client, keep=set()) == [volume_name(ref)]
            client.close()
            rows.append((host.name, total / cp_seconds, total / transfer.seconds, transfer.seconds, cp_seconds,
                         transfer.verify_seconds, transfer.verified_by, seconds, rss_growth, again, fresh_again))

        print()
        header = (f"{'host':8} {'docker cp':>12} {'ship':>12} {'ratio':>6} {'ship s':>7} {'cp s':>7} "
                  f"{'verify s':>9} {'total s':>8} {'RSS +MiB':>9} {'2nd s':>6} {'2nd(new) s':>10}")
        results.append(header)
        for name, cp_rate, rate, ship_s, cp_s, verify_s, verified_by, total_s, rss, again, fresh_again in rows:
            results.append(
                f"{name:8} {cp_rate / MiB:8.0f} MiB/s {rate / MiB:6.0f} MiB/s {rate / cp_rate:6.2f} {ship_s:7.1f} "
                f"{cp_s:7.1f} {verify_s:6.1f} ({verified_by}) {total_s:5.1f} {rss / MiB:9.1f} {again:6.3f} "
                f"{fresh_again:10.3f}")

        if not args.skip_parallel:
            shipper = ArtifactShipper(store, None, chunk_size=args.chunk_mib * MiB)
            clients = [client_for(h) for h in hosts]
            base_rss = reset_peak_rss()
            started = time.monotonic()
            with ThreadPoolExecutor(max_workers=3) as pool:
                list(pool.map(lambda c: ship(shipper, c, origin), clients))
            wall = time.monotonic() - started
            rss_growth = peak_rss() - base_rss
            transfer_wall = max(t.seconds for t in shipper.transfers)
            results.append(f"parallel to 3 hosts: {3 * total / GiB:.1f} GiB, transfers done in {transfer_wall:.1f} s "
                           f"({3 * total / transfer_wall / MiB:.0f} MiB/s aggregate), with verification "
                           f"{wall:.1f} s; RSS +{rss_growth / MiB:.1f} MiB")
            for client in clients:
                shipper.gc(client, keep=set())
                client.close()
        print("\n".join(results))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if hosts:
            with contextlib.suppress(Exception):
                netns_hosts.stop_hosts(args.prefix)


if __name__ == "__main__":
    raise SystemExit(main())
