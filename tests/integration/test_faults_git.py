"""Faults of the Git source, with the daemon on real dockerd hosts: the remote unreachable (a
`git daemon` in a network namespace of its own whose link goes down), a force-pushed branch, a
deleted branch, a damaged local mirror. In each, what runs keeps running, drift is still repaired,
/api/v1/status says why, and the daemon recovers by itself."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import netns_hosts
import pytest
from netns_hosts import TestHost

from tests.integration.fleet import BASE_MANIFESTS, Fleet, echo_model, git, make_fleet, running, statuses_of
from tests.reconciler.source.helpers import damage_objects

NETNS_PREFIX = "mfgit"  # this file's namespaces: mfgit<pid of the test run>
GIT_PORT = 9418


def ready(fleet: Fleet, revision: str | None = None, replicas: int = 2) -> bool:
    d = fleet.deployment("echo")
    return (d.get("state") == "success" and d.get("ready_replicas") == replicas
            and (revision is None or d.get("revision") == revision) and fleet.routed())


def running_echo(fleet: Fleet) -> list[dict[str, Any]]:
    return [c for c in fleet.containers() if c["labels"]["modelfleet.model"] == "echo" and c["state"] == "running"]


def remove_one_replica(fleet: Fleet) -> str:
    victim = running_echo(fleet)[0]
    client = fleet.hosts[fleet.host_names.index(str(victim["host"]))].client()
    try:
        client.api.remove_container(victim["id"], force=True)
    finally:
        client.close()
    return str(victim["id"])


# --- a git remote in a network namespace ----------------------------------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def _remove_namespace(name: str) -> None:
    """Everything of one namespace of ours: its processes, its veth, the namespace."""
    pids = _ip("netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _ip("link", "del", name, check=False)  # the root end (named like the namespace) takes its peer along
    _ip("netns", "del", name, check=False)


def _remove_leftovers() -> None:
    """Namespaces of earlier runs that were killed before their finalizer (their pid is gone)."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        match = re.match(rf"({NETNS_PREFIX}(\d+))\b", line)
        if match and not Path(f"/proc/{match.group(2)}").exists():
            _remove_namespace(match.group(1))
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        match = re.match(rf"\d+: ({NETNS_PREFIX}(\d+))[@:]", line)
        if match and not Path(f"/proc/{match.group(2)}").exists():
            _ip("link", "del", match.group(1), check=False)


@dataclass
class GitRemote:
    """`git daemon` serving a directory's bare repositories from its own namespace."""

    netns: str
    veth: str  # root side
    address: str  # namespace side
    subnet: str
    process: subprocess.Popen[bytes]

    def url(self, repository: str) -> str:
        return f"git://{self.address}:{GIT_PORT}/{repository}"

    def cut(self) -> None:
        """The link goes down. The unreachable route keeps packets from leaking to the default
        gateway: git fails at once with "No route to host" rather than after its timeout."""
        _ip("link", "set", self.veth, "down")
        _ip("route", "add", "unreachable", self.subnet)

    def restore(self) -> None:
        _ip("route", "del", "unreachable", self.subnet, check=False)
        _ip("link", "set", self.veth, "up")

    def answers(self) -> bool:
        probe = subprocess.run(["git", "ls-remote", self.url("origin.git")], capture_output=True, timeout=10,
                               check=False)
        return probe.returncode == 0


