"""Pull requests in the review planner, in-process: a real Git repository holding the forge's pull
refs (refs/pull/N/head), the stand-in GitHub listing the pull requests and keeping their comments,
an empty pool. Each new head is planned (never applied), gets modelfleet/plan, and the pull request
has exactly one plan comment, edited on each push; a pull request webhook wakes the planner, not a pass."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from starlette.testclient import TestClient

from modelfleet.reconciler.api.app import make_api
from modelfleet.reconciler.config import parse_config
from modelfleet.reconciler.daemon.reconcile import Daemon
from modelfleet.reconciler.status.outbox import StatusOutbox
from modelfleet.reconciler.status.pulls import GitHubPulls, GitLabPulls
from modelfleet.state.pulls import COMMENT_MARKER
from tests.reconciler.status.forge_standin import StandInForge

from .test_review import Recorder, branch, commit, git, model

TOKEN = "tok-review-pulls-77aa"
SECRET = "hook-secret-42"


@pytest.fixture
def work(tmp_path: Path) -> Path:
    from .test_review import BASE

    work = tmp_path / "work"
    work.mkdir()
    git(work, "init", "-q", "-b", "main")
    commit(work, BASE, "init")
    return work


@pytest.fixture
def forge() -> Iterator[StandInForge]:
    with StandInForge("github", TOKEN, "acme/models") as standin:
        yield standin


def open_pull(work: Path, forge: StandInForge, number: int, files: dict[str, Any], date: str | None = None) -> str:
    """A branch with the change, its head at the forge's pull ref, and the pull request on the forge."""
    head = branch(work, f"feature/{number}", files, date)
    git(work, "update-ref", f"refs/pull/{number}/head", head)
    forge.add_pull(number, f"feature/{number}", head)
    return head


def push_to_pull(work: Path, forge: StandInForge, number: int, files: dict[str, Any]) -> str:
    git(work, "checkout", "-q", f"feature/{number}")
    head = commit(work, files, f"more on {number}")
    git(work, "checkout", "-q", "main")
    git(work, "update-ref", f"refs/pull/{number}/head", head)
    forge.move_pull(number, head)
    return head


def make_daemon(tmp_path: Path, work: Path, forge: StandInForge, **review: Any) -> tuple[Daemon, Recorder]:
    config = parse_config(yaml.safe_dump({
        "repo": {"url": str(work)}, "stateDir": str(tmp_path / "state"), "status": {"provider": "none"},
        "api": {"listen": "127.0.0.1:18082"}, "review": review}))
    recorder = Recorder()
    daemon = Daemon(config, status_writer=recorder)
    daemon.reviews.background = False
    daemon.reviews.use_forge(GitHubPulls(forge.url, "acme/models", TOKEN, timeout=2))
    return daemon, recorder


def flush(daemon: Daemon) -> None:
    assert cast(StatusOutbox, daemon.reviews.comments).flush(10)


def plan_comments(forge: StandInForge, number: int) -> list[dict[str, Any]]:
    return [c for c in forge.comments_on(number) if c["body"].startswith(COMMENT_MARKER)]


def test_a_pull_request_is_planned_and_commented_once_then_edited(tmp_path: Path, work: Path,
                                                                  forge: StandInForge) -> None:
    first = open_pull(work, forge, 1, {"models/new.yaml": model("new")})
    forge.add_comment(1, "a reviewer's comment")
    daemon, recorder = make_daemon(tmp_path, work, forge)
    try:
        main = daemon.reconcile("test").revision
        assert main is not None
        assert daemon.reviews.run_once() == [first]
        flush(daemon)
        (comment,) = plan_comments(forge, 1)
        assert f"`{first[:12]}` planned against `main` at `{main[:12]}`" in comment["body"]
        assert "**Added**: `new/production`" in comment["body"]
        assert f"(http://127.0.0.1:18082/plans/{first})" in comment["body"]
        document = daemon.reviews.get(first)
        assert document is not None and document["pullRequest"]["number"] == 1
        assert document["branch"] == "feature/1"

        second = push_to_pull(work, forge, 1, {"models/new.yaml": model("new", replicas=2)})
        assert daemon.reviews.run_once() == [second]
        flush(daemon)
        (edited,) = plan_comments(forge, 1)
        assert edited["id"] == comment["id"]  # the same comment, edited in place
        assert f"`{second[:12]}`" in edited["body"] and f"`{first[:12]}`" not in edited["body"]
        assert len(forge.comments_on(1)) == 2  # and the reviewer's, untouched

        shown = daemon.status.to_json()["pullRequests"]
        assert shown["forge"] == "github" and shown["repository"] == "acme/models"
        assert shown["planned"] == {"1": second} and shown["lastError"] is None
        assert shown["comments"]["pending"] == 0 and shown["comments"]["lastError"] is None

        requests = len(forge.requests)
        assert daemon.reviews.run_once() == []  # nothing new: listed, not fetched, not commented
        flush(daemon)
        assert [r.method for r in forge.requests[requests:]] == ["GET"]
    finally:
        daemon.close()
    assert recorder.plan_statuses(first)[-1] == ("success", "0 to create, 0 to replace, 0 to remove")
    assert recorder.plan_statuses(second)[-1][0] == "success"
    assert recorder.plan_statuses(main) == []
    assert daemon.status.revision == main and set(daemon.status.deployments) == {("echo", "production")}
    assert forge.violations == []


