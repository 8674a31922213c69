"""The health of the Git source, decided from what the last fetch said (pure).

A fetch that fails while a commit was fetched before does not stop the daemon: the pass goes on
with that commit (drift repair continues), and this module says what the user is told — the
``sourceError`` of ``/api/v1/status``, the ``SourceSynced`` condition, and the ``modelfleet/source``
commit status on the commit being deployed — and what is remembered in the store (since when the
source fails, so that it survives a restart). The clock is an input (``now``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from modelfleet.state.status import CommitStatus, Condition

# Reasons of the SourceSynced condition (constants users can match on).
SYNCED = "Synced"
REMOTE_UNREACHABLE = "RemoteUnreachable"
BRANCH_MISSING = "BranchMissing"
MIRROR_UNWRITABLE = "MirrorUnwritable"  # the fetch cannot write into stateDir (disk full, read-only)
NOTHING_FETCHED = "NothingFetched"  # the fetch fails and no commit was ever fetched: the pass fails
SOURCE_CONDITION = "SourceSynced"
# The commit status that says the daemon cannot see the branch beyond this commit (and, once the
# source answers again, that it can).
SOURCE_CONTEXT = "modelfleet/source"


@dataclass(frozen=True)
class FetchFailure:
    """A fetch that failed: why (a reason above), what git said (redacted), from where."""

    reason: str
    detail: str
    remote: str  # redacted URL
    branch: str


@dataclass(frozen=True)
class SourceHealth:
    fact: dict[str, Any] | None  # the store fact (FACT_SOURCE_UNREACHABLE_SINCE): None once the source syncs
    error: str | None  # sourceError
    condition: Condition
    statuses: tuple[tuple[str, CommitStatus], ...]  # (commit, status) to publish


def iso(moment: float) -> str:
    """``2024-05-01T12:00:00Z`` (UTC, seconds)."""
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def failing_since(fact: Any) -> tuple[float, str | None] | None:
    """(since, commit annotated) of a stored fact; None when the source synced last (or the fact is
    not one we wrote)."""
    if not isinstance(fact, Mapping):
        return None
    since, revision = fact.get("since"), fact.get("revision")
    if not isinstance(since, int | float) or isinstance(since, bool):
        return None
    return float(since), revision if isinstance(revision, str) else None


def failure_message(failure: FetchFailure, since: float, revision: str) -> str:
    """The sourceError (gist first: forges cut commit-status descriptions at ~140 characters)."""
    keep = f"the last fetched commit {revision[:12]} stays deployed (drift is still repaired)"
    if failure.reason == BRANCH_MISSING:
        return (f"branch {failure.branch!r} not found on remote {failure.remote} since {iso(since)} "
                f"(deleted or renamed? push it again or set repo.branch): {failure.detail}; {keep}")
    if failure.reason == MIRROR_UNWRITABLE:
        return (f"cannot write the fetched commits into the local mirror since {iso(since)} (free space in "
                f"stateDir): {failure.detail}; {keep}")
    return f"git remote unreachable since {iso(since)}: {failure.detail}; {keep}"


def _condition(status: str, reason: str, message: str, previous: Condition | None, now: float) -> Condition:
    # Keep the transition time while the status does not change.
    since = previous.last_transition_time if previous is not None and previous.status == status else now
    return Condition(SOURCE_CONDITION, status, reason, message, since)


def source_health(failure: FetchFailure | None, revision: str, fact: Any, previous: Condition | None,
                  now: float) -> SourceHealth:
    """What the pass reports about its source. ``failure`` is None when the fetch worked; else the
    pass deploys ``revision``, the commit fetched last. ``fact`` is what the store remembers."""
    known = failing_since(fact)
    if failure is None:
        condition = _condition("True", SYNCED, f"branch at {revision[:12]}", previous, now)
        statuses: tuple[tuple[str, CommitStatus], ...] = ()
        if known is not None and known[1] is not None:
            statuses = ((known[1], CommitStatus(
                SOURCE_CONTEXT, "success",
                f"git source syncs again since {iso(now)} (it failed from {iso(known[0])})")),)
        return SourceHealth(None, None, condition, statuses)
    since = known[0] if known is not None else now
    message = failure_message(failure, since, revision)
    return SourceHealth(
        {"since": since, "revision": revision, "reason": failure.reason},
        message,
        _condition("False", failure.reason, message, previous, now),
        ((revision, CommitStatus(SOURCE_CONTEXT, "error", message)),),
    )


def nothing_fetched(message: str, previous: Condition | None, now: float) -> Condition:
    """The condition when the fetch fails and no commit was ever fetched (the pass fails)."""
    return _condition("False", NOTHING_FETCHED, message, previous, now)