@contextlib.contextmanager
def git_remote(base: Path) -> Iterator[GitRemote]:
    _remove_leftovers()
    name = f"{NETNS_PREFIX}{os.getpid()}"
    _remove_namespace(name)  # a leftover of this very pid (an earlier test that was interrupted)
    subnet_base = netns_hosts.pick_subnet_base(1, first=200, last=230)
    root_addr, ns_addr, subnet = f"{subnet_base}.0.1", f"{subnet_base}.0.2", f"{subnet_base}.0.0/24"
    process = None
    try:
        _ip("netns", "add", name)
        _ip("link", "add", name, "type", "veth", "peer", "name", "eth0", "netns", name)
        _ip("addr", "add", f"{root_addr}/24", "dev", name)
        _ip("link", "set", name, "up")
        in_ns = ["nsenter", f"--net=/var/run/netns/{name}"]
        for args in (["addr", "add", f"{ns_addr}/24", "dev", "eth0"], ["link", "set", "lo", "up"],
                     ["link", "set", "eth0", "up"]):
            subprocess.run([*in_ns, "ip", *args], check=True, capture_output=True)
        process = subprocess.Popen(
            [*in_ns, "git", "daemon", "--reuseaddr", "--export-all", "--enable=receive-pack",
             f"--base-path={base}", f"--listen={ns_addr}", f"--port={GIT_PORT}", str(base)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(base / "git-daemon.log", "wb"),  # noqa: SIM115
            start_new_session=True)
        remote = GitRemote(name, name, ns_addr, subnet, process)
        deadline = time.monotonic() + 15
        while not remote.answers():
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("git daemon did not answer: " + (base / "git-daemon.log").read_text())
            time.sleep(0.1)
        yield remote
    finally:
        _ip("route", "del", "unreachable", subnet, check=False)
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        _remove_namespace(name)


@pytest.fixture
def remote_fleet(clean_hosts: list[TestHost], tmp_path: Path) -> Iterator[tuple[Fleet, GitRemote]]:
    """A fleet whose daemon fetches over git:// from a git daemon in its own namespace."""
    fleet = make_fleet(tmp_path, clean_hosts)
    with git_remote(tmp_path) as remote:
        fleet = make_fleet_with_url(fleet, remote.url("origin.git"))
        fleet.push({**BASE_MANIFESTS, "models/echo.yaml": echo_model()}, "initial")
        with running(fleet):
            yield fleet, remote


def make_fleet_with_url(fleet: Fleet, url: str) -> Fleet:
    import yaml

    config = yaml.safe_load(fleet.config_path.read_text())
    # A fetch open when the link goes down waits for fetchTimeout: short, so the test does not.
    config["repo"] = {"url": url, "branch": "main", "pollInterval": "1s", "fetchTimeout": "5s", "watch": False}
    fleet.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return fleet


@pytest.fixture
def fleet(clean_hosts: list[TestHost], tmp_path: Path) -> Iterator[Fleet]:
    fleet = make_fleet(tmp_path, clean_hosts)
    fleet.push({**BASE_MANIFESTS, "models/echo.yaml": echo_model()}, "initial")
    with running(fleet):
        yield fleet


# --- the tests ------------------------------------------------------------------------------------


def test_unreachable_remote_keeps_repairing_drift_and_catches_up_when_back(
        remote_fleet: tuple[Fleet, GitRemote]) -> None:
    fleet, remote = remote_fleet
    first = fleet.wait(lambda: ready(fleet) and fleet.status()["revision"], 40, "echo ready")
    remote.cut()
    try:
        fleet.api("/api/v1/sync", method="POST")
        # A git connection open when the link went down (a fetch, a notes push: passes are every
        # second) waits for repo.fetchTimeout (5 s here); new connections fail at once.
        status = fleet.wait(lambda: (s := fleet.status()).get("sourceError") and s, 60, "sourceError")
        error = status["sourceError"]
        assert error.startswith("git remote unreachable since "), error
        assert ("No route to host" in error or "unable to connect" in error
                or "no answer within 5 s (fetch killed; the limit is repo.fetchTimeout)" in error), error
        [condition] = status["conditions"]
        assert (condition["type"], condition["status"], condition["reason"]) == ("SourceSynced", "False",
                                                                                 "RemoteUnreachable")
        assert status["revision"] == first
        # Drift repair goes on: a replica removed during the outage is recreated.
        removed = remove_one_replica(fleet)
        fleet.api("/api/v1/sync", method="POST")
        fleet.wait(lambda: len(running_echo(fleet)) == 2 and removed not in {c["id"] for c in running_echo(fleet)},
                   30, "replica recreated during the outage")
        fleet.wait(lambda: ready(fleet, first), 30, "echo ready again")
        assert fleet.status()["sourceError"] == error  # same since-time, pass after pass
        # A push the daemon cannot see yet; a restart during the outage keeps the since-time.
        newer = fleet.push({"models/echo.yaml": echo_model(version="v2")}, "v2")
        fleet.stop()
        fleet.start()
        status = fleet.wait(lambda: (s := fleet.status()).get("sourceError") and s, 20, "sourceError after restart")
        since = re.compile(r"since (\S+Z): ")
        assert since.findall(status["sourceError"]) == since.findall(error), (status["sourceError"], error)
        assert status["revision"] == first
    finally:
        remote.restore()
    fleet.wait(lambda: ready(fleet, newer), 40, "caught up with the new head")
    status = fleet.status()
    assert status["sourceError"] is None and status["conditions"][0]["reason"] == "Synced"
    assert {c["labels"]["modelfleet.revision"] for c in running_echo(fleet)} == {newer}
    # The statuses reach the remote again: the new commit's, and the old one's source status resolved.
    fleet.wait(lambda: statuses_of(fleet, newer).get("modelfleet") == "success", 20, "success on the new head")
    notes = fleet.wait(lambda: statuses_of(fleet, first).get("modelfleet/source") == "success" and fleet.notes(first),
                       20, "source status resolved on the old commit")
    assert "failed from" in notes["modelfleet/source"]["description"]


def test_force_push_to_an_older_or_unrelated_commit_converges_on_the_new_head(fleet: Fleet) -> None:
    first = fleet.wait(lambda: ready(fleet) and fleet.status()["revision"], 40, "echo v1 ready")
    second = fleet.push({"models/echo.yaml": echo_model(version="v2")}, "v2")
    fleet.wait(lambda: ready(fleet, second), 40, "echo v2 ready")
    # History rewritten to an older commit.
    rewound_at = time.time()
    git(fleet.work, "push", "-q", "--force", "origin", f"{first}:refs/heads/main")
    fleet.wait(lambda: ready(fleet, first), 40, "back on the older commit")
    assert {c["labels"]["modelfleet.revision"] for c in running_echo(fleet)} == {first}
    assert fleet.call("echo", "/").json()["version"] == "v1"
    notes = fleet.wait(lambda: statuses_of(fleet, first).get("modelfleet/production/echo") == "success"
                       and fleet.notes(first), 20, "statuses on the older commit")
    written = notes["modelfleet/production/echo"]["updated_at"]
    assert written > time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(rewound_at - 1)), written
    # Rewritten to an unrelated history.
    git(fleet.work, "checkout", "-q", "--orphan", "rewritten")
    git(fleet.work, "rm", "-rfq", ".")
    fleet.write({**BASE_MANIFESTS, "models/echo.yaml": echo_model(version="v3")})
    git(fleet.work, "add", "-A")
    git(fleet.work, "commit", "-q", "-m", "unrelated")
    unrelated = git(fleet.work, "rev-parse", "HEAD")
    git(fleet.work, "push", "-q", "--force", "origin", "HEAD:refs/heads/main")
    fleet.wait(lambda: ready(fleet, unrelated), 40, "on the unrelated commit")
    assert fleet.call("echo", "/").json()["version"] == "v3"
    fleet.wait(lambda: statuses_of(fleet, unrelated).get("modelfleet") == "success", 20, "statuses on it")


