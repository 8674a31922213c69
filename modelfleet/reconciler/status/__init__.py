"""Commit status writers: git notes (embedded default) and forge APIs (Gitea, GitHub, GitLab).

What a status says is decided in the pure core (modelfleet.state.status); this package only writes it.
"""

from __future__ import annotations

from typing import Protocol

from modelfleet.state.status import AGGREGATE_CONTEXT, CommitStatus, State, deployment_context

NOTES_REF = "refs/notes/modelfleet"

__all__ = ["AGGREGATE_CONTEXT", "NOTES_REF", "CommitStatus", "State", "StatusError", "StatusWriter",
           "deployment_context"]


class StatusWriter(Protocol):
    """Publishes statuses on a commit. Implementations raise StatusError on failure."""

    def publish(self, revision: str, statuses: list[CommitStatus]) -> None: ...


class StatusError(Exception):
    """A status could not be written (network, auth, ...). Never contains a secret.

    ``transient``: trying again later may succeed (network, 5xx, rate limits); ``retry_after``: the
    seconds the forge asked to wait (``Retry-After``), if it said."""

    def __init__(self, message: str, *, transient: bool = True, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.retry_after = retry_after
