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
    """A status could not be written (network, auth, ...). Never contains a secret."""