def test_deleted_branch_names_branch_and_remote_and_keeps_repairing(fleet: Fleet) -> None:
    first = fleet.wait(lambda: ready(fleet) and fleet.status()["revision"], 40, "echo ready")
    git(fleet.origin, "update-ref", "-d", "refs/heads/main")
    fleet.api("/api/v1/sync", method="POST")
    status = fleet.wait(lambda: (s := fleet.status()).get("sourceError") and s, 20, "sourceError")
    error = status["sourceError"]
    assert error.startswith(f"branch 'main' not found on remote {fleet.origin}"), error
    assert status["conditions"][0]["reason"] == "BranchMissing" and status["revision"] == first
    # On the commit too (the remote is reachable: the notes get there).
    notes = fleet.wait(lambda: statuses_of(fleet, first).get("modelfleet/source") == "error" and fleet.notes(first),
                       20, "source status on the commit")
    assert "not found on remote" in notes["modelfleet/source"]["description"]
    removed = remove_one_replica(fleet)
    fleet.api("/api/v1/sync", method="POST")
    fleet.wait(lambda: len(running_echo(fleet)) == 2 and removed not in {c["id"] for c in running_echo(fleet)},
               30, "replica recreated while the branch is missing")
    # The branch comes back with a new commit.
    newer = fleet.push({"models/echo.yaml": echo_model(version="v2")}, "v2")
    fleet.wait(lambda: ready(fleet, newer), 40, "on the new head")
    assert fleet.status()["sourceError"] is None


def test_damaged_mirror_is_fetched_afresh_without_touching_what_runs(fleet: Fleet) -> None:
    fleet.wait(lambda: ready(fleet), 40, "echo ready")
    before = {c["id"] for c in running_echo(fleet)}
    fleet.stop()
    mirror = fleet.state_dir / "repo.git"
    assert damage_objects(mirror) > 0
    fleet.start()
    status = fleet.wait(lambda: (s := fleet.status()).get("sourceRecovery") and s, 20, "recovery reported")
    assert "damaged" in status["sourceRecovery"] and "afresh" in status["sourceRecovery"]
    assert "damaged" in fleet.log()  # and logged
    fleet.wait(lambda: ready(fleet), 30, "echo ready")
    assert {c["id"] for c in running_echo(fleet)} == before  # nothing was churned
    # HEAD deleted while the daemon runs: found at the next fetch.
    (mirror / "HEAD").unlink()
    newer = fleet.push({"models/echo.yaml": echo_model(version="v2")}, "v2")
    fleet.wait(lambda: ready(fleet, newer), 40, "on the new head")
    assert (mirror / "HEAD").is_file()
