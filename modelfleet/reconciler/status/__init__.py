"""Commit status writers: git notes (embedded default) and forge APIs (Gitea, GitHub, GitLab)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

State = Literal["pending", "success", "failure", "error"]
AGGREGATE_CONTEXT = "modelfleet"
NOTES_REF = "refs/notes/modelfleet"


def deployment_context(environment: str, model: str) -> str:
    return f"modelfleet/{environment}/{model}"


@dataclass(frozen=True)
class CommitStatus:
    context: str
    state: State
    description: str  # human-actionable; forges cut it (GitHub: 140 chars), so put the gist first
    target_url: str | None = None


class StatusWriter(Protocol):
    """Publishes statuses on a commit. Implementations raise StatusError on failure."""

    def publish(self, revision: str, statuses: list[CommitStatus]) -> None: ...


class StatusError(Exception):
    """A status could not be written (network, auth, ...). Never contains a secret."""
