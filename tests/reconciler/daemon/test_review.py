"""The review planner in-process (daemon/review.py), on a real Git repository and an empty pool:
review heads are planned after a pass with the pass's inputs, get a modelfleet/plan status, and
never change what the pass does."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from starlette.testclient import TestClient

from modelfleet.reconciler.api.app import make_api
from modelfleet.reconciler.config import parse_config
from modelfleet.reconciler.daemon import review as review_module
from modelfleet.reconciler.daemon.reconcile import Daemon
from modelfleet.reconciler.status import CommitStatus

API = "modelfleet.dev/v1alpha1"
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@localhost", "GIT_CONFIG_NOSYSTEM": "1"}


def model(name: str, image: str = "x:1", replicas: int = 1) -> list[dict[str, Any]]:
    return [{"apiVersion": API, "kind": "Model", "metadata": {"name": name}, "spec": {"deployments": [
        {"environment": "production", "replicas": replicas, "runtime": {"type": "custom", "image": image}}]}}]


BASE = {"environments.yaml": [{"apiVersion": API, "kind": "Environment", "metadata": {"name": "production"}}],
        "models/echo.yaml": model("echo")}


class Recorder:
    def __init__(self) -> None:
        self.published: list[tuple[str, CommitStatus]] = []

    def publish(self, revision: str, statuses: list[CommitStatus]) -> None:
        self.published += [(revision, s) for s in statuses]

    def plan_statuses(self, revision: str) -> list[tuple[str, str]]:
        return [(s.state, s.description) for r, s in self.published if r == revision and s.context == "modelfleet/plan"]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **GIT_ENV}, check=True,
                          capture_output=True, text=True).stdout.strip()


def commit(work: Path, files: dict[str, Any], message: str, date: str | None = None) -> str:
    for name, docs in files.items():
        target = work / name
        if docs is None:
            target.unlink()
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(docs if isinstance(docs, str) else yaml.safe_dump_all(docs))
    git(work, "add", "-A")
    env = {**os.environ, **GIT_ENV, **({"GIT_COMMITTER_DATE": date, "GIT_AUTHOR_DATE": date} if date else {})}
    subprocess.run(["git", "commit", "-qm", message], cwd=work, env=env, check=True)
    return git(work, "rev-parse", "HEAD")


@pytest.fixture
def work(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    git(work, "init", "-q", "-b", "main")
    commit(work, BASE, "init")
    return work


def branch(work: Path, name: str, files: dict[str, Any], date: str | None = None) -> str:
    git(work, "checkout", "-q", "-b", name, "main")
    head = commit(work, files, name, date)
    git(work, "checkout", "-q", "main")
    return head


def make_daemon(tmp_path: Path, work: Path, **review: Any) -> tuple[Daemon, Recorder]:
    config = parse_config(yaml.safe_dump({
        "repo": {"url": str(work)}, "stateDir": str(tmp_path / "state"), "status": {"provider": "none"},
        "api": {"listen": "127.0.0.1:18081"},
        "review": {"branches": ["review/*", "feature/*"], **review}}))
    recorder = Recorder()
    daemon = Daemon(config, status_writer=recorder)
    daemon.reviews.background = False  # rounds run when the test says
    return daemon, recorder


def test_a_review_head_is_planned_after_the_pass_and_gets_a_plan_status(tmp_path: Path, work: Path) -> None:
    head = branch(work, "review/x", {"models/new.yaml": model("new"), "models/echo.yaml": model("echo", replicas=3)})
    daemon, recorder = make_daemon(tmp_path, work)
    try:
        main = daemon.reconcile("test").revision
        assert main is not None
        assert daemon.reviews.run_once() == [head]
        document = daemon.reviews.get(head)
    finally:
        daemon.close()
    assert recorder.plan_statuses(head) == [("pending", f"planning review/x against {main[:12]}"),
                                            ("success", "0 to create, 0 to replace, 0 to remove")]  # an empty pool
    url = next(s.target_url for r, s in recorder.published if r == head)
    assert url == f"http://127.0.0.1:18081/plans/{head}"
    assert recorder.plan_statuses(main) == []  # the tracked branch has no plan status
    assert document is not None and document["branch"] == "review/x" and document["base"] == main
    assert document["stale"] is False
    assert document["diff"]["added"] == [{"model": "new", "environment": "production"}]
    assert document["diff"]["changed"][0]["changes"][0] == {"field": "replicas", "old": 1, "new": 3}
    assert document["plan"]["revision"] == head
    # Nothing of the branch went into the pass: the daemon's status and plan are main's.
    assert daemon.status.revision == main and set(daemon.status.deployments) == {("echo", "production")}


def test_a_broken_branch_gets_failure_with_file_and_line(tmp_path: Path, work: Path) -> None:
    head = branch(work, "feature/broken", {"models/echo.yaml": "apiVersion: modelfleet.dev/v1alpha1\nkind: Model\n"
                                                               "metadata: {name: echo}\nspec:\n  deploymentz: []\n"})
    daemon, recorder = make_daemon(tmp_path, work)
    try:
        daemon.reconcile("test")
        daemon.reviews.run_once()
        document = daemon.reviews.get(head[:10])  # a prefix finds it
    finally:
        daemon.close()
    state, description = recorder.plan_statuses(head)[-1]
    assert state == "failure" and description.startswith("models/echo.yaml:5: ")
    assert document is not None and document["errors"][0]["file"] == "models/echo.yaml"
    assert document["errors"][0]["line"] == 5


def test_heads_are_planned_once_newest_first_at_most_max_plans_per_round(tmp_path: Path, work: Path) -> None:
    heads = []
    for i in range(3):
        heads.append(branch(work, f"review/b{i}", {f"models/m{i}.yaml": model(f"m{i}")},
                            date=f"2030-01-0{i + 1}T00:00:00Z"))  # b2 is the newest
    other = branch(work, "elsewhere", {"models/z.yaml": model("z")})  # matches no glob
    daemon, _ = make_daemon(tmp_path, work, maxPlans=2)
    try:
        daemon.reconcile("test")
        first = daemon.reviews.run_once()
        second = daemon.reviews.run_once()
        third = daemon.reviews.run_once()
    finally:
        daemon.close()
    assert first == [heads[2], heads[1]]
    assert second == [heads[0]]
    assert third == []
    assert other not in first + second


def test_a_plan_slower_than_the_timeout_is_that_review_s_failure(tmp_path: Path, work: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    head = branch(work, "review/slow", {"models/new.yaml": model("new")})
    real = review_module.plan

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(review_module, "plan", slow)
    daemon, recorder = make_daemon(tmp_path, work, timeout="200ms")
    try:
        status = daemon.reconcile("test")
        assert status.last_pass["result"] in ("ok", "degraded")
        daemon.reviews.run_once()
    finally:
        daemon.close()
    state, description = recorder.plan_statuses(head)[-1]
    assert state == "failure" and "review.timeout (0.2s)" in description


def test_review_branches_off_by_default(tmp_path: Path, work: Path) -> None:
    branch(work, "review/x", {"models/new.yaml": model("new")})
    config = parse_config(yaml.safe_dump({"repo": {"url": str(work)}, "stateDir": str(tmp_path / "state"),
                                          "status": {"provider": "none"}}))
    recorder = Recorder()
    daemon = Daemon(config, status_writer=recorder)
    try:
        daemon.reconcile("test")
        assert daemon.reviews.run_once() == []
    finally:
        daemon.close()
    assert all(s.context != "modelfleet/plan" for _, s in recorder.published)


def test_the_plan_page_and_json_behind_the_token(tmp_path: Path, work: Path) -> None:
    head = branch(work, "review/x", {"models/new.yaml": model("new", image="evil/<script>:1")})
    daemon, _ = make_daemon(tmp_path, work)
    try:
        daemon.reconcile("test")
        daemon.reviews.run_once()
        client = TestClient(make_api(daemon, "tok", None, lambda _: None), raise_server_exceptions=False)
        assert client.get(f"/api/v1/plans/{head}").status_code == 401
        assert client.get(f"/plans/{head}").status_code == 401
        assert client.get(f"/plans/{head}?token=wrong").status_code == 401
        data = client.get(f"/api/v1/plans/{head}", headers={"Authorization": "Bearer tok"}).json()
        assert data["revision"] == head and data["diff"]["added"] == [{"model": "new", "environment": "production"}]
        page = client.get(f"/plans/{head}?token=tok")
        listing = client.get("/api/v1/plans", headers={"Authorization": "Bearer tok"}).json()
        missing = client.get("/api/v1/plans/" + "0" * 40, headers={"Authorization": "Bearer tok"})
        not_sha = client.get("/api/v1/plans/xyz", headers={"Authorization": "Bearer tok"})
        # The base moves: the plan is stale.
        commit(work, {"models/other.yaml": model("other")}, "main moves")
        daemon.reconcile("test")
        stale = client.get(f"/api/v1/plans/{head}", headers={"Authorization": "Bearer tok"}).json()
    finally:
        daemon.close()
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "review/x" in page.text and "new/production" in page.text
    assert "<script>" not in page.text and "evil/&lt;script&gt;:1" in page.text  # autoescaped
    assert [p["revision"] for p in listing["plans"]] == [head]
    assert missing.status_code == 404 and not_sha.status_code == 400
    assert stale["stale"] is True and data["stale"] is False


def test_after_a_pass_the_review_thread_plans_new_heads(tmp_path: Path, work: Path) -> None:
    head = branch(work, "review/x", {"models/new.yaml": model("new")})
    daemon, recorder = make_daemon(tmp_path, work)
    daemon.reviews.background = True
    try:
        daemon.reconcile("test")
        deadline = time.monotonic() + 30  # a bound, not a timing assertion
        while daemon.reviews.get(head) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert daemon.reviews.get(head) is not None
    finally:
        daemon.close()
    assert recorder.plan_statuses(head)[-1][0] == "success"
