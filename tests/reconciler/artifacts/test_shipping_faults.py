"""Shipping onto a host whose disk fills up midway: a clear error naming host and volume, no
volume ever holds the completion marker of a partial copy (none is kept at all), and once space is
freed the next attempt ships it whole."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from modelfleet.reconciler.artifacts import shipping
from modelfleet.reconciler.artifacts.errors import ShippingError
from modelfleet.reconciler.artifacts.shipping import MARKER, ArtifactPlan, ArtifactShipper, ShipFile
from modelfleet.reconciler.errors import DockerOperationError
from modelfleet.reconciler.pool.adapter import HostClient
from modelfleet.state.pool import Host

ARTIFACT = "sha256:" + "ab" * 32


class FakeDisk:
    """A host's volumes (name -> files), with a capacity in bytes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.volumes: dict[str, dict[str, bytes]] = {}
        self.labels: dict[str, dict[str, str]] = {}
        self.helpers: dict[str, str] = {}  # container -> volume

    def used(self) -> int:
        return sum(len(data) for files in self.volumes.values() for data in files.values())


class FakeOps:
    """ArtifactHostOps on a FakeDisk: put_archive writes files as the tar streams in, and fails with
    Docker's error once the disk is full (what was written so far stays, as on a real disk)."""

    disks: dict[str, FakeDisk] = {}

    def __init__(self, client: HostClient) -> None:
        self.client = client
        self.disk = self.disks[client.name]

    def inspect_volume(self, name: str) -> dict[str, Any] | None:
        if name not in self.disk.volumes:
            return None
        return {"Name": name, "Labels": self.disk.labels[name], "CreatedAt": f"t{id(self.disk.volumes[name])}"}

    def create_volume(self, name: str, labels: dict[str, str]) -> dict[str, Any]:
        self.disk.volumes[name] = {}
        self.disk.labels[name] = labels
        return self.inspect_volume(name) or {}

    def remove_volume(self, name: str) -> bool:
        if name in self.disk.helpers.values():
            return False
        self.disk.labels.pop(name, None)
        return self.disk.volumes.pop(name, None) is not None

    def create_helper(self, image: str, volume: str, artifact: str, **_: Any) -> str:
        container = f"helper-{len(self.disk.helpers)}-{volume}"
        self.disk.helpers[container] = volume
        return container

    def remove(self, container: str) -> None:
        self.disk.helpers.pop(container, None)

    def put_archive(self, container: str, data: Any) -> None:
        raw = bytearray()
        for chunk in data if not isinstance(data, bytes) else [data]:
            raw += bytes(chunk)
        files = self.disk.volumes[self.disk.helpers[container]]
        with tarfile.open(fileobj=io.BytesIO(bytes(raw))) as tar:
            for member in tar.getmembers():
                if not member.isfile():
                    continue
                content = tar.extractfile(member)
                assert content is not None
                payload = content.read()
                room = self.disk.capacity - self.disk.used()
                if len(payload) > room:
                    files[member.name] = payload[:room]  # the partial file stays on disk
                    raise DockerOperationError(self.client.name, "copy artifact",
                                               f"write /model/{member.name}: no space left on device")
                files[member.name] = payload

    def read_file(self, container: str, path: str, limit: int = 1 << 20) -> bytes | None:
        return self.disk.volumes[self.disk.helpers[container]].get(path.removeprefix("/model/"))

    def stat(self, container: str, path: str) -> dict[str, Any] | None:
        data = self.disk.volumes[self.disk.helpers[container]].get(path.removeprefix("/model/"))
        return None if data is None else {"size": len(data)}


def client(name: str) -> HostClient:
    return HostClient(Host.model_validate({
        "name": name, "url": "tcp://127.0.0.1:1", "location": {"name": "x", "country": "FR", "continent": "EU"},
        "flavors": [{"name": "cpu", "type": "cpu"}], "capacity": {"cpus": 2, "memory": "2Gi"}}))


@pytest.fixture
def shipper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ArtifactShipper:
    model = tmp_path / "model.mar"
    model.write_bytes(b"m" * 100_000)
    plan = ArtifactPlan(ARTIFACT, "mar", (ShipFile("model.mar", model, 100_000, "ab" * 32),))
    monkeypatch.setattr(shipping, "ArtifactHostOps", FakeOps)
    shipper = ArtifactShipper(store=None, hf_resolver=None, verify="size", chunk_size=4096)  # type: ignore[arg-type]
    monkeypatch.setattr(shipper, "plan", lambda origin: plan)
    return shipper


def test_a_full_disk_fails_the_copy_naming_host_and_volume_and_keeps_no_half_volume(
        shipper: ArtifactShipper) -> None:
    disk = FakeOps.disks["par-0"] = FakeDisk(capacity=60_000)
    volume = shipping.volume_name(ARTIFACT)
    with pytest.raises(ShippingError) as caught:
        shipper.ensure_on_host(client("par-0"), {"file": {"sha256": "ab" * 32}}, "runtime:latest")
    message = str(caught.value)
    assert f"volume {volume} on host par-0" in message
    assert "no space left on device" in message and "disk full on host par-0" in message
    assert "the next pass ships it again" in message
    # The partial copy is gone (its space given back), and no marker was ever written.
    assert volume not in disk.volumes
    assert disk.used() == 0
    assert not shipper.transfers


def test_after_space_is_freed_the_next_attempt_ships_it_whole(shipper: ArtifactShipper) -> None:
    disk = FakeOps.disks["par-0"] = FakeDisk(capacity=60_000)
    host = client("par-0")
    origin = {"file": {"sha256": "ab" * 32}}
    with pytest.raises(ShippingError):
        shipper.ensure_on_host(host, origin, "runtime:latest")
    disk.capacity = 1 << 20  # space freed
    volume = shipper.ensure_on_host(host, origin, "runtime:latest")
    files = disk.volumes[volume]
    assert files["model.mar"] == b"m" * 100_000
    marker = json.loads(files[MARKER])
    assert marker["id"] == ARTIFACT and marker["files"] == [{"path": "model.mar", "size": 100_000,
                                                             "sha256": "ab" * 32}]


def test_a_leftover_volume_without_marker_is_never_taken_as_complete(shipper: ArtifactShipper) -> None:
    disk = FakeOps.disks["fra-1"] = FakeDisk(capacity=1 << 20)
    volume = shipping.volume_name(ARTIFACT)
    # What an interrupted copy (a daemon killed midway) leaves: the volume, part of the file, no marker.
    disk.volumes[volume] = {"model.mar": b"m" * 10}
    disk.labels[volume] = {"modelfleet.managed": "true", "modelfleet.artifact": ARTIFACT}
    assert shipper.ensure_on_host(client("fra-1"), {"file": {"sha256": "ab" * 32}}, "runtime:latest") == volume
    assert disk.volumes[volume]["model.mar"] == b"m" * 100_000
    assert MARKER in disk.volumes[volume]


def test_a_full_disk_while_writing_the_marker_leaves_no_volume(shipper: ArtifactShipper) -> None:
    disk = FakeOps.disks["vir-2"] = FakeDisk(capacity=100_000 + 10)  # the model fits, its marker does not
    with pytest.raises(ShippingError) as caught:
        shipper.ensure_on_host(client("vir-2"), {"file": {"sha256": "ab" * 32}}, "runtime:latest")
    assert f"writing its completion marker {MARKER}" in str(caught.value)
    assert "host vir-2" in str(caught.value)
    assert disk.volumes == {}
