"""The plan page's rendering (api/plans.py, templates/plan.html): autoescaped, every section shown."""

from __future__ import annotations

from typing import Any

from modelfleet.reconciler.api.plans import render_plan_page

HEAD = "b" * 40


def document(**extra: Any) -> dict[str, Any]:
    return {
        "branch": "review/x", "revision": HEAD, "base": "a" * 40, "currentBase": "a" * 40, "stale": False,
        "plannedAt": 0.0, "state": "success", "description": "1 to create, 1 to replace, 0 to remove",
        "counts": {"create": 1, "replace": 1, "remove": 0},
        "diff": {"added": [{"model": "new", "environment": "dev"}],
                 "changed": [{"model": "echo", "environment": "production",
                              "changes": [{"field": "replicas", "old": 2, "new": 3},
                                          {"field": "image", "old": "echo:1", "new": "echo:<b>2</b>"}]}],
                 "removed": [{"model": "old", "environment": "production"}]},
        "errors": [],
        "plan": {"deployments": [
            {"model": "echo", "environment": "production", "source": "models/echo.yaml:7", "hosts": ["par-1"],
             "replicas": 3, "errors": [], "excluded_hosts": {"vir-1": "location: not in continent EU"},
             "outcome": {"state": "pending", "message": "rolling out to par-1"}, "runtime": {"image": "echo:2"}},
            {"model": "new", "environment": "dev", "source": "models/new.yaml:3", "hosts": ["fra-1"],
             "replicas": 1, "errors": [], "excluded_hosts": {}, "runtime": {"image": "new:1"}}],
            "actions": [{"op": "create", "model": "new", "environment": "dev", "host": "fra-1", "replica": 0,
                         "reason": "missing", "image": "new:1"},
                        {"op": "replace", "model": "echo", "environment": "production", "host": "par-1",
                         "replica": 0, "reason": "spec changed", "image": "echo:2"}],
            "held": []},
        **extra,
    }


def test_the_page_shows_changes_placement_and_actions_in_order() -> None:
    page = render_plan_page(document(), HEAD)
    for text in ("review/x", "1 to create, 1 to replace, 0 to remove", "new/dev", "old/production",
                 "replicas", "vir-1</b>: location: not in continent EU", "models/echo.yaml:7"):
        assert text in page, text
    assert page.index("<b>create</b> new/dev") < page.index("<b>replace</b> echo/production")
    assert "Stale" not in page


def test_the_page_escapes_what_comes_from_the_repository() -> None:
    page = render_plan_page(document(), HEAD)
    assert "echo:<b>2</b>" not in page and "echo:&lt;b&gt;2&lt;/b&gt;" in page


def test_a_stale_plan_says_so() -> None:
    page = render_plan_page(document(stale=True, currentBase="c" * 40), HEAD)
    assert "Stale" in page and "c" * 12 in page


def test_errors_with_file_line_and_fix() -> None:
    error = {"file": "models/echo.yaml", "line": 9, "field": "spec.deployments[0].replicass",
             "message": "unknown field 'replicass'", "hint": "did you mean 'replicas'?"}
    page = render_plan_page(document(state="failure", errors=[error], plan=None), HEAD)
    assert "models/echo.yaml:9" in page and "did you mean &#39;replicas&#39;?" in page
    assert "Actions, in order" not in page  # nothing was planned


def test_no_plan_kept() -> None:
    page = render_plan_page(None, HEAD)
    assert "No review plan for" in page and HEAD in page


def test_a_pull_request_plan_links_the_pull_request_and_escapes_its_title() -> None:
    pull = {"number": 7, "base": "main", "headBranch": "feature/x", "title": "more <i>echo</i>",
            "url": "https://github.com/acme/models/pull/7"}
    page = render_plan_page(document(pullRequest=pull), HEAD)
    assert '<a\nhref="https://github.com/acme/models/pull/7">#7</a>' in page
    assert "more &lt;i&gt;echo&lt;/i&gt;" in page
    page = render_plan_page(document(pullRequest={**pull, "url": "javascript:alert(1)"}), HEAD)
    assert "javascript:" not in page and "#7" in page
    assert "Pull request" not in render_plan_page(document(), HEAD)
