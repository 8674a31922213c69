"""Faults of the daemon's own state, on real dockerd hosts: a full stateDir, a corrupt store.

The daemon keeps the last good state running (containers, gateway, routes), says why in
/api/v1/status, never crashes, never removes a container it cannot prove it owns, and recovers by
itself once the fault is gone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from netns_hosts import TestHost

from tests.integration.fleet import BASE_MANIFESTS, Fleet, echo_model, make_fleet, running

TMPFS_SIZE = "2m"
MARKER = ".modelfleet-faults-tmpfs"  # inside each tmpfs this file mounts, to find leftovers of an aborted run


def _mounts() -> list[tuple[str, str]]:
    """(mount point, fs type) of every mount, as the kernel lists them."""
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3:
            found.append((fields[1].replace("\\040", " "), fields[2]))
    return found


def _unmount(path: str | Path) -> None:
    # Lazy: a process of an aborted run may still hold a file open in it.
    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def _remove_leftover_mounts() -> None:
    for point, fstype in _mounts():
        if fstype == "tmpfs" and os.path.exists(os.path.join(point, MARKER)):
            _unmount(point)


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = TMPFS_SIZE) -> Iterator[Path]:
    _remove_leftover_mounts()
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs at {path}: {result.stderr.strip()}", pytrace=False)
    try:
        (path / MARKER).write_text("tests/integration/test_faults_state.py\n")
        yield path
    finally:
        _unmount(path)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem has not one byte left."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as fh:
        chunk = 1 << 16
        while chunk >= 1:
            try:
                fh.write(b"\0" * chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                chunk //= 2
    return filler


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def gateway_pid(fleet: Fleet) -> int:
    return int((fleet.state_dir / "gateway.pid").read_text().strip())


def ready(fleet: Fleet, revision: str | None = None, replicas: int = 1) -> bool:
    d = fleet.deployment("echo")
    return (d.get("state") == "success" and (revision is None or d.get("revision") == revision)
            and d.get("ready_replicas") == replicas and fleet.routed())


def answers(fleet: Fleet, version: str) -> bool:
    response = fleet.call("echo", "/")
    return response.status_code == 200 and response.json().get("version") == version


def failed_for_lack_of_space(fleet: Fleet) -> dict[str, Any] | None:
    status = fleet.status()
    last = status.get("lastPass") or {}
    if last.get("result") != "failed":
        return None
    why = f"{last.get('error', '')} {status.get('sourceError') or ''}".lower()
    return status if ("disk full" in why or "no space left" in why) else None


def quick_check(fleet: Fleet) -> list[str]:
    db = sqlite3.connect(f"{(fleet.state_dir / 'modelfleet.db').as_uri()}?mode=ro", uri=True)
    try:
        return [row[0] for row in db.execute("PRAGMA quick_check").fetchall()]
    finally:
        db.close()


@pytest.fixture
def full_disk_fleet(clean_hosts: list[TestHost], tmp_path: Path) -> Iterator[Fleet]:
    fleet = make_fleet(tmp_path, clean_hosts)
    with small_tmpfs(fleet.state_dir):
        fleet.push({**BASE_MANIFESTS, "models/echo.yaml": echo_model(replicas=1)}, "initial")
        with running(fleet):
            yield fleet


def test_a_full_state_dir_fails_the_pass_cleanly_keeps_serving_and_recovers(full_disk_fleet: Fleet) -> None:
    fleet = full_disk_fleet
    fleet.wait(lambda: ready(fleet) and answers(fleet, "v1"), 30, "echo v1 ready")
    assert fleet.process is not None
    gateway = gateway_pid(fleet)
    containers = {c["id"] for c in fleet.containers()}

    filler = fill(fleet.state_dir)
    revision = fleet.push({"models/echo.yaml": echo_model(replicas=1, version="v2")}, "echo v2")  # a watch pass
    status = fleet.wait(lambda: failed_for_lack_of_space(fleet), 30, "a pass that fails for the full disk")
    assert status["lastPass"]["store"]["path"].endswith("modelfleet.db")
    # A second pass on the full disk (a pass that cannot record itself must not end the loop either).
    first = status["lastPass"]["finishedAt"]
    fleet.api("/api/v1/sync", method="POST")
    fleet.wait(lambda: (s := failed_for_lack_of_space(fleet)) and s["lastPass"]["finishedAt"] > first, 30,
               "another failed pass")
    # An upload meanwhile is refused with 507, and leaves nothing behind in the artifact store.
    upload = fleet.api("/api/v1/artifacts?name=blob.bin", method="PUT", content=os.urandom(256 << 10))
    assert upload.status_code == 507, upload.text
    assert "disk full" in upload.json()["error"]
    assert list((fleet.state_dir / "artifacts" / "sha256").iterdir()) == []
    # The last good state keeps running: the daemon, its gateway, the replica, the route.
    assert fleet.process.poll() is None, fleet.log()
    assert alive(gateway) and gateway_pid(fleet) == gateway
    assert answers(fleet, "v1")
    assert {c["id"] for c in fleet.containers()} == containers
    assert fleet.deployment("echo").get("revision") != revision

    filler.unlink()  # space is back: the next pass (a retry, the poll, or this sync) converges
    fleet.api("/api/v1/sync", method="POST")
    fleet.wait(lambda: ready(fleet, revision) and answers(fleet, "v2"), 60, "echo v2 after space was freed")
    last = fleet.wait(lambda: (s := fleet.status()).get("lastPass", {}).get("result") == "ok" and s["lastPass"],
                      30, "a clean pass")
    assert last["store"]["ok"] is True and last["store"]["error"] is None
    assert fleet.status()["sourceError"] is None
    assert alive(gateway) and fleet.process.poll() is None
    assert quick_check(fleet) == ["ok"]
    statuses = fleet.wait(lambda: fleet.notes(revision).get("modelfleet/production/echo", {}).get("state")
                          == "success", 20, "the commit's status once the disk had room")
    assert statuses


def test_a_corrupt_store_is_moved_aside_and_no_container_it_cannot_prove_it_owns_is_removed(
        clean_hosts: list[TestHost], tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, clean_hosts)
    fleet.push({**BASE_MANIFESTS, "models/echo.yaml": echo_model(replicas=2)}, "initial")
    with running(fleet):
        fleet.wait(lambda: ready(fleet, replicas=2) and answers(fleet, "v1"), 30, "echo v1 ready")
    fleet.kill_gateway()
    v1 = {c["id"] for c in fleet.containers()}
    assert len(v1) == 2
    # While the daemon is away: the store is damaged, and a new version is pushed. Its v1 containers
    # are no longer in any inventory: they match nothing desired, so nothing may remove them.
    store = fleet.state_dir / "modelfleet.db"
    store.write_bytes(os.urandom(store.stat().st_size or 8192))
    revision = fleet.push({"models/echo.yaml": echo_model(replicas=2, version="v2")}, "echo v2")
    with running(fleet):
        fleet.wait(lambda: ready(fleet, revision, replicas=2) and answers(fleet, "v2"), 60, "echo v2 ready")
        recovered = fleet.status()["lastPass"]["store"]["recovered"]
        assert recovered and "corrupt" in recovered and "never removed" in recovered
        assert list(fleet.state_dir.glob("modelfleet.db.corrupt-*"))
        found = {c["id"]: c for c in fleet.containers()}
        assert v1 <= set(found), "a container the daemon could not prove it owns was removed"
        assert {found[i]["labels"]["modelfleet.revision"] for i in set(found) - v1} == {revision}
        assert quick_check(fleet) == ["ok"]


def test_a_store_deleted_while_the_daemon_runs_is_written_back(clean_hosts: list[TestHost],
                                                               tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, clean_hosts)
    fleet.push({**BASE_MANIFESTS, "models/echo.yaml": echo_model(replicas=1)}, "initial")
    with running(fleet):
        fleet.wait(lambda: ready(fleet) and answers(fleet, "v1"), 30, "echo v1 ready")
        before = {c["id"] for c in fleet.containers()}
        for leftover in fleet.state_dir.glob("modelfleet.db*"):
            leftover.unlink()
        fleet.api("/api/v1/sync", method="POST")
        fleet.wait(lambda: "deleted" in (fleet.status().get("lastPass", {}).get("store", {}).get("recovered") or ""),
                   20, "the store written back")
        assert (fleet.state_dir / "modelfleet.db").exists() and quick_check(fleet) == ["ok"]
        revision = fleet.push({"models/echo.yaml": echo_model(replicas=1, version="v2")}, "echo v2")
        # The inventory survived: the v1 replica is replaced blue-green (it is known to be ours), not left behind.
        fleet.wait(lambda: ready(fleet, revision) and answers(fleet, "v2"), 60, "echo v2 ready")
        fleet.wait(lambda: not ({c["id"] for c in fleet.containers()} & before), 20, "v1 replaced")
