"""Token limits (state/token_limits.py): the maxToken policy algebra and the verdict, table-tested."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from modelfleet.state.token_limits import (
    TokenBudget,
    TokenCounts,
    TokenLayer,
    TokenLimits,
    add_usage,
    current,
    estimated_tokens,
    merge_usage,
    token_verdict,
    window_end,
    window_start,
)
from tests.state.helpers import desired_of, fixture_pool, tree

# 2026-12-03 14:30:15 UTC: 45 s before the minute ends, 29m45s before the hour does.
NOW = datetime(2026, 12, 3, 14, 30, 15, tzinfo=UTC).timestamp()


def _policy(name: str, granularity: str, **limits: int) -> str:
    fields = ", ".join(f"{k}: {v}" for k, v in limits.items())
    return (f"apiVersion: modelfleet.dev/v1alpha1\nkind: Policy\nmetadata: {{name: {name}}}\n"
            f"spec:\n  type: maxToken\n  maxTokens: {{granularity: {granularity}, {fields}}}\n")


def _repo(env_policies: list[str], dep_policies: list[str], policies: list[str]) -> dict[str, bytes]:
    deployment = ("    - environment: production\n"
                  f"      policies: [{', '.join(dep_policies)}]\n"
                  "      runtime: {type: custom, image: example/echo:1, resources: {cpus: 0.5, memory: 256Mi}}\n")
    return tree(**{
        "policies.yaml": "---\n".join(policies),
        "environments.yaml": ("apiVersion: modelfleet.dev/v1alpha1\nkind: Environment\nmetadata: {name: production}\n"
                              f"spec:\n  policies: [{', '.join(env_policies)}]\n"),
        "models/m.yaml": ("apiVersion: modelfleet.dev/v1alpha1\nkind: Model\nmetadata: {name: m}\nspec:\n"
                          "  deployments:\n" + deployment),
    })


def _limits_of(files: dict[str, bytes]) -> TokenLimits | None:
    catalog, desired = desired_of(files, fixture_pool())
    assert catalog.all_errors() == []
    return desired.deployments[("m", "production")].token_limits


def _usage(granularity: str, input: int = 0, output: int = 0, now: float = NOW) -> dict[str, tuple[float, TokenCounts]]:
    return {granularity: (window_start(granularity, now), TokenCounts(input, output))}


def test_no_max_token_policy_no_limits() -> None:
    files = _repo([], [], [_policy("unused", "minute", total=10)])
    assert _limits_of(files) is None


def test_limits_come_from_environment_and_deployment_layers() -> None:
    files = _repo(["env-small", "env-big"], ["dep"], [
        _policy("env-small", "minute", total=100), _policy("env-big", "hour", input=5000),
        _policy("dep", "day", output=7)])
    limits = _limits_of(files)
    assert limits is not None
    assert [layer.owner for layer in limits.layers] == ['environment "production"', "the deployment"]
    assert limits.layers[0].budgets == (TokenBudget("env-small", "minute", total=100),
                                        TokenBudget("env-big", "hour", input=5000))
    assert limits.layers[1].budgets == (TokenBudget("dep", "day", output=7),)
    assert limits.granularities == {"minute", "hour", "day"}
    assert "100 total tokens per minute (policy env-small) or 5000 input tokens per hour" in limits.describe()
    assert TokenLimits.from_dict(limits.to_dict()) == limits


ONE = TokenLimits((TokenLayer("env", (TokenBudget("p", "minute", total=100),)),))
UNION = TokenLimits((TokenLayer("env", (TokenBudget("small", "minute", total=100),
                                        TokenBudget("big", "minute", total=300))),))
INTERSECTION = TokenLimits((TokenLayer("env", (TokenBudget("env", "minute", total=300),)),
                            TokenLayer("dep", (TokenBudget("dep", "minute", total=100),))))
KINDS = TokenLimits((TokenLayer("env", (TokenBudget("p", "hour", input=50, output=20),)),))
MIXED = TokenLimits((TokenLayer("env", (TokenBudget("per-minute", "minute", total=100),
                                        TokenBudget("per-hour", "hour", total=1000))),))

VERDICTS = [
    # name, limits, usage, refused?, retry-after (s) when refused
    ("under the limit", ONE, _usage("minute", 60, 39), False, None),
    ("at the limit: refused until the minute ends", ONE, _usage("minute", 60, 40), True, 45),
    ("an older window counts nothing", ONE, _usage("minute", 500, 0, now=NOW - 60), False, None),
    ("union: the most permissive budget decides (still room)", UNION, _usage("minute", 200), False, None),
    ("union: refused once every budget is used up", UNION, _usage("minute", 300), True, 45),
    ("intersection: the stricter party decides", INTERSECTION, _usage("minute", 100), True, 45),
    ("intersection: both under their limits", INTERSECTION, _usage("minute", 99), False, None),
    ("input limit reached, output still free: refused", KINDS, _usage("hour", 50, 0), True, 1785),
    ("output limit reached: refused", KINDS, _usage("hour", 0, 20), True, 1785),
    ("both kinds under their limits", KINDS, _usage("hour", 49, 19), False, None),
    ("mixed granularities: the hour still has room", MIXED, {**_usage("minute", 100), **_usage("hour", 100)},
     False, None),
    ("mixed granularities: both used up, the minute frees first", MIXED,
     {**_usage("minute", 100), **_usage("hour", 1000)}, True, 45),
]


@pytest.mark.parametrize(("name", "limits", "usage", "refused", "retry_after"), VERDICTS,
                         ids=[v[0] for v in VERDICTS])
def test_token_verdict(name: str, limits: TokenLimits, usage: dict[str, tuple[float, TokenCounts]],
                       refused: bool, retry_after: int | None) -> None:
    verdict = token_verdict(limits, usage, NOW)
    assert (verdict is not None) == refused
    if verdict is not None:
        assert verdict.retry_after == retry_after
        assert "token limit reached" in verdict.message


def test_refusal_names_the_policies_and_the_usage() -> None:
    verdict = token_verdict(INTERSECTION, _usage("minute", 120), NOW)
    assert verdict is not None
    assert "dep: 120 of 100 total tokens this minute (policy dep)" in verdict.message
    assert "env:" not in verdict.message  # the environment's budget still has room


def test_intersection_waits_for_the_latest_layer_to_free() -> None:
    limits = TokenLimits((TokenLayer("env", (TokenBudget("m", "minute", total=10),)),
                          TokenLayer("dep", (TokenBudget("h", "hour", total=10),))))
    verdict = token_verdict(limits, {**_usage("minute", 10), **_usage("hour", 10)}, NOW)
    assert verdict is not None and verdict.retry_after == 1785


@pytest.mark.parametrize(("granularity", "moment", "start", "end"), [
    ("minute", datetime(2026, 12, 3, 14, 30, 15), datetime(2026, 12, 3, 14, 30), datetime(2026, 12, 3, 14, 31)),
    ("hour", datetime(2026, 12, 3, 14, 30, 15), datetime(2026, 12, 3, 14), datetime(2026, 12, 3, 15)),
    ("day", datetime(2026, 12, 3, 14, 30, 15), datetime(2026, 12, 3), datetime(2026, 12, 4)),
    ("month", datetime(2026, 12, 3, 14, 30, 15), datetime(2026, 12, 1), datetime(2027, 1, 1)),
    ("month", datetime(2026, 2, 28, 23, 59), datetime(2026, 2, 1), datetime(2026, 3, 1)),
])
def test_windows_are_utc_calendar_periods(granularity: str, moment: datetime, start: datetime,
                                          end: datetime) -> None:
    begins = window_start(granularity, moment.replace(tzinfo=UTC).timestamp())
    assert begins == start.replace(tzinfo=UTC).timestamp()
    assert window_end(granularity, begins) == end.replace(tzinfo=UTC).timestamp()


def test_usage_adds_within_a_window_and_restarts_in_the_next() -> None:
    usage = add_usage({}, TokenCounts(10, 5), NOW)
    usage = add_usage(usage, TokenCounts(1, 1), NOW + 30)
    assert current(usage, "minute", NOW + 30) == TokenCounts(11, 6)
    later = add_usage(usage, TokenCounts(2, 0), NOW + 60)  # the next minute, the same hour
    assert current(later, "minute", NOW + 60) == TokenCounts(2, 0)
    assert current(later, "hour", NOW + 60) == TokenCounts(13, 6)
    merged = merge_usage(usage, later, now=NOW + 60)
    assert current(merged, "minute", NOW + 60) == TokenCounts(2, 0)  # `usage`'s minute is over
    assert current(merged, "hour", NOW + 60) == TokenCounts(24, 12)


def test_estimate_is_a_quarter_of_the_bytes() -> None:
    assert estimated_tokens(0) == 0
    assert estimated_tokens(1) == 1
    assert estimated_tokens(400) == 100


def test_a_budget_that_limits_nothing_is_rejected_with_the_fix() -> None:
    files = _repo(["empty"], [], ["apiVersion: modelfleet.dev/v1alpha1\nkind: Policy\nmetadata: {name: empty}\n"
                                  "spec:\n  type: maxToken\n  maxTokens: {granularity: hour}\n"])
    catalog, _ = desired_of(files, fixture_pool())
    messages = [str(e) for e in catalog.all_errors()]
    assert any("policies.yaml" in m and "maxTokens limits nothing" in m and "input, output, total" in m
               for m in messages), messages
