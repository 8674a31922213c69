"""What the daemon reports about its Git source, from the last fetch and the stored fact (pure)."""

from __future__ import annotations

from modelfleet.state.source import (
    BRANCH_MISSING,
    MIRROR_UNWRITABLE,
    NOTHING_FETCHED,
    REMOTE_UNREACHABLE,
    SOURCE_CONTEXT,
    SYNCED,
    FetchFailure,
    iso,
    nothing_fetched,
    source_health,
)

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
REV = "a" * 40
UNREACHABLE = FetchFailure(REMOTE_UNREACHABLE, "fatal: unable to connect to 10.9.0.2: No route to host",
                           "git://10.9.0.2/origin.git", "main")


def test_a_first_failed_fetch_starts_the_outage_now_and_says_so_everywhere() -> None:
    health = source_health(UNREACHABLE, REV, None, None, T0)
    assert health.fact == {"since": T0, "revision": REV, "reason": REMOTE_UNREACHABLE}
    assert health.error is not None
    assert health.error.startswith("git remote unreachable since 2023-11-14T22:13:20Z: fatal: unable to connect")
    assert REV[:12] in health.error and "stays deployed" in health.error
    assert (health.condition.type, health.condition.status, health.condition.reason) == (
        "SourceSynced", "False", REMOTE_UNREACHABLE)
    [(commit, status)] = health.statuses
    assert commit == REV and status.context == SOURCE_CONTEXT and status.state == "error"
    assert status.description == health.error


def test_the_outage_keeps_its_start_from_the_store_across_passes_and_restarts() -> None:
    first = source_health(UNREACHABLE, REV, None, None, T0)
    later = source_health(UNREACHABLE, REV, first.fact, None, T0 + 3600)  # previous condition lost: a restart
    assert later.fact == first.fact and later.error == first.error
    again = source_health(UNREACHABLE, REV, later.fact, later.condition, T0 + 7200)
    assert again.condition.last_transition_time == later.condition.last_transition_time == T0 + 3600


def test_recovery_clears_the_fact_and_resolves_the_commit_that_was_annotated() -> None:
    failing = source_health(UNREACHABLE, REV, None, None, T0)
    newer = "b" * 40
    health = source_health(None, newer, failing.fact, failing.condition, T0 + 60)
    assert health.fact is None and health.error is None
    assert (health.condition.status, health.condition.reason) == ("True", SYNCED)
    assert health.condition.last_transition_time == T0 + 60
    [(commit, status)] = health.statuses
    assert commit == REV and status.context == SOURCE_CONTEXT and status.state == "success"
    assert iso(T0) in status.description
    # Once recovered, nothing more to publish.
    assert source_health(None, newer, health.fact, health.condition, T0 + 90).statuses == ()


def test_a_missing_branch_names_the_branch_and_the_remote() -> None:
    failure = FetchFailure(BRANCH_MISSING, "fatal: couldn't find remote ref refs/heads/main",
                           "https://git.example/models.git", "main")
    health = source_health(failure, REV, None, None, T0)
    assert health.error is not None
    assert health.error.startswith("branch 'main' not found on remote https://git.example/models.git since")
    assert "repo.branch" in health.error and health.condition.reason == BRANCH_MISSING


def test_a_mirror_that_cannot_be_written_says_where_to_look() -> None:
    failure = FetchFailure(MIRROR_UNWRITABLE, "fatal: write error: No space left on device", "/srv/git", "main")
    health = source_health(failure, REV, None, None, T0)
    assert health.error is not None and "stateDir" in health.error and "No space left" in health.error


def test_a_fact_we_did_not_write_is_ignored() -> None:
    for fact in ("garbage", {"since": "yesterday"}, {"since": True}, 42):
        health = source_health(UNREACHABLE, REV, fact, None, T0)
        assert health.fact is not None and health.fact["since"] == T0
        assert source_health(None, REV, fact, None, T0).statuses == ()


def test_nothing_fetched_is_its_own_reason() -> None:
    condition = nothing_fetched("fetching branch main failed: ...", None, T0)
    assert (condition.status, condition.reason, condition.last_transition_time) == ("False", NOTHING_FETCHED, T0)
