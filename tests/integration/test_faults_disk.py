"""A full disk on a pool host: a real dockerd whose data root is a small tmpfs, filled to the last byte.

Shipping a model's artifact to it fails with ENOSPC from the kernel. The deployment's status names
the host and the volume; no partial volume is left behind (a volume without its completion marker is
never mounted as complete); the daemon keeps running; and once space is freed the next pass ships the
artifact and the deployment becomes ready.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import netns_hosts
import pytest
from netns_hosts import TestHost

from tests.integration.conftest import _prepare
from tests.integration.fleet import BASE_MANIFESTS, Fleet, echo_model, make_fleet, running
from tests.integration.test_faults_state import fill
from tests.integration.test_models import upload
from tests.reconciler.artifacts.archives import build_mar

pytestmark = pytest.mark.timeout(300)
PREFIXES = ("mfd", "mfda", "mfdb")
DATA_SIZE = "160m"  # the busybox and echo images, their layers and containers fit with room to spare
ARTIFACT_SIZE = 4 << 20


@pytest.fixture(scope="module")
def small_disk_host() -> Iterator[TestHost]:
    if reason := netns_hosts.check_prerequisites():
        pytest.fail(f"needs real dockerd hosts: {reason}", pytrace=False)
    for prefix in PREFIXES:
        try:
            [host] = netns_hosts.start_hosts(1, prefix, None, data_size=DATA_SIZE)
        except netns_hosts.HostsBusyError:
            continue
        break
    else:
        pytest.fail(f"all small-disk host prefixes are in use: {PREFIXES}")
    try:
        _prepare(host)
        yield host
    finally:
        netns_hosts.stop_hosts(prefix)


@pytest.fixture
def disk_fleet(small_disk_host: TestHost, tmp_path: Path) -> Iterator[Fleet]:
    fleet = make_fleet(tmp_path, [small_disk_host])
    fleet.push(BASE_MANIFESTS, "initial")
    with running(fleet):
        yield fleet


def artifact_volumes(host: TestHost) -> list[dict[str, Any]]:
    client = host.client()
    try:
        return [v.attrs for v in client.volumes.list(filters={"label": "modelfleet.artifact"})]
    finally:
        client.close()


def test_a_full_host_disk_fails_shipping_clearly_and_recovers_when_space_is_freed(
        disk_fleet: Fleet, small_disk_host: TestHost, tmp_path: Path) -> None:
    # A real .mar of a few MiB (random extra weights do not compress).
    weights = tmp_path / "weights.bin"
    weights.write_bytes(os.urandom(ARTIFACT_SIZE))
    digest = upload(disk_fleet, build_mar(tmp_path / "mar", extra=[weights]))
    # Full but for 1 MiB: the helper container is created, the copy of the archive runs out of space.
    filler = fill(small_disk_host.data_root)
    with open(filler, "r+b") as fh:
        fh.truncate(filler.stat().st_size - (1 << 20))
    try:
        revision = disk_fleet.push({"models/echo.yaml": echo_model(replicas=1, origin={"file": {"sha256": digest}})},
                                   "echo with weights")

        def failed() -> dict[str, Any] | None:
            d = disk_fleet.deployment("echo")
            return d if d.get("revision") == revision and "no space left" in (d.get("message") or "") else None

        deployment = disk_fleet.wait(failed, 90, "shipping fails with ENOSPC")
        message = deployment["message"]
        assert "mf-artifact-" in message and disk_fleet.host_names[0] in message, message
        # Nothing half-written stays: the partial volume is removed (a pass retrying at that very moment
        # may hold a new one for an instant, hence the wait), and no replica was created on it.
        disk_fleet.wait(lambda: artifact_volumes(small_disk_host) == [], 20, "no partial volume left")
        client = small_disk_host.client()
        try:
            assert client.containers.list(all=True, filters={"label": "modelfleet.model=echo"}) == []
        finally:
            client.close()
        assert disk_fleet.api("/healthz").status_code == 200  # the daemon is alive and well
        # The commit says so too.
        disk_fleet.wait(lambda: (n := disk_fleet.notes(revision)) and any(
            "no space left" in (v.get("description") or "") for v in n.values()) and n, 30, "the commit status")
    finally:
        with contextlib.suppress(FileNotFoundError):
            filler.unlink()
    disk_fleet.api("/api/v1/sync", method="POST")

    def ready() -> dict[str, Any] | None:
        d = disk_fleet.deployment("echo")
        return d if d.get("state") == "success" and d.get("ready_replicas") == 1 and disk_fleet.routed() else None

    disk_fleet.wait(ready, 90, "echo ready once space is freed")
    [volume] = artifact_volumes(small_disk_host)
    assert volume["Name"].startswith("mf-artifact-")
    answer = httpx.get(f"http://127.0.0.1:{disk_fleet.gateway_port}/models/echo/ping", timeout=10)
    assert answer.status_code == 200, answer.text