def test_an_empty_diff_says_so_in_the_comment(tmp_path: Path, work: Path, forge: StandInForge) -> None:
    open_pull(work, forge, 3, {"README.md": "docs only"})
    daemon, _ = make_daemon(tmp_path, work, forge)
    try:
        daemon.reconcile("test")
        daemon.reviews.run_once()
        flush(daemon)
    finally:
        daemon.close()
    (comment,) = plan_comments(forge, 3)
    assert "**No changes**: this pull request would not change any deployment" in comment["body"]


def test_at_most_max_plans_per_round_newest_first(tmp_path: Path, work: Path, forge: StandInForge) -> None:
    heads = {n: open_pull(work, forge, n, {f"models/m{n}.yaml": model(f"m{n}")}) for n in (1, 2, 3)}
    forge.add_pull(4, "feature/other", heads[1], base="release")  # not against repo.branch
    daemon, _ = make_daemon(tmp_path, work, forge, maxPlans=2)
    try:
        daemon.reconcile("test")
        first = daemon.reviews.run_once()
        second = daemon.reviews.run_once()
        assert daemon.reviews.run_once() == []
        flush(daemon)
    finally:
        daemon.close()
    assert first == [heads[3], heads[2]]  # the most recently updated first
    assert second == [heads[1]]
    assert sorted(forge.comments) == [1, 2, 3]


def test_pull_requests_from_forks_are_not_planned_unless_review_forks(tmp_path: Path, work: Path,
                                                                     forge: StandInForge) -> None:
    head = branch(work, "patch-1", {"models/new.yaml": model("new")})
    git(work, "update-ref", "refs/pull/2/head", head)
    forge.add_pull(2, "patch-1", head, fork="someone/models")
    daemon, _ = make_daemon(tmp_path, work, forge)
    try:
        daemon.reconcile("test")
        assert daemon.reviews.run_once() == []
    finally:
        daemon.close()
    assert forge.comments_on(2) == []
    daemon, _ = make_daemon(tmp_path, work, forge, forks=True)
    try:
        daemon.reconcile("test")
        assert daemon.reviews.run_once() == [head]
    finally:
        daemon.close()


def test_a_pull_ref_not_on_the_remote_yet_is_planned_once_it_is(tmp_path: Path, work: Path,
                                                                forge: StandInForge) -> None:
    head = branch(work, "feature/9", {"models/new.yaml": model("new")})
    forge.add_pull(9, "feature/9", head)  # the forge lists it before its ref is there
    daemon, _ = make_daemon(tmp_path, work, forge)
    try:
        daemon.reconcile("test")
        assert daemon.reviews.run_once() == []
        git(work, "update-ref", "refs/pull/9/head", head)
        assert daemon.reviews.run_once() == [head]
    finally:
        daemon.close()


