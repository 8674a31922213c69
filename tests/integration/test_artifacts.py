"""Shipping artifacts to real Docker hosts (netns + dockerd each): a .mar and a HuggingFace snapshot.

The content inside the volumes is checked from a container; a second ensure_on_host sends nothing
(counted by the shipper and on the host's veth); each host gets its own copy; gc removes volumes
that are neither kept nor used.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
from netns_hosts import BUSYBOX_TAG, TestHost

from modelfleet.reconciler.artifacts.huggingface import HuggingFaceResolver
from modelfleet.reconciler.artifacts.shipping import (
    LABEL_ARTIFACT,
    MARKER,
    ArtifactShipper,
    artifact_id,
    model_binds,
    volume_name,
)
from modelfleet.reconciler.artifacts.store import ArtifactStore
from modelfleet.reconciler.pool.adapter import HostClient
from modelfleet.reconciler.pool.observe import observe
from modelfleet.state.desired import DesiredReplica
from modelfleet.state.pool import Capacity, Host, HostFlavor, HostLocation
from tests.reconciler.artifacts.archives import build_mar
from tests.reconciler.artifacts.hub_standin import FAKE_COMMIT, HubStandin, minilm_dir, minilm_repos

pytestmark = pytest.mark.timeout(120)
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def _client(host: TestHost) -> HostClient:
    return HostClient(Host(name=host.name, url=host.docker_url, location=HostLocation(name="lab", country="FR",
                                                                                      continent="EU"),
                           flavors=[HostFlavor(name="cpu")], capacity=Capacity(cpus=2, memory="2Gi")))


def _veth_tx(host: TestHost) -> int:
    """Bytes the root namespace sent towards the host (the daemon → dockerd direction)."""
    return int(Path(f"/sys/class/net/{host.veth}/statistics/tx_bytes").read_text())


def _run_in_volume(host: TestHost, volume: str, command: str) -> str:
    docker = host.client()
    try:
        out = docker.containers.run(BUSYBOX_TAG, ["sh", "-c", command], remove=True, network_disabled=True,
                                    volumes={volume: {"bind": "/model", "mode": "ro"}},
                                    labels={"modelfleet.managed": "true"})
        return out.decode()
    finally:
        docker.close()


def _files_in_volume(host: TestHost, volume: str) -> dict[str, bytes]:
    """Every file of the volume as a container mounting it sees it (copied out with the archive API)."""
    docker = host.client()
    container = docker.containers.create(BUSYBOX_TAG, ["true"], volumes={volume: {"bind": "/model", "mode": "ro"}},
                                         labels={"modelfleet.managed": "true"}, network_disabled=True)
    try:
        stream, _ = container.get_archive("/model/.")
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            return {m.name.split("/", 1)[1]: tar.extractfile(m).read()  # type: ignore[union-attr]
                    for m in tar.getmembers() if m.isfile()}
    finally:
        container.remove(force=True)
        docker.close()


def _remove_artifact_volumes(hosts: list[TestHost]) -> None:
    for host in hosts:
        docker = host.client()
        try:
            for volume in docker.volumes.list(filters={"label": LABEL_ARTIFACT}):
                volume.remove(force=True)
        finally:
            docker.close()


@pytest.fixture
def hosts(clean_hosts: list[TestHost]) -> Iterator[list[TestHost]]:
    _remove_artifact_volumes(clean_hosts)
    yield clean_hosts
    _remove_artifact_volumes(clean_hosts)


@pytest.fixture(scope="module")
def hub() -> Iterator[HubStandin]:
    repos, _ = minilm_repos()
    with HubStandin(repos) as standin:
        yield standin


def test_ship_mar_once_per_host_and_verify_inside(hosts: list[TestHost], tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "state")
    mar = build_mar(tmp_path / "mar")
    stored = store.ingest_file(mar)
    origin = {"file": {"sha256": stored.ref, "path": None}}
    shipper = ArtifactShipper(store, None)
    client = _client(hosts[0])
    reports: list[tuple[int, int]] = []

    volume = shipper.ensure_on_host(client, origin, BUSYBOX_TAG, progress=lambda s, t: reports.append((s, t)))

    assert volume == volume_name(stored.ref) and volume.startswith("mf-artifact-") and len(volume) == 36
    assert shipper.bytes_sent == stored.size
    assert reports[0] == (0, stored.size) and reports[-1] == (stored.size, stored.size)
    assert shipper.transfers[-1].verified_by == "sha256sum"  # busybox has no python3
    assert _run_in_volume(hosts[0], volume, "sha256sum /model/tiny.mar").split()[0] == stored.digest
    inside = _files_in_volume(hosts[0], volume)
    assert set(inside) == {"tiny.mar", MARKER}
    assert inside["tiny.mar"] == mar.read_bytes()
    marker = json.loads(inside[MARKER])
    assert marker["id"] == stored.ref and marker["model_name"] == "tiny"
    assert marker["files"] == [{"path": "tiny.mar", "size": stored.size, "sha256": stored.digest}]
    docker = hosts[0].client()
    labels = docker.volumes.get(volume).attrs["Labels"]
    docker.close()
    assert labels == {"modelfleet.artifact": stored.ref, "modelfleet.managed": "true",
                      "modelfleet.artifact-kind": "mar"}
    # What placement's locality sees: the host that holds it, and not the other one.
    seen = observe([client, _client(hosts[1])]).artifacts
    assert seen == {hosts[0].name: frozenset({stored.ref}), hosts[1].name: frozenset()}

    # Again, from this shipper and from a fresh one (no memory of the first): nothing is sent.
    before = _veth_tx(hosts[0])
    assert shipper.ensure_on_host(client, origin, BUSYBOX_TAG) == volume
    assert ArtifactShipper(store, None).ensure_on_host(client, origin, BUSYBOX_TAG) == volume
    assert shipper.bytes_sent == stored.size
    assert _veth_tx(hosts[0]) - before < 64 * 1024  # API calls only, no archive

    # Another host gets its own copy.
    other = ArtifactShipper(store, None)
    assert other.ensure_on_host(_client(hosts[1]), origin, BUSYBOX_TAG) == volume
    assert other.bytes_sent == stored.size
    assert _run_in_volume(hosts[1], volume, "sha256sum /model/tiny.mar").split()[0] == stored.digest


def test_ship_huggingface_snapshot(hosts: list[TestHost], hub: HubStandin, tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "state")
    resolver = HuggingFaceResolver(tmp_path / "state" / "huggingface", endpoint=hub.url, offline=False)
    commit = resolver.resolve(MINILM, "main")
    assert commit == FAKE_COMMIT
    origin = {"huggingface": {"model": MINILM, "revision": "main", "commit": commit}}
    shipper = ArtifactShipper(store, resolver)
    client = _client(hosts[0])

    volume = shipper.ensure_on_host(client, origin, BUSYBOX_TAG)

    source = minilm_dir()
    expected = {p.relative_to(source).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in source.rglob("*") if p.is_file()}
    inside = _files_in_volume(hosts[0], volume)
    assert json.loads(inside.pop(MARKER))["id"] == f"hf:{MINILM}@{FAKE_COMMIT}"
    assert {name: hashlib.sha256(data).hexdigest() for name, data in inside.items()} == expected
    assert shipper.bytes_sent == sum(p.stat().st_size for p in source.rglob("*") if p.is_file())
    env = shipper.container_env(origin)
    assert env["MODELFLEET_MODEL_DIR"] == "/model" and env["HF_HUB_OFFLINE"] == "1"
    assert model_binds(volume) == {volume: {"bind": "/model", "mode": "ro"}}
    assert hub.violations == []

    # A replica that mounts it read-only cannot change it.
    out = _run_in_volume(hosts[0], volume, "touch /model/x 2>&1; echo rc=$?")
    assert "Read-only file system" in out and "rc=1" in out


def test_prepare_volumes_hook_reports_progress(hosts: list[TestHost], tmp_path: Path) -> None:
    """What the Applier calls before creating a replica: binds for /model, shipping if needed."""
    store = ArtifactStore(tmp_path / "state")
    stored = store.ingest_file(build_mar(tmp_path / "mar", name="hooked"))
    seen: list[tuple[str, str, int, int]] = []
    shipper = ArtifactShipper(store, None, on_progress=lambda *args: seen.append(args))
    client = _client(hosts[1])
    replica = cast(DesiredReplica, SimpleNamespace(origin={"file": {"sha256": stored.digest, "path": "m/h.mar"}},
                                                   runtime=SimpleNamespace(image=BUSYBOX_TAG)))
    binds = shipper.prepare_volumes(client, replica)
    assert binds == {volume_name(stored.ref): {"bind": "/model", "mode": "ro"}}
    assert seen[0] == (hosts[1].name, stored.ref, 0, stored.size) and seen[-1][2:] == (stored.size, stored.size)
    assert shipper.prepare_volumes(client, cast(DesiredReplica, SimpleNamespace(origin=None))) is None
    assert shipper.container_env(replica.origin) == {
        "MODELFLEET_MODEL_DIR": "/model", "MODELFLEET_ARTIFACT": stored.ref,
        "MODELFLEET_MODEL_ARCHIVE": "/model/hooked.mar", "MODELFLEET_MODEL_NAME": "hooked"}


def test_concurrent_ensure_ships_once(hosts: list[TestHost], tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "state")
    stored = store.ingest_file(build_mar(tmp_path / "mar", name="twice"))
    origin = {"file": {"sha256": stored.ref}}
    shipper = ArtifactShipper(store, None)
    client = _client(hosts[2])
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(shipper.ensure_on_host(client, origin, BUSYBOX_TAG)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [volume_name(stored.ref)] * 4
    assert shipper.bytes_sent == stored.size
    assert len(shipper.transfers) == 1


def test_interrupted_transfer_is_redone_and_gc(hosts: list[TestHost], tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "state")
    a = store.ingest_file(build_mar(tmp_path / "a", name="alpha"))
    b = store.ingest_file(build_mar(tmp_path / "b", name="beta", version="2.0"))
    origin_a, origin_b = {"file": {"sha256": a.ref}}, {"file": {"sha256": b.ref}}
    client = _client(hosts[0])
    docker = hosts[0].client()
    try:
        # A volume left by a transfer that died before its marker: not complete, shipped again.
        docker.volumes.create(volume_name(a.ref), labels={LABEL_ARTIFACT: a.ref, "modelfleet.managed": "true"})
        shipper = ArtifactShipper(store, None)
        vol_a = shipper.ensure_on_host(client, origin_a, BUSYBOX_TAG)
        assert shipper.bytes_sent == a.size
        vol_b = shipper.ensure_on_host(client, origin_b, BUSYBOX_TAG)
        # A container uses vol_b: gc keeps it even when not asked to.
        user = docker.containers.create(BUSYBOX_TAG, ["true"], volumes={vol_b: {"bind": "/model", "mode": "ro"}},
                                        labels={"modelfleet.managed": "true"})
        foreign = docker.volumes.create("not-ours")  # never touched: no modelfleet labels
        assert shipper.gc(client, keep={artifact_id(origin_a)}) == []
        assert shipper.gc(client, keep=set()) == [vol_a]
        user.remove(force=True)
        assert shipper.gc(client, keep=set()) == [vol_b]
        names = {v.name for v in docker.volumes.list()}
        assert vol_a not in names and vol_b not in names and "not-ours" in names
        foreign.remove()
        # After gc, ensure ships again.
        shipper.ensure_on_host(client, origin_a, BUSYBOX_TAG)
        assert shipper.bytes_sent == 2 * a.size + b.size
        assert not docker.containers.list(all=True, filters={"label": "modelfleet.artifact-helper"})
    finally:
        docker.close()
