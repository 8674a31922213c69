"""Every execution observable, end to end: requests through the real gateway on the netns pool show up
in `modelfleet logs` with the replica, version and location that answered, and the replicas' container
logs carry the request id the gateway forwarded."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from netns_hosts import TestHost

from tests.integration.fleet import BASE_MANIFESTS, Fleet, echo_model, make_fleet, running


@pytest.fixture
def fleet(clean_hosts: list[TestHost], tmp_path: Path) -> Iterator[Fleet]:
    fleet = make_fleet(tmp_path, clean_hosts)
    fleet.push({**BASE_MANIFESTS, "models/echo.yaml": echo_model()}, "initial")
    with running(fleet):
        yield fleet


def logs(fleet: Fleet, *args: str) -> list[dict[str, object]]:
    result = subprocess.run([sys.executable, "-m", "modelfleet.reconciler.cli", "logs", "echo", "--config",
                             str(fleet.config_path), "--json", *args], capture_output=True, text=True, timeout=30,
                            check=False)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_modelfleet_logs_shows_each_execution_and_the_replicas_lines(fleet: Fleet) -> None:
    fleet.wait(lambda: fleet.deployment("echo").get("state") == "success" and fleet.routed(), 60, "echo ready")
    ids = [f"it-{i}" for i in range(6)]
    with httpx.Client(trust_env=False) as client:
        for request_id in ids:
            response = client.get(f"http://127.0.0.1:{fleet.gateway_port}/models/echo/predict",
                                  headers={"X-Request-Id": request_id}, timeout=5)
            assert response.status_code == 200 and response.headers["x-request-id"] == request_id

    def executions() -> list[dict[str, object]]:
        return [line for line in logs(fleet, "--environment", "production") if "request_id" in line]

    seen = fleet.wait(lambda: len(executions()) >= 6 and executions(), 20, "six executions in `modelfleet logs`")
    assert [e["request_id"] for e in seen] == ids
    replicas = {c["name"]: c for c in fleet.containers()}
    locations = {h["name"]: h["location"]["name"] for h in fleet.status()["hosts"]}
    for execution in seen:
        container = replicas[str(execution["container"])]
        assert execution["status"] == 200 and execution["host"] == container["host"]
        assert execution["spec_hash"] == container["labels"]["modelfleet.spec-hash"]
        assert execution["revision"] == container["labels"]["modelfleet.revision"]
        assert str(execution["replica"]) == container["labels"]["modelfleet.replica"]
        assert execution["location"] == locations[container["host"]]
    assert len({e["container"] for e in seen}) == 2  # both replicas served
    # The container logs, as the CLI shows them: the ids the gateway forwarded reached the replicas.
    lines = [str(line["line"]) for line in logs(fleet, "--tail", "50") if "line" in line]
    for request_id in ids:
        assert any(f"GET /predict request_id={request_id}" in line for line in lines), lines
    # The text form: one line per execution.
    text = subprocess.run([sys.executable, "-m", "modelfleet.reconciler.cli", "logs", "echo", "--config",
                           str(fleet.config_path), "--no-containers"], capture_output=True, text=True, timeout=30,
                          check=True).stdout
    assert sum(" echo/production 200 " in line for line in text.splitlines()) == 6
    unknown = subprocess.run([sys.executable, "-m", "modelfleet.reconciler.cli", "logs", "nope", "--config",
                              str(fleet.config_path)], capture_output=True, text=True, timeout=30, check=False)
    assert unknown.returncode == 3 and 'no deployment of model "nope"' in unknown.stderr
