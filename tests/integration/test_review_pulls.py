"""Plans on pull requests with the real daemon on real dockerd hosts: the repository served over
git://, the forge's API a stand-in GitHub (no forge can run here) that lists pull request #1 and keeps
its statuses and comments. The pull request's head is pushed to refs/pull/1/head like GitHub keeps
it; its webhook wakes the review planner. The head gets a modelfleet/plan status and exactly one
comment, which is edited in place (not a second one) after a second push; nothing of the pull
request is applied: main's containers stay as they are."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from netns_hosts import TestHost

from modelfleet.state.pulls import COMMENT_MARKER
from tests.integration.fleet import BASE_MANIFESTS, Fleet, echo_model, free_port, git, make_fleet, running
from tests.reconciler.status.forge_standin import StandInForge

TOKEN = "tok-pulls-integration-9d8c7b6a"
SECRET = "webhook-secret-pulls-1f2e3d"


@pytest.fixture
def git_daemon(tmp_path: Path) -> Iterator[str]:
    """git:// on loopback serving the test's directory (repo.url names owner/name for the forge)."""
    port = free_port()
    proc = subprocess.Popen(["git", "daemon", "--reuseaddr", "--export-all", f"--base-path={tmp_path.parent}",
                             "--listen=127.0.0.1", f"--port={port}", str(tmp_path.parent)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        yield f"git://127.0.0.1:{port}/{tmp_path.name}/origin.git"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def push_pull_head(fleet: Fleet, number: int, files: dict[str, Any], message: str) -> str:
    """Commit on feature/<number> and push it where GitHub keeps a pull request's head."""
    branch = f"feature/{number}"
    exists = subprocess.run(["git", "rev-parse", "--verify", "-q", branch], cwd=fleet.work,
                            capture_output=True).returncode == 0
    git(fleet.work, "checkout", "-q", *([branch] if exists else ["-b", branch, "main"]))
    fleet.write(files)
    git(fleet.work, "add", "-A")
    git(fleet.work, "commit", "-q", "-m", message)
    head = git(fleet.work, "rev-parse", "HEAD")
    git(fleet.work, "push", "-q", "origin", f"{branch}:refs/heads/{branch}", f"+{head}:refs/pull/{number}/head")
    git(fleet.work, "checkout", "-q", "main")
    return head


def pull_request_webhook(fleet: Fleet, number: int, head: str, action: str) -> httpx.Response:
    payload = {"action": action, "number": number,
               "pull_request": {"number": number, "base": {"ref": "main"},
                                "head": {"ref": f"feature/{number}", "sha": head}}}
    body = json.dumps(payload).encode()
    signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return fleet.api("/webhook", method="POST", content=body,
                     headers={"X-GitHub-Event": "pull_request", "X-Hub-Signature-256": f"sha256={signature}",
                              "Content-Type": "application/json"})


def plan_status(forge: StandInForge, head: str) -> dict[str, Any]:
    """The last modelfleet/plan status written on ``head`` once it is final (success or failure)."""
    bodies = [r.body for r in list(forge.requests) if r.sha == head and isinstance(r.body, dict)
              and r.body.get("context") == "modelfleet/plan"]
    return bodies[-1] if bodies and bodies[-1].get("state") in ("success", "failure") else {}


def plan_comments(forge: StandInForge, number: int) -> list[dict[str, Any]]:
    return [c for c in forge.comments_on(number) if c["body"].startswith(COMMENT_MARKER)]


def test_a_pull_request_is_planned_commented_once_and_never_applied(
        tmp_path: Path, clean_hosts: list[TestHost], git_daemon: str) -> None:
    token_file, secret_file = tmp_path / "forge-token", tmp_path / "webhook-secret"
    token_file.write_text(TOKEN + "\n")
    secret_file.write_text(SECRET + "\n")
    with StandInForge("github", TOKEN, f"{tmp_path.name}/origin") as forge:
        # A long poll interval: what refreshes the pull request's plan at once is its webhook.
        fleet = make_fleet(tmp_path, clean_hosts[:2],
                           repo={"url": git_daemon, "branch": "main", "pollInterval": "60s", "watch": False,
                                 "webhookSecretFile": str(secret_file)},
                           status={"provider": "github", "url": forge.url, "tokenFile": str(token_file)},
                           review={"timeout": "20s"})
        main = fleet.push({**BASE_MANIFESTS, "models/echo.yaml": echo_model(replicas=1)}, "initial")
        with running(fleet):
            fleet.wait(lambda: fleet.deployment("echo").get("state") == "success" and fleet.routed(), 60,
                       "echo deployed from main")
            before = sorted((c["host"], c["name"], c["id"]) for c in fleet.containers())
            assert len(before) == 1
            # One pass that observes echo running: the base review plans start from (the pass that
            # created it planned from the pool before).
            last = fleet.status()["lastPass"]["id"]
            fleet.api("/api/v1/sync", method="POST")
            fleet.wait(lambda: fleet.status()["lastPass"]["id"] > last, 30, "a pass on the converged pool")

            # Pull request #1: two replicas of echo and a new model.
            first = push_pull_head(fleet, 1, {
                "models/echo.yaml": echo_model(replicas=2),
                "models/extra.yaml": echo_model("extra", environment="development", replicas=1),
            }, "more echo, and extra")
            forge.add_pull(1, "feature/1", first, title="more echo")
            forge.add_comment(1, "a reviewer: looks fine to me")
            sent = time.monotonic()
            answer = pull_request_webhook(fleet, 1, first, "opened")
            assert answer.status_code == 202 and answer.json() == {"queued": "review"}
            status = fleet.wait(lambda: plan_status(forge, first), 30, "the plan status of pull request #1")
            (comment,) = fleet.wait(lambda: plan_comments(forge, 1), 30, "the plan comment on pull request #1")
            first_latency = time.monotonic() - sent
            assert status["state"] == "success", status
            assert status["description"] == "2 to create, 0 to replace, 0 to remove", \
                fleet.api(f"/api/v1/plans/{first}").json()["plan"]["actions"]
            assert status["target_url"] == f"http://127.0.0.1:{fleet.api_port}/plans/{first}"
            body = comment["body"]
            assert f"`{first[:12]}` planned against `main` at `{main[:12]}`" in body
            assert "**Added**: `extra/development`" in body
            assert "| `echo/production` | replicas | `1` | `2` |" in body
            assert f"[Full plan](http://127.0.0.1:{fleet.api_port}/plans/{first})" in body
            document = fleet.api(f"/api/v1/plans/{first}").json()
            assert document["pullRequest"]["number"] == 1 and document["base"] == main

            # A second push to the pull request: the same comment is edited, not a second one.
            second = push_pull_head(fleet, 1, {"models/echo.yaml": echo_model(replicas=3)}, "three")
            forge.move_pull(1, second)
            sent = time.monotonic()
            assert pull_request_webhook(fleet, 1, second, "synchronize").status_code == 202
            fleet.wait(lambda: plan_status(forge, second), 30, "the plan status of the second head")
            fleet.wait(lambda: f"`{second[:12]}`" in (plan_comments(forge, 1) or [{"body": ""}])[0]["body"], 30,
                       "the comment edited for the second head")
            second_latency = time.monotonic() - sent
            (edited,) = plan_comments(forge, 1)
            assert edited["id"] == comment["id"]
            assert "| `echo/production` | replicas | `1` | `3` |" in edited["body"]
            assert f"`{first[:12]}`" not in edited["body"]
            assert len(forge.comments_on(1)) == 2  # ours and the reviewer's
            shown = fleet.status()["pullRequests"]
            assert shown["planned"] == {"1": second} and shown["lastError"] is None
            assert shown["repository"] == f"{tmp_path.name}/origin"
            methods = [(r.method, r.path.split("?")[0]) for r in forge.requests if "/issues/" in r.path]
            assert [m for m, _ in methods].count("POST") == 1 and [m for m, _ in methods].count("PATCH") == 1

            # Nothing of the pull request is applied: main's one container, untouched, no extra.
            last = fleet.status()["lastPass"]["id"]
            fleet.api("/api/v1/sync", method="POST")
            fleet.wait(lambda: fleet.status()["lastPass"]["id"] > last, 30, "one more pass")
            assert sorted((c["host"], c["name"], c["id"]) for c in fleet.containers()) == before
            assert fleet.status()["revision"] == main
            assert fleet.deployment("extra", "development") == {}
            assert git(fleet.work, "rev-parse", "origin/main") == main
            assert forge.violations == []
            assert TOKEN not in fleet.log()
    print(f"\nwebhook -> status + comment: first head {first_latency:.2f}s, second head {second_latency:.2f}s")
