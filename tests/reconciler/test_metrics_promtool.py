"""Both /metrics endpoints (the daemon API's and the gateway's) pass `promtool check metrics`, with a
sample in every metric family; the rollout histogram counts create/replace/start actions that succeed.

promtool comes with the Debian package `prometheus` (dev/test installs it). Without it the check is
skipped, unless MODELFLEET_REQUIRE_INTEGRATION=1 (dev/test as root, CI): then it fails, so that a
missing promtool never hides a broken exposition.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.testclient import TestClient

from modelfleet.reconciler.api.app import make_api
from modelfleet.reconciler.artifacts.store import ArtifactStore
from modelfleet.reconciler.daemon.reconcile import Daemon, Metrics
from modelfleet.reconciler.gateway.app import Gateway
from modelfleet.reconciler.status.outbox import StatusOutbox
from modelfleet.state.plan import Action, ActionOutcome


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        message = "promtool is not installed (Debian package prometheus; dev/test installs it)"
        if os.environ.get("MODELFLEET_REQUIRE_INTEGRATION") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


def check_metrics(text: str) -> None:
    result = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, f"promtool check metrics:\n{result.stdout}{result.stderr}\n---\n{text}"


def outcome(op: str, ok: bool, seconds: float) -> ActionOutcome:
    return ActionOutcome(Action(op, "echo", "production", "par-1", 0, "new"), ok, None if ok else "x", False, seconds)


def daemon_metrics() -> Metrics:
    """The daemon's metrics with a sample in every family (as after a few passes)."""
    fake: Any = SimpleNamespace(metrics=Metrics())
    for o in (outcome("create", True, 4.0), outcome("replace", True, 30.0), outcome("start", True, 1.0),
              outcome("remove", True, 0.5), outcome("create", False, 300.0)):
        Daemon._count_outcome(fake, o)
    m = fake.metrics
    m.passes.labels("ok").inc()
    m.pass_seconds.observe(1.5)
    m.deployments.labels("success").set(1)
    m.hosts_up.labels("par-1").set(1)
    m.observe_seconds.set(0.01)
    m.desired_replicas.labels("echo", "production").set(2)
    m.ready_replicas.labels("echo", "production").set(2)
    m.activations.labels("echo", "production").inc()
    m.scale_decisions.labels("echo", "production", "up").inc()
    # A forge provider's outbox registers its own metrics there (status/outbox.py).
    StatusOutbox(SimpleNamespace(publish=lambda revision, statuses: None), registry=m.registry)
    assert isinstance(m, Metrics)
    return m


def test_the_rollout_histogram_counts_successful_create_replace_start_by_op() -> None:
    registry = daemon_metrics().registry
    value = registry.get_sample_value
    assert value("modelfleet_rollout_duration_seconds_count", {"op": "create"}) == 1  # the failed one is not
    assert value("modelfleet_rollout_duration_seconds_sum", {"op": "replace"}) == 30.0
    assert value("modelfleet_rollout_duration_seconds_bucket", {"op": "start", "le": "1.0"}) == 1
    assert value("modelfleet_rollout_duration_seconds_count", {"op": "remove"}) is None
    assert value("modelfleet_actions_total", {"op": "create", "result": "failed"}) == 1


def test_the_daemon_api_metrics_pass_promtool(tmp_path: Path) -> None:
    daemon: Any = SimpleNamespace(metrics=daemon_metrics(), artifacts=ArtifactStore(tmp_path / "state"),
                                  status=SimpleNamespace(observed_once=True))
    response = TestClient(make_api(daemon, None, None, lambda reason: None)).get("/metrics")
    assert response.status_code == 200
    assert "modelfleet_rollout_duration_seconds_bucket" in response.text
    assert "modelfleet_ready_replicas" in response.text and "modelfleet_desired_replicas" in response.text
    assert "modelfleet_status_pending" in response.text
    check_metrics(response.text)


def test_the_gateway_metrics_pass_promtool(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path / "state")
    m = gateway.metrics
    m.observe("echo", "production", 200, 0.02)
    m.observe("", "", 404, 0.001)
    m.backend_error("echo", "production", "connect")
    m.retry("echo", "production")
    m.held("echo", "production").set(1)
    m.activation("echo", "production")
    m.activation_timeout("echo", "production")
    m.activation_rejected("echo", "production")
    m.held_for("echo", "production", 3.0)
    m.demand_reports.labels("ok").inc()
    m.route_table_version.set(3)
    m.route_table_published.set(1_780_000_000)
    overflow = gateway.overflow.metrics
    assert overflow is not None
    overflow.requests.labels("echo", "production", "endpoint", "percentage").inc()
    overflow.healthy.labels("echo", "production").set(1)
    response = TestClient(gateway).get("/metrics")
    assert response.status_code == 200
    assert "modelfleet_gateway_requests_total" in response.text
    assert "modelfleet_gateway_overflow_requests_total" in response.text
    check_metrics(response.text)