def test_a_forge_that_fails_to_list_is_retried_next_round(tmp_path: Path, work: Path, forge: StandInForge) -> None:
    head = open_pull(work, forge, 1, {"models/new.yaml": model("new")})
    daemon, _ = make_daemon(tmp_path, work, forge)
    try:
        daemon.reconcile("test")
        forge.script = [(503, {"message": "unavailable"})]
        assert daemon.reviews.run_once() == []
        assert "HTTP 503" in daemon.status.to_json()["pullRequests"]["lastError"]
        assert TOKEN not in daemon.status.to_json()["pullRequests"]["lastError"]
        assert daemon.reviews.run_once() == [head]
        assert daemon.status.to_json()["pullRequests"]["lastError"] is None
    finally:
        daemon.close()


def test_merge_request_refs_on_gitlab(tmp_path: Path, work: Path) -> None:
    with StandInForge("gitlab", TOKEN, "platform/models") as forge:
        head = branch(work, "feature/5", {"models/new.yaml": model("new")})
        git(work, "update-ref", "refs/merge-requests/5/head", head)
        forge.add_pull(5, "feature/5", head)
        daemon, recorder = make_daemon(tmp_path, work, forge)
        daemon.reviews.use_forge(GitLabPulls(forge.url, "platform/models", TOKEN, timeout=2))
        try:
            daemon.reconcile("test")
            assert daemon.reviews.run_once() == [head]
            flush(daemon)
        finally:
            daemon.close()
        assert len(plan_comments(forge, 5)) == 1
        assert forge.violations == []
    assert recorder.plan_statuses(head)[-1][0] == "success"


def signed(payload: dict[str, Any], event: str) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(payload).encode()
    signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return body, {"X-Hub-Signature-256": f"sha256={signature}", "X-GitHub-Event": event,
                  "Content-Type": "application/json"}


def test_a_pull_request_webhook_wakes_the_planner_not_a_pass(tmp_path: Path, work: Path, forge: StandInForge) -> None:
    head = open_pull(work, forge, 1, {"models/new.yaml": model("new")})
    daemon, _ = make_daemon(tmp_path, work, forge)
    daemon.reviews.background = True
    passes: list[str] = []
    client = TestClient(make_api(daemon, None, SECRET, passes.append), raise_server_exceptions=False)
    try:
        daemon.reconcile("test")  # the base to plan against (its after_pass plans PR 1 in the background)
        event: dict[str, Any] = {"action": "synchronize", "number": 1,
                 "pull_request": {"number": 1, "base": {"ref": "main"}, "head": {"ref": "feature/1", "sha": head}}}
        body, headers = signed(event, "pull_request")
        answer = client.post("/webhook", content=body, headers=headers)
        assert answer.status_code == 202 and answer.json() == {"queued": "review"}
        second = push_to_pull(work, forge, 1, {"models/new.yaml": model("new", replicas=3)})
        body, headers = signed(event, "pull_request")
        assert client.post("/webhook", content=body, headers=headers).status_code == 202
        deadline = time.monotonic() + 20
        while daemon.reviews.get(second) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert daemon.reviews.get(second) is not None, "the webhook planned the new head"
        flush(daemon)
        assert len(plan_comments(forge, 1)) == 1

        other = {**event, "pull_request": {**event["pull_request"], "base": {"ref": "release"}}}
        body, headers = signed(other, "pull_request")
        answer = client.post("/webhook", content=body, headers=headers)
        assert answer.json() == {"ignored": "pull request against release, watching main"}
        body, headers = signed({"ref": "refs/heads/main"}, "push")
        assert client.post("/webhook", content=body, headers=headers).status_code == 202
    finally:
        daemon.close()
    assert passes == ["webhook"]  # only the push to main triggered a pass


def test_a_pull_request_webhook_without_a_forge_is_ignored(tmp_path: Path, work: Path) -> None:
    config = parse_config(yaml.safe_dump({"repo": {"url": str(work)}, "stateDir": str(tmp_path / "state"),
                                          "status": {"provider": "none"}}))
    daemon = Daemon(config, status_writer=Recorder())
    passes: list[str] = []
    client = TestClient(make_api(daemon, None, SECRET, passes.append), raise_server_exceptions=False)
    try:
        body, headers = signed({"action": "opened", "pull_request": {"base": {"ref": "main"}}}, "pull_request")
        answer = client.post("/webhook", content=body, headers=headers)
    finally:
        daemon.close()
    assert answer.status_code == 200 and "forge status.provider" in answer.json()["ignored"]
    assert passes == []
