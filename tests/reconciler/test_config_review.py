"""review: settings (review branches) and api.publicUrl."""

from __future__ import annotations

import pytest

from modelfleet.reconciler.config import ConfigError, parse_config


def test_review_is_off_by_default() -> None:
    config = parse_config("{}")
    assert config.review.branches == [] and config.review.max_plans == 5 and config.review.timeout == 10.0
    assert config.api.public_url is None


def test_review_settings_as_documented() -> None:
    config = parse_config('review: {branches: ["review/*", "feature/*"], maxPlans: 3, timeout: 2s}\n'
                          "api: {publicUrl: https://modelfleet.example.com}\n")
    assert config.review.branches == ["review/*", "feature/*"]
    assert config.review.max_plans == 3 and config.review.timeout == 2.0
    assert config.api.public_url == "https://modelfleet.example.com"


@pytest.mark.parametrize("pattern", ["review/**", "a?b", "[ab]", "refs/heads/x", "x..y", "-x", "x/", ""])
def test_a_branch_glob_git_cannot_fetch_is_an_error_with_its_line(pattern: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(f"stateDir: /tmp\nreview:\n  branches: [{pattern!r}]\n")
    assert "modelfleet.yaml:3: review.branches[0]" in str(caught.value)
    assert "at most one '*'" in str(caught.value)


def test_max_plans_must_be_positive() -> None:
    with pytest.raises(ConfigError, match=r"review\.maxPlans"):
        parse_config("review: {maxPlans: 0}")


def test_pull_requests_and_comments_are_on_by_default_and_can_be_turned_off() -> None:
    config = parse_config("{}")
    assert config.review.pull_requests is True and config.review.comment is True
    config = parse_config("review: {pullRequests: false, comment: false}")
    assert config.review.pull_requests is False and config.review.comment is False


def test_a_pull_requests_setting_that_is_not_a_boolean_names_its_line() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config("stateDir: /tmp\nreview:\n  pullRequests: sometimes\n")
    assert "modelfleet.yaml:3: review.pullRequests" in str(caught.value)
