"""The daemon end to end on three real dockerd hosts: git push → containers → gateway → statuses."""

from __future__ import annotations

import hashlib
import hmac
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from netns_hosts import TestHost

from tests.integration.fleet import BASE_MANIFESTS, Fleet, echo_model, make_fleet, running, statuses_of


@pytest.fixture
def fleet(clean_hosts: list[TestHost], tmp_path: Path) -> Iterator[Fleet]:
    fleet = make_fleet(tmp_path, clean_hosts)
    fleet.push({**BASE_MANIFESTS, "models/echo.yaml": echo_model()}, "initial")
    with running(fleet):
        yield fleet


def ready(fleet: Fleet, model: str, environment: str = "production", revision: str | None = None) -> bool:
    """Ready in the daemon's status, and the gateway routes to it."""
    d = fleet.deployment(model, environment)
    return d.get("state") == "success" and (revision is None or d.get("revision") == revision) and fleet.routed()


class RequestLoop:
    """A steady request loop through the gateway on its own thread; counts failures."""

    def __init__(self, fleet: Fleet, model: str = "echo") -> None:
        self.fleet, self.model = fleet, model
        self.ok = 0
        self.failures: list[str] = []
        self.versions: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(trust_env=False) as client:
            deadline = time.monotonic() + 120  # bounded even if the test forgets to stop it
            while not self._stop.is_set() and time.monotonic() < deadline:
                response = self.fleet.call(self.model, "/", client=client)
                if response.status_code == 200:
                    self.ok += 1
                    self.versions.append(response.json().get("version", "?"))
                else:
                    self.failures.append(f"{response.status_code} {response.text[:200]}")
                time.sleep(0.005)

    def __enter__(self) -> RequestLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def test_first_deploy_places_only_on_eligible_hosts_and_reports_success(fleet: Fleet) -> None:
    revision = fleet.wait(lambda: ready(fleet, "echo") and fleet.status()["revision"], 30, "echo ready")
    containers = fleet.containers()
    # production is eu-only: paris and frankfurt, never virginia; two replicas spread over both.
    assert sorted(c["host"] for c in containers) == sorted(fleet.host_names[:2])
    for c in containers:
        assert c["labels"]["modelfleet.model"] == "echo"
        assert c["labels"]["modelfleet.environment"] == "production"
        assert c["labels"]["modelfleet.revision"] == revision
        assert c["labels"]["modelfleet.spec-hash"]
        assert c["state"] == "running"
    response = fleet.call("echo", "/")
    assert response.status_code == 200 and response.json()["version"] == "v1"
    notes = fleet.wait(lambda: statuses_of(fleet, revision).get("modelfleet") == "success"
                       and statuses_of(fleet, revision), 10, "success notes")
    assert notes["modelfleet/production/echo"] == "success"
    # The gateway answers 404 for an unknown deployment and environment.
    assert fleet.call("nope", "/").status_code == 404
    assert fleet.call("echo", "/", environment="development").status_code == 404
    # A pass with nothing to do changes nothing.
    before = {c["id"] for c in fleet.containers()}
    fleet.api("/api/v1/sync", method="POST")
    time.sleep(1.0)
    assert {c["id"] for c in fleet.containers()} == before


def test_version_change_rolls_out_blue_green_with_zero_failed_requests(fleet: Fleet) -> None:
    fleet.wait(lambda: ready(fleet, "echo"), 30, "echo v1 ready")
    with RequestLoop(fleet) as loop:
        time.sleep(0.3)
        revision = fleet.push({"models/echo.yaml": echo_model(version="v2")}, "echo v2")
        fleet.wait(lambda: ready(fleet, "echo", revision=revision)
                   and fleet.deployment("echo")["ready_replicas"] == 2, 30, "echo v2 ready")
        time.sleep(0.5)
    assert loop.failures == [], loop.failures[:5]
    assert loop.ok > 20
    assert "v1" in loop.versions and loop.versions[-1] == "v2"
    # Old containers are gone: exactly two, both v2.
    containers = fleet.containers()
    assert len(containers) == 2
    assert {c["labels"]["modelfleet.revision"] for c in containers} == {revision}
    assert fleet.wait(lambda: statuses_of(fleet, revision).get("modelfleet/production/echo") == "success",
                      10, "success status")


