"""Deletion safety on real dockerd hosts: a commit that deletes every deployment is held until confirmed."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from netns_hosts import TestHost

from tests.integration.fleet import BASE_MANIFESTS, Fleet, echo_model, make_fleet, running, statuses_of

MODELS = ("alpha", "beta", "gamma")


@pytest.fixture
def fleet(clean_hosts: list[TestHost], tmp_path: Path) -> Iterator[Fleet]:
    fleet = make_fleet(tmp_path, clean_hosts)
    fleet.push({**BASE_MANIFESTS, **{f"models/{m}.yaml": echo_model(m, replicas=1) for m in MODELS}}, "initial")
    with running(fleet):
        yield fleet


def _all_ready(fleet: Fleet) -> bool:
    return all(fleet.deployment(m).get("state") == "success" for m in MODELS) and len(fleet.containers()) == 3


def _held(fleet: Fleet, revision: str) -> dict[str, dict[str, Any]] | None:
    notes = fleet.notes(revision)
    aggregate = notes.get("modelfleet") or {}
    return notes if aggregate.get("state") == "failure" and "held" in str(aggregate.get("description")) else None


def test_deleting_every_deployment_is_held_until_confirmed_by_the_cli(fleet: Fleet) -> None:
    fleet.wait(lambda: _all_ready(fleet), 60, "three deployments ready")
    before = {c["id"] for c in fleet.containers()}
    revision = fleet.push({f"models/{m}.yaml": None for m in MODELS}, "remove everything")
    notes = fleet.wait(lambda: _held(fleet, revision), 30, "the held aggregate status")
    description = notes["modelfleet"]["description"]
    assert description == (f"held: would remove 3 of 3 deployments; confirm with `modelfleet confirm "
                           f"{revision[:12]}` or a commit trailer `Modelfleet-Confirm: deletions`")
    # Nothing was removed: the containers run on, and their endpoints still answer.
    fleet.wait(lambda: fleet.status().get("lastPass", {}).get("revision") == revision, 20, "a pass on the commit")
    assert {c["id"] for c in fleet.containers()} == before
    assert all(fleet.call(m, "/").status_code == 200 for m in MODELS)
    assert fleet.status()["lastPass"]["deletion_hold"] == description
    # Confirmed by the CLI (the API, with the config's address and token): removed.
    confirm = subprocess.run([sys.executable, "-m", "modelfleet.reconciler.cli", "confirm", revision[:12],
                              "--config", str(fleet.config_path)], capture_output=True, text=True, timeout=60)
    assert confirm.returncode == 0, confirm.stderr
    fleet.wait(lambda: not fleet.containers(), 30, "the containers removed")
    fleet.wait(lambda: statuses_of(fleet, revision).get("modelfleet") == "success", 20, "aggregate success")
    assert all(fleet.call(m, "/").status_code == 404 for m in MODELS)


def test_a_commit_trailer_confirms_and_a_partial_deletion_is_not_held(fleet: Fleet) -> None:
    fleet.wait(lambda: _all_ready(fleet), 60, "three deployments ready")
    # One of three (33 %, under maxDeletionPercent 50): applied at once.
    revision = fleet.push({"models/alpha.yaml": None}, "remove alpha")
    fleet.wait(lambda: len(fleet.containers()) == 2, 30, "alpha removed")
    fleet.wait(lambda: statuses_of(fleet, revision).get("modelfleet") == "success", 20, "aggregate success")
    # The other two (all that runs) with the trailer: removed without a confirm.
    revision = fleet.push({"models/beta.yaml": None, "models/gamma.yaml": None},
                          "remove the rest\n\nModelfleet-Confirm: deletions")
    fleet.wait(lambda: not fleet.containers(), 30, "the containers removed")
    fleet.wait(lambda: statuses_of(fleet, revision).get("modelfleet") == "success", 20, "aggregate success")
