"""The plan is the truth on the real pool: what `modelfleet plan` shows after a failed rollout is
what the daemon does (nothing for the held-back version), and rollout.autoRevert: false leaves the
failed version in place, reported and not retried (Nomad's semantics)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from netns_hosts import TestHost

from tests.integration.fleet import BASE_MANIFESTS, Fleet, echo_model, make_fleet, running, statuses_of


def plan_json(fleet: Fleet) -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-m", "modelfleet.reconciler.cli", "plan", str(fleet.work),
                             "--config", str(fleet.config_path), "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def ready(fleet: Fleet, model: str = "echo") -> bool:
    d = fleet.deployment(model)
    return d.get("state") == "success" and fleet.routed()


def test_after_a_failed_rollout_the_live_plan_holds_the_version_back_and_says_why(
        clean_hosts: list[TestHost], tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, clean_hosts)
    fleet.push({**BASE_MANIFESTS, "models/echo.yaml": echo_model()}, "initial")
    with running(fleet):
        fleet.wait(lambda: ready(fleet), 30, "echo v1 ready")
        revision = fleet.push({"models/echo.yaml": echo_model(version="v3", env={"FAIL_READY": "1"})}, "broken")
        fleet.wait(lambda: statuses_of(fleet, revision).get("modelfleet/production/echo") == "failure", 40,
                   "failure status")
        data = plan_json(fleet)
    echo_actions = [a for a in data["actions"] if a["model"] == "echo"]
    assert not [a for a in echo_actions if a["op"] in ("create", "replace")], echo_actions
    held = [h for h in data["held"] if h["model"] == "echo"]
    assert len(held) == 2 and {h["op"] for h in held} == {"replace"}
    assert all("failed its rollout" in h["held"] and "not ready within" in h["held"] for h in held)
    echo = next(d for d in data["deployments"] if d["model"] == "echo" and d["environment"] == "production")
    assert echo["outcome"]["reason"] == "RolloutFailed" and echo["outcome"]["state"] == "failure"


def test_auto_revert_off_leaves_the_failed_version_in_place_not_routed_and_not_retried(
        clean_hosts: list[TestHost], tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, clean_hosts, rollout={"healthyDeadline": "4s", "autoRevert": False})
    fleet.push({**BASE_MANIFESTS, "models/echo.yaml": echo_model(replicas=1)}, "initial")
    with running(fleet):
        fleet.wait(lambda: ready(fleet), 30, "echo v1 ready")
        good = {c["id"] for c in fleet.containers()}
        revision = fleet.push({"models/echo.yaml": echo_model(version="v3", replicas=1, env={"FAIL_READY": "1"})},
                              "broken")
        notes = fleet.wait(lambda: statuses_of(fleet, revision).get("modelfleet/production/echo") == "failure"
                           and fleet.notes(revision), 40, "failure status")
        assert "left in place" in notes["modelfleet/production/echo"]["description"]
        containers = fleet.containers()
        left = [c for c in containers if c["id"] not in good]
        assert good <= {c["id"] for c in containers} and len(left) == 1  # old one serves, new one stays
        assert fleet.call("echo", "/").json()["version"] == "v1"
        # Further passes neither retry nor remove anything.
        fleet.api("/api/v1/sync", method="POST")
        time.sleep(3)
        assert {c["id"] for c in fleet.containers()} == {c["id"] for c in containers}
        assert fleet.call("echo", "/").json()["version"] == "v1"
        assert fleet.deployment("echo")["reason"] == "RolloutFailed"