def test_failing_version_is_reverted_and_commit_gets_failure(fleet: Fleet) -> None:
    fleet.wait(lambda: ready(fleet, "echo"), 30, "echo v1 ready")
    good = {c["id"] for c in fleet.containers()}
    with RequestLoop(fleet) as loop:
        revision = fleet.push({"models/echo.yaml": echo_model(version="v3", env={"FAIL_READY": "1"})}, "broken")
        notes = fleet.wait(lambda: statuses_of(fleet, revision).get("modelfleet/production/echo") == "failure"
                           and fleet.notes(revision), 40, "failure status")
    message = notes["modelfleet/production/echo"]["description"]
    assert "not ready within" in message and "previous version keeps serving" in message
    assert notes["modelfleet"]["state"] == "failure"
    # The old version still serves, untouched, and nothing of the failed version is left.
    assert {c["id"] for c in fleet.containers()} == good
    assert loop.failures == []
    assert fleet.call("echo", "/").json()["version"] == "v1"
    assert fleet.deployment("echo")["reason"] == "RolloutFailed"


def test_disabled_deployment_is_removed_and_endpoint_answers_404(fleet: Fleet) -> None:
    fleet.wait(lambda: ready(fleet, "echo"), 30, "echo ready")
    # (The only deployment: deletion safety holds it without the trailer, tests/integration/test_deletion_safety.py.)
    revision = fleet.push({"models/echo.yaml": echo_model(enabled=False)},
                          "disable echo\n\nModelfleet-Confirm: deletions")
    fleet.wait(lambda: not fleet.containers(), 20, "replicas removed")
    fleet.wait(lambda: fleet.call("echo", "/").status_code == 404, 5, "404 from the gateway")
    fleet.wait(lambda: statuses_of(fleet, revision).get("modelfleet/production/echo") == "success", 10, "status")
    assert "disabled" in fleet.notes(revision)["modelfleet/production/echo"]["description"]


def test_manifest_error_fails_the_commit_with_file_line_and_keeps_running_state(fleet: Fleet) -> None:
    fleet.wait(lambda: ready(fleet, "echo"), 30, "echo ready")
    before = {c["id"] for c in fleet.containers()}
    broken = echo_model(version="v9")
    broken["spec"]["deployments"][0]["replicaz"] = 3
    revision = fleet.push({"models/echo.yaml": broken}, "typo")
    notes = fleet.wait(lambda: statuses_of(fleet, revision).get("modelfleet/production/echo") == "failure"
                       and fleet.notes(revision), 20, "failure status")
    description = notes["modelfleet/production/echo"]["description"]
    assert "models/echo.yaml:" in description and "replicaz" in description
    assert {c["id"] for c in fleet.containers()} == before
    assert fleet.call("echo", "/").json()["version"] == "v1"
    # A YAML syntax error anywhere must not remove anything either.
    revision = fleet.push({"models/other.yaml": "kind: Model\nmetadata: {name: x\n"}, "syntax")
    fleet.wait(lambda: statuses_of(fleet, revision).get("modelfleet") == "failure", 20, "aggregate failure")
    assert "models/other.yaml:" in fleet.notes(revision)["modelfleet"]["description"]
    assert {c["id"] for c in fleet.containers()} == before


def test_container_removed_by_hand_comes_back(fleet: Fleet) -> None:
    fleet.wait(lambda: ready(fleet, "echo"), 30, "echo ready")
    victim = fleet.containers()[0]
    host = fleet.hosts[fleet.host_names.index(victim["host"])]
    client = host.client()
    client.api.remove_container(victim["id"], force=True)
    client.close()
    fleet.api("/api/v1/sync", method="POST")
    fleet.wait(lambda: len([c for c in fleet.containers() if c["state"] == "running"]) == 2, 20, "replica back")
    fleet.wait(lambda: ready(fleet, "echo") and fleet.deployment("echo")["ready_replicas"] == 2, 20, "ready")


