"""`modelfleet release` end to end: a release branch merged into main moves production to what development runs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns_hosts import TestHost

from tests.integration.fleet import BASE_MANIFESTS, GIT_ENV, Fleet, echo_model, git, make_fleet, running


def _echo() -> dict[str, object]:
    model = echo_model("echo", version="v1", replicas=1)
    production = model["spec"]["deployments"][0]
    development = {**production, "environment": "development",
                   "runtime": {**production["runtime"], "env": {"VERSION": "v2"}}}
    model["spec"]["deployments"].append(development)
    return model


@pytest.fixture
def fleet(clean_hosts: list[TestHost], tmp_path: Path) -> Iterator[Fleet]:
    fleet = make_fleet(tmp_path, clean_hosts)
    fleet.push({**BASE_MANIFESTS, "models/echo.yaml": _echo()}, "initial")
    with running(fleet):
        yield fleet


def _version(fleet: Fleet, environment: str) -> str | None:
    response = fleet.call("echo", "/", environment=environment)
    return response.json().get("version") if response.status_code == 200 else None


def test_a_merged_release_moves_production_to_what_development_runs(fleet: Fleet) -> None:
    fleet.wait(lambda: _version(fleet, "production") == "v1" and _version(fleet, "development") == "v2", 60,
               "both environments serve")
    released = subprocess.run([sys.executable, "-m", "modelfleet.reconciler.cli", "release", "echo",
                               "--from", "development", "--to", "production", "--push", "--repo", str(fleet.work)],
                              capture_output=True, text=True, timeout=60, env={**os.environ, **GIT_ENV})
    assert released.returncode == 0, released.stderr
    assert "release echo: development -> production" in released.stdout
    branch = git(fleet.work, "rev-parse", "--abbrev-ref", "HEAD")
    assert branch.startswith("release/echo-production-")
    assert git(fleet.work, "ls-remote", "origin", f"refs/heads/{branch}")
    # The branch alone deploys nothing; merged into main it does.
    assert _version(fleet, "production") == "v1"
    git(fleet.work, "checkout", "-q", "main")
    git(fleet.work, "merge", "-q", "--ff-only", branch)
    git(fleet.work, "push", "-q", "origin", "main")
    fleet.wait(lambda: _version(fleet, "production") == "v2", 60, "production serves v2")
    assert fleet.deployment("echo", "production")["state"] == "success"
