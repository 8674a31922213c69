"""``POST /api/v1/executions`` and ``GET /api/v1/logs/<model>``: validation, auth, container logs."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from modelfleet.reconciler.api.executions import execution_routes
from modelfleet.reconciler.daemon.executions import ExecutionJournal
from modelfleet.reconciler.errors import HostUnavailable

TOKEN = "t0ken"
AUTH = {"authorization": f"Bearer {TOKEN}"}


class Host:
    def __init__(self, lines: list[str] | None = None) -> None:
        self.lines = lines
        self.asked: list[tuple[str, int, float | None]] = []

    def log_lines(self, container_id: str, tail: int = 20, since: float | None = None) -> list[str]:
        self.asked.append((container_id, tail, since))
        if self.lines is None:
            raise HostUnavailable("h2", "connection refused")
        return self.lines


def row(host: str, replica: int, environment: str = "production", phase: str = "active") -> Any:
    return SimpleNamespace(model="m", environment=environment, replica=replica, host=host, name=f"m-{replica}",
                           container_id=f"id{replica}", phase=phase, spec_hash="s", revision="r")


@pytest.fixture
def api() -> tuple[TestClient, Any]:
    daemon: Any = SimpleNamespace(
        executions=ExecutionJournal(), status=SimpleNamespace(deployments={("m", "production"): None}),
        store=SimpleNamespace(inventory=lambda: [row("h1", 0), row("h2", 1), row("h1", 2, phase="removing")]),
        clients={"h1": Host(["line one", "line two"]), "h2": Host(None)})
    return TestClient(Starlette(routes=execution_routes(daemon, TOKEN))), daemon


def record(i: int) -> dict[str, object]:
    return {"time": 1.0 + i, "request_id": f"r{i}", "model": "m", "environment": "production", "status": 200,
            "duration_ms": 1.0}


def test_batches_need_the_token_and_a_valid_shape(api: tuple[TestClient, Any]) -> None:
    client, daemon = api
    assert client.post("/api/v1/executions", json={"gateway": "g", "executions": []}).status_code == 401
    bad = client.post("/api/v1/executions", json={"gateway": "g", "executions": [{"model": "m"}]}, headers=AUTH)
    assert bad.status_code == 400 and "executions.0" in bad.json()["error"]
    ok = client.post("/api/v1/executions", json={"gateway": "g", "dropped": 3,
                                                 "executions": [record(1), record(2)]}, headers=AUTH)
    assert ok.status_code == 202 and ok.json() == {"accepted": 2, "last": 2}
    assert daemon.executions.dropped == {"g": 3}


def test_logs_of_a_deployment_with_its_replicas_container_lines(api: tuple[TestClient, Any]) -> None:
    client, daemon = api
    client.post("/api/v1/executions", json={"gateway": "g", "executions": [record(i) for i in range(5)]},
                headers=AUTH)
    answer = client.get("/api/v1/logs/m", params={"environment": "production", "limit": "2", "tail": "7"},
                        headers=AUTH).json()
    assert [e["request_id"] for e in answer["executions"]] == ["r3", "r4"] and answer["next"] == 5
    assert [(c["container"], c.get("lines"), c.get("error")) for c in answer["containers"]] == [
        ("m-0", ["line one", "line two"], None), ("m-1", None, "host h2 is unreachable: connection refused")]
    assert daemon.clients["h1"].asked == [("id0", 7, None)]
    client.get("/api/v1/logs/m", params={"containerSince": "123.5"}, headers=AUTH)
    assert daemon.clients["h1"].asked[-1] == ("id0", 20, 123.5)
    assert client.get("/api/v1/logs/m", params={"tail": "0"}, headers=AUTH).json()["containers"] == []


def test_logs_errors_name_the_problem(api: tuple[TestClient, Any]) -> None:
    client, _ = api
    assert client.get("/api/v1/logs/m").status_code == 401
    missing = client.get("/api/v1/logs/nope", headers=AUTH)
    assert missing.status_code == 404 and 'no deployment of model "nope"' in missing.json()["error"]
    other_env = client.get("/api/v1/logs/m", params={"environment": "staging"}, headers=AUTH)
    assert other_env.status_code == 404 and 'in environment "staging"' in other_env.json()["error"]
    bad = client.get("/api/v1/logs/m", params={"limit": "lots"}, headers=AUTH)
    assert bad.status_code == 400 and bad.json()["error"] == "limit='lots' is not an integer"
    assert "out of range" in client.get("/api/v1/logs/m", params={"tail": "100000"}, headers=AUTH).json()["error"]
