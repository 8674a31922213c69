"""Plans of review branches on the real daemon and real hosts: a pushed review/x gets a
modelfleet/plan status with the counts of what it would do, its plan page shows the change,
and nothing of it is applied; a broken branch gets failure with file:line."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns_hosts import TestHost

from tests.integration.fleet import BASE_MANIFESTS, Fleet, echo_model, git, make_fleet, running


@pytest.fixture
def fleet(clean_hosts: list[TestHost], tmp_path: Path) -> Iterator[Fleet]:
    fleet = make_fleet(tmp_path, clean_hosts, review={"branches": ["review/*"], "timeout": "20s"})
    fleet.push({**BASE_MANIFESTS, "models/echo.yaml": echo_model()}, "initial")
    with running(fleet):
        yield fleet


def push_branch(fleet: Fleet, name: str, files: dict[str, object]) -> str:
    git(fleet.work, "checkout", "-q", "-b", name, "main")
    fleet.write(files)
    git(fleet.work, "add", "-A")
    git(fleet.work, "commit", "-q", "-m", name)
    head = git(fleet.work, "rev-parse", "HEAD")
    git(fleet.work, "push", "-q", "origin", name)
    git(fleet.work, "checkout", "-q", "main")
    return head


def plan_status(fleet: Fleet, head: str) -> dict[str, object]:
    try:
        entry = fleet.notes(head).get("modelfleet/plan") or {}
    except Exception:  # the commit is not in origin's notes yet
        return {}
    return entry if entry.get("state") in ("success", "failure") else {}


def test_a_review_branch_is_planned_not_applied(fleet: Fleet) -> None:
    main = fleet.wait(lambda: fleet.deployment("echo").get("state") == "success" and fleet.status()["revision"],
                      60, "echo ready on main")
    before = sorted((c["host"], c["name"], c["id"]) for c in fleet.containers())
    assert len(before) == 2
    head = push_branch(fleet, "review/x", {
        "models/echo.yaml": echo_model(replicas=3),
        "models/extra.yaml": echo_model("extra", environment="development", replicas=1),
    })
    status = fleet.wait(lambda: plan_status(fleet, head), 60, "the plan status of review/x")
    assert status["state"] == "success", status
    assert status["description"] == "2 to create, 0 to replace, 0 to remove"
    assert status["target_url"] == f"http://127.0.0.1:{fleet.api_port}/plans/{head}"

    document = fleet.api(f"/api/v1/plans/{head}").json()
    assert document["branch"] == "review/x" and document["base"] == main and document["stale"] is False
    assert document["diff"]["added"] == [{"model": "extra", "environment": "development"}]
    (changed,) = document["diff"]["changed"]
    assert changed["model"] == "echo"
    assert {"field": "replicas", "old": 2, "new": 3} in changed["changes"]
    ops = sorted((a["op"], a["model"], a["environment"]) for a in document["plan"]["actions"])
    assert ops == [("create", "echo", "production"), ("create", "extra", "development")]
    echo = next(d for d in document["plan"]["deployments"] if d["model"] == "echo")
    assert fleet.host_names[2] in echo["excluded_hosts"]  # production is eu-only: virginia is excluded
    page = fleet.api(f"/plans/{head}")
    assert page.status_code == 200 and "extra/development" in page.text and "replicas" in page.text

    # Nothing of the branch is applied: main's containers are the same ones, none for extra.
    last = fleet.status()["lastPass"]["id"]
    fleet.api("/api/v1/sync", method="POST")
    fleet.wait(lambda: fleet.status()["lastPass"]["id"] > last, 30, "one more pass")
    assert sorted((c["host"], c["name"], c["id"]) for c in fleet.containers()) == before
    assert not [c for c in fleet.containers() if c["labels"]["modelfleet.model"] == "extra"]
    assert fleet.deployment("extra", "development") == {}

    # `modelfleet plan --ref` prints the same plan.
    cli = subprocess.run([sys.executable, "-m", "modelfleet.reconciler.cli", "plan", "--ref", "review/x",
                          "--config", str(fleet.config_path), "--json", "--explain"],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    printed = json.loads(cli.stdout)
    assert printed["revision"] == head
    assert printed["actions"] == document["plan"]["actions"]
    assert printed["deployments"] == document["plan"]["deployments"]


def test_a_broken_review_branch_gets_failure_with_file_and_line(fleet: Fleet) -> None:
    fleet.wait(lambda: fleet.deployment("echo").get("state") == "success", 60, "echo ready on main")
    broken = echo_model()
    broken["spec"]["deployments"][0]["replicass"] = 3
    head = push_branch(fleet, "review/broken", {"models/echo.yaml": broken})
    status = fleet.wait(lambda: plan_status(fleet, head), 60, "the plan status of review/broken")
    assert status["state"] == "failure", status
    assert str(status["description"]).startswith("models/echo.yaml:"), status
    assert "replicass" in str(status["description"])
    document = fleet.api(f"/api/v1/plans/{head}").json()
    assert document["errors"][0]["file"] == "models/echo.yaml" and document["errors"][0]["line"] > 0
    assert fleet.deployment("echo").get("state") == "success"  # main is untouched
