"""state/pulls.py: which pull requests a round plans, which comment is ours, what it says, where a
webhook goes."""

from __future__ import annotations

from typing import Any

import pytest

from modelfleet.state.pulls import (
    COMMENT_MARKER,
    Comment,
    PullRequest,
    comment_markdown,
    own_comment,
    select_pulls,
    webhook_route,
)

SHA = "a" * 40


def pull(number: int, updated: str = "", base: str = "main") -> PullRequest:
    return PullRequest(number, base, f"feature/{number}", SHA, f"change {number}", "", updated)


# --- listing --------------------------------------------------------------------------------------


def test_newest_first_by_last_update_then_number() -> None:
    pulls = [pull(1, "2026-12-01T10:00:00Z"), pull(2, "2026-12-01T09:00:00Z"), pull(3, "2026-12-01T11:00:00Z"),
             pull(4), pull(5)]
    assert [p.number for p in select_pulls(pulls, "main", 10)] == [3, 1, 2, 5, 4]


def test_update_times_with_offsets_are_compared_as_instants() -> None:
    # 11:30+02:00 is 09:30Z: older than 10:00Z.
    pulls = [pull(1, "2026-12-01T11:30:00+02:00"), pull(2, "2026-12-01T10:00:00Z")]
    assert [p.number for p in select_pulls(pulls, "main", 10)] == [2, 1]


def test_only_pull_requests_against_the_tracked_branch_and_at_most_the_limit() -> None:
    pulls = [pull(1, base="main"), pull(2, base="release"), pull(3, base="main"), pull(4, base="main")]
    assert [p.number for p in select_pulls(pulls, "main", 2)] == [4, 3]
    assert select_pulls(pulls, "main", 0) == []


def test_pull_requests_from_forks_only_when_asked() -> None:
    ours, theirs = pull(1), PullRequest(2, "main", "patch-1", SHA, "from a fork", "", "", from_fork=True)
    assert select_pulls([ours, theirs], "main", 5) == [ours]
    assert select_pulls([ours, theirs], "main", 5, forks=True) == [theirs, ours]


def test_a_pull_request_listed_twice_is_planned_once() -> None:
    pulls = [pull(7, "2026-12-01T10:00:00Z"), pull(7, "2026-12-01T10:00:00Z")]
    assert [p.number for p in select_pulls(pulls, "main", 5)] == [7]


# --- our comment ----------------------------------------------------------------------------------


def test_own_comment_is_the_oldest_that_starts_with_the_marker() -> None:
    comments = [Comment(10, "LGTM"), Comment(12, f"{COMMENT_MARKER}\n### modelfleet plan"),
                Comment(11, f"\n{COMMENT_MARKER}\nolder one"), Comment(13, "nice")]
    found = own_comment(comments)
    assert found is not None and found.id == 11


def test_a_quote_of_our_comment_is_not_ours() -> None:
    quoted = f"> {COMMENT_MARKER}\n> ### modelfleet plan\n\nwhy does it remove echo?"
    assert own_comment([Comment(5, quoted), Comment(6, "thanks")]) is None
    assert own_comment([]) is None


# --- what the comment says ------------------------------------------------------------------------


def document(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "branch": "feature/x", "revision": "b" * 40, "base": "c" * 40, "plannedAt": 1764756000.0,
        "state": "success", "description": "1 to create, 1 to replace, 0 to remove",
        "counts": {"create": 1, "replace": 1, "remove": 0, "start": 0, "stop": 0},
        "diff": {"added": [{"model": "extra", "environment": "development"}],
                 "changed": [{"model": "echo", "environment": "production",
                              "changes": [{"field": "replicas", "old": 2, "new": 3},
                                          {"field": "hosts", "old": ["par-0"], "new": ["par-0", "fra-1"]}]}],
                 "removed": []},
        "errors": [],
        "plan": {"actions": [{"op": "create", "model": "extra", "environment": "development", "host": "vir-2",
                              "reason": "new deployment"},
                             {"op": "replace", "model": "echo", "environment": "production", "host": "par-0",
                              "reason": "spec changed"}]},
    }
    return {**base, **overrides}


def test_the_comment_starts_with_the_marker_and_shows_the_plan() -> None:
    text = comment_markdown(document(), "http://fleet:8081/plans/" + "b" * 40, "main")
    assert text.startswith(COMMENT_MARKER + "\n")
    assert "### modelfleet plan ✅ success" in text
    assert "`bbbbbbbbbbbb` planned against `main` at `cccccccccccc`" in text
    assert "**1 to create, 1 to replace, 0 to remove**" in text
    assert "[Full plan](http://fleet:8081/plans/" + "b" * 40 + ")" in text
    assert "**Added**: `extra/development`" in text
    assert "| `echo/production` | replicas | `2` | `3` |" in text
    assert "| `echo/production` | hosts | `par-0` | `par-0, fra-1` |" in text
    assert "- create `extra/development` on `vir-2` — new deployment" in text
    assert "No changes" not in text
    assert own_comment([Comment(1, text)]) is not None


