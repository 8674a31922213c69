"""One reconcile pass in-process, on a real Git repository and an empty pool (no Docker needed):
statuses are computed and published, and a pass that breaks midway still annotates its commit."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from modelfleet.reconciler.config import parse_config
from modelfleet.reconciler.daemon import reconcile as daemon_module
from modelfleet.reconciler.daemon.reconcile import Daemon
from modelfleet.reconciler.status import CommitStatus

API = "modelfleet.dev/v1alpha1"
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@localhost", "GIT_CONFIG_NOSYSTEM": "1"}
MANIFESTS = {
    "environments.yaml": [{"apiVersion": API, "kind": "Environment", "metadata": {"name": "production"}}],
    "models/echo.yaml": [{"apiVersion": API, "kind": "Model", "metadata": {"name": "echo"}, "spec": {
        "deployments": [{"environment": "production", "runtime": {"type": "custom", "image": "x:1"}}]}}],
}


class Recorder:
    def __init__(self) -> None:
        self.published: list[tuple[str, list[CommitStatus]]] = []

    def publish(self, revision: str, statuses: list[CommitStatus]) -> None:
        self.published.append((revision, statuses))

    def last(self) -> dict[str, CommitStatus]:
        return {s.context: s for _, batch in self.published for s in batch}


def git(cwd: Path, *args: str) -> str:
    import os

    return subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **GIT_ENV}, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, str]:
    work = tmp_path / "work"
    work.mkdir()
    git(work, "init", "-q", "-b", "main")
    for name, docs in MANIFESTS.items():
        target = work / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(yaml.safe_dump_all(docs))
    git(work, "add", "-A")
    git(work, "commit", "-qm", "init")
    return work, git(work, "rev-parse", "HEAD")


def make_daemon(tmp_path: Path, work: Path) -> tuple[Daemon, Recorder]:
    config = parse_config(yaml.safe_dump({"repo": {"url": str(work)}, "stateDir": str(tmp_path / "state"),
                                          "status": {"provider": "none"}}))
    recorder = Recorder()
    return Daemon(config, status_writer=recorder), recorder


def test_a_pass_on_an_empty_pool_reports_unschedulable_with_the_reason(tmp_path: Path,
                                                                        repo: tuple[Path, str]) -> None:
    work, head = repo
    daemon, recorder = make_daemon(tmp_path, work)
    try:
        status = daemon.reconcile("test")
    finally:
        daemon.close()
    assert status.revision == head and status.observed_once
    published = recorder.last()
    echo = published["modelfleet/production/echo"]
    assert echo.state == "failure" and "unschedulable" in echo.description
    assert published["modelfleet"].state == "failure"
    assert "production/echo" in published["modelfleet"].description
    assert status.deployments[("echo", "production")].reason == "Unschedulable"
    assert status.last_applied_revision is None  # nothing was applied


def test_a_pass_that_breaks_midway_leaves_an_error_status_not_pending(tmp_path: Path, repo: tuple[Path, str],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    work, head = repo

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(daemon_module, "plan_with_probes", broken)
    daemon, recorder = make_daemon(tmp_path, work)
    try:
        status = daemon.reconcile("test")
    finally:
        daemon.close()
    assert status.last_pass["result"] == "failed" and "boom" in status.last_pass["error"]
    aggregate = recorder.last()["modelfleet"]
    assert aggregate.state == "error" and "internal error" in aggregate.description
    assert recorder.published[-1][0] == head