def test_host_down_is_reported_and_replicas_move(fleet: Fleet) -> None:
    # One replica on development (no policy): it lands on some host; cut that host off.
    revision = fleet.push({"models/dev.yaml": echo_model("dev", replicas=1, environment="development")}, "dev")
    fleet.wait(lambda: ready(fleet, "dev", "development", revision), 30, "dev ready")
    where = fleet.deployment("dev", "development")["hosts"][0]
    host = fleet.hosts[fleet.host_names.index(where)]
    host.partition()
    try:
        fleet.api("/api/v1/sync", method="POST")
        # First a grace period (docker.downAfter, 10 s): reported unreachable, nothing moves yet...
        fleet.wait(lambda: any(h["name"] == where and "unreachable" in h["state"] for h in fleet.status()["hosts"]),
                   30, "host reported unreachable")
        assert fleet.deployment("dev", "development")["hosts"] in ([], [where])
        assert not any(c["labels"]["modelfleet.model"] == "dev" for c in fleet.containers())  # only on `where`
        # ...then down, and its replica moves to another eligible host.
        fleet.wait(lambda: any(h["name"] == where and h["state"].startswith("down") for h in fleet.status()["hosts"]),
                   40, "host reported down")
        moved = fleet.wait(lambda: (d := fleet.deployment("dev", "development")).get("state") == "success"
                           and d["hosts"] and d["hosts"][0] != where and fleet.routed() and d, 40, "replica moved")
        assert moved["hosts"][0] in fleet.host_names
        assert fleet.call("dev", "/", environment="development").status_code == 200
    finally:
        host.heal()
    # When the host comes back, its stale replica is removed (no duplicates, no orphans).
    fleet.api("/api/v1/sync", method="POST")
    fleet.wait(lambda: len([c for c in fleet.containers() if c["labels"]["modelfleet.model"] == "dev"]) == 1,
               40, "stale replica removed")


def test_sigkill_mid_rollout_converges_without_orphans_and_gateway_keeps_serving(fleet: Fleet) -> None:
    fleet.wait(lambda: ready(fleet, "echo"), 30, "echo ready")
    with RequestLoop(fleet) as loop:
        revision = fleet.push({"models/echo.yaml": echo_model(version="v2")}, "v2")
        # Kill as soon as the rollout has started a new container.
        fleet.wait(lambda: any(c["labels"]["modelfleet.revision"] == revision for c in fleet.containers()),
                   20, "rollout started")
        fleet.stop(signal.SIGKILL)
        time.sleep(1.0)  # the gateway serves on while the daemon is gone
        served_while_down = loop.ok
        fleet.start()
        fleet.wait(lambda: ready(fleet, "echo", revision=revision)
                   and fleet.deployment("echo")["ready_replicas"] == 2, 40, "converged")
        time.sleep(1.0)
    assert loop.failures == [], loop.failures[:5]
    assert served_while_down > 0
    containers = fleet.containers()
    assert len(containers) == 2, containers
    assert {c["labels"]["modelfleet.revision"] for c in containers} == {revision}


def test_webhook_signature_is_checked(clean_hosts: list[TestHost], tmp_path: Path) -> None:
    secret_file = tmp_path / "webhook-secret"
    secret_file.write_text("s3cret\n")
    fleet = make_fleet(tmp_path, clean_hosts, repo={"url": str(tmp_path / "origin.git"), "branch": "main",
                                                    "pollInterval": "1h", "watch": False,
                                                    "webhookSecretFile": str(secret_file)})
    fleet.push({**BASE_MANIFESTS, "models/echo.yaml": echo_model(replicas=1)}, "initial")
    with running(fleet):
        fleet.wait(lambda: ready(fleet, "echo"), 30, "echo ready")
        revision = fleet.push({"models/echo.yaml": echo_model(replicas=1, version="v2")}, "v2")
        body = json.dumps({"ref": "refs/heads/main", "after": revision}).encode()
        bad = fleet.api("/webhook", method="POST", content=body,
                        headers={"X-Hub-Signature-256": "sha256=" + "0" * 64, "Content-Type": "application/json"})
        assert bad.status_code == 401
        unsigned = fleet.api("/webhook", method="POST", content=body)
        assert unsigned.status_code == 401
        time.sleep(1.0)
        assert fleet.status()["revision"] != revision  # no watch, hourly poll: nothing triggered
        signature = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
        good = fleet.api("/webhook", method="POST", content=body,
                         headers={"X-Hub-Signature-256": f"sha256={signature}", "Content-Type": "application/json"})
        assert good.status_code == 202
        fleet.wait(lambda: ready(fleet, "echo", revision=revision), 20, "webhook-triggered rollout")


def test_lost_state_directory_adopts_matching_replicas_instead_of_duplicating(fleet: Fleet) -> None:
    fleet.wait(lambda: ready(fleet, "echo"), 30, "echo ready")
    before = {c["id"] for c in fleet.containers()}
    fleet.stop()
    fleet.kill_gateway()
    for leftover in fleet.state_dir.glob("modelfleet.db*"):
        leftover.unlink()  # the inventory is gone; the containers are not
    fleet.start()
    fleet.wait(lambda: ready(fleet, "echo") and fleet.deployment("echo")["ready_replicas"] == 2, 30, "adopted")
    assert {c["id"] for c in fleet.containers()} == before
    fleet.wait(lambda: fleet.call("echo", "/").status_code == 200, 15, "served by the adopted replicas")