def test_an_empty_diff_says_so() -> None:
    text = comment_markdown(document(description="0 to create, 0 to replace, 0 to remove",
                                     diff={"added": [], "changed": [], "removed": []}, plan={"actions": []}),
                            "http://x/plans/b", "main")
    assert "**No changes**: this pull request would not change any deployment" in text
    assert "**Actions**" not in text and "**Changed**" not in text


def test_errors_are_listed_with_file_and_line_and_no_changes_is_not_claimed() -> None:
    error = {"file": "models/echo.yaml", "line": 7, "field": "spec.deployments[0].replicass",
             "message": "unknown key", "hint": "remove it", "text": "models/echo.yaml:7: spec.deployments[0]."
                                                                    "replicass: unknown key"}
    text = comment_markdown(document(state="failure", description="models/echo.yaml:7: unknown key",
                                     errors=[error], diff={"added": [], "changed": [], "removed": []},
                                     plan={"actions": []}), "http://x/plans/b", "main")
    assert "### modelfleet plan ❌ failure" in text
    assert "- `models/echo.yaml:7: spec.deployments[0].replicass: unknown key` — remove it" in text
    assert "No changes" not in text


def test_a_head_that_could_not_be_planned_says_why() -> None:
    text = comment_markdown(document(state="failure", plan=None, diff={"added": [], "changed": [], "removed": []},
                                     description="planning took longer than review.timeout (10s)"),
                            "http://x/plans/b", "main")
    assert "could not be planned: planning took longer than review.timeout (10s)" in text
    assert "No changes" not in text


def test_manifest_text_cannot_break_out_of_the_markdown() -> None:
    text = comment_markdown(document(diff={"added": [], "removed": [], "changed": [
        {"model": "echo", "environment": "production",
         "changes": [{"field": "image", "old": "a|b", "new": "x`y\n<script>"}]}]}), "http://x/p", "main")
    assert "| `echo/production` | image | `a\\|b` | `x'y <script>` |" in text
    assert "\n<script>" not in text


# --- webhooks -------------------------------------------------------------------------------------


def github_pull_event(base: str = "main", action: str = "synchronize") -> dict[str, Any]:
    return {"action": action, "number": 1, "pull_request": {"number": 1, "base": {"ref": base},
                                                            "head": {"ref": "feature/x", "sha": SHA}}}


def gitlab_mr_event(target: str = "main") -> dict[str, Any]:
    return {"object_kind": "merge_request", "object_attributes": {"iid": 3, "target_branch": target,
                                                                  "action": "update", "last_commit": {"id": SHA}}}


@pytest.mark.parametrize(("headers", "payload", "kind"), [
    ({"X-GitHub-Event": "pull_request"}, github_pull_event(), "review"),
    ({"X-GitHub-Event": "pull_request"}, github_pull_event(action="opened"), "review"),
    ({"X-Gitea-Event": "pull_request", "X-GitHub-Event": "pull_request"}, github_pull_event(), "review"),
    ({"X-Forgejo-Event": "pull_request"}, github_pull_event(), "review"),
    ({"X-Gitea-Event": "pull_request_sync"}, github_pull_event(), "review"),
    ({"X-Gitlab-Event": "Merge Request Hook"}, gitlab_mr_event(), "review"),
    ({"X-GitHub-Event": "pull_request"}, github_pull_event(base="release"), "ignore"),
    ({"X-Gitlab-Event": "Merge Request Hook"}, gitlab_mr_event("develop"), "ignore"),
    ({"X-GitHub-Event": "push"}, {"ref": "refs/heads/main"}, "pass"),
    ({"X-Gitlab-Event": "Push Hook"}, {"object_kind": "push", "ref": "refs/heads/main"}, "pass"),
    ({"X-GitHub-Event": "push"}, {"ref": "refs/heads/feature/x"}, "ignore"),
    ({}, {"ref": "refs/heads/main"}, "pass"),
    ({}, {}, "pass"),
    ({"X-GitHub-Event": "ping"}, {"zen": "Keep it logically awesome."}, "pass"),
])
def test_webhook_routing(headers: dict[str, str], payload: dict[str, Any], kind: str) -> None:
    assert webhook_route(headers, payload, "main").kind == kind


def test_ignored_webhooks_say_why() -> None:
    assert webhook_route({"x-github-event": "pull_request"}, github_pull_event(base="release"), "main").reason == \
        "pull request against release, watching main"
    assert webhook_route({}, {"ref": "refs/heads/dev"}, "main").reason == "push to dev, watching main"
