"""Deletion safety (pure): a commit that would remove too many of the deployments that run is held.

A commit whose removals (deployments removed from Git, or disabled) would take away more than
``safety.maxDeletionPercent`` of the deployments that run, or all of them, keeps them running until
someone confirms: a trailer ``Modelfleet-Confirm: deletions`` in the commit's message, or
``modelfleet confirm <sha>`` (a store fact). The rest of the commit (creates, updates) still applies.
``maxDeletionPercent: 100`` turns the check off entirely ("all of them" included).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from modelfleet.state.actual import ObservedReplica
from modelfleet.state.plan import Action

Key = tuple[str, str]

CONFIRM_TRAILER = "Modelfleet-Confirm: deletions"
# The reasons of diff()'s removals that take a whole deployment away.
DELETION_REASONS = frozenset({"removed from Git", "deployment disabled"})
_TRAILER = re.compile(r"^\s*modelfleet-confirm\s*:\s*deletions\s*$", re.IGNORECASE)
_SHA = re.compile(r"^[0-9a-f]{7,40}$")


def confirms_deletions(message: str | None) -> bool:
    """Whether a commit message carries the trailer ``Modelfleet-Confirm: deletions`` (in its last
    paragraph, as git trailers are; the key is case-insensitive)."""
    if not message:
        return False
    paragraphs = [p for p in re.split(r"\n\s*\n", message.strip()) if p.strip()]
    if len(paragraphs) < 2:
        # A one-paragraph message is a subject (plus body lines): accept the trailer on its own line anyway.
        lines = paragraphs[0].splitlines()[1:] if paragraphs else []
    else:
        lines = paragraphs[-1].splitlines()
    return any(_TRAILER.match(line) for line in lines)


def valid_sha(text: str) -> bool:
    """A commit id as ``modelfleet confirm`` takes it: 7 to 40 lowercase hex digits."""
    return bool(_SHA.match(text))


def is_confirmed(revision: str, confirmed: Iterable[str], message: str | None = None) -> bool:
    """Deletions of ``revision`` are confirmed: by its message's trailer, or a confirmed sha (or prefix)."""
    if confirms_deletions(message):
        return True
    return any(valid_sha(sha) and revision.startswith(sha) for sha in confirmed)


DELETION_HELD_PREFIX = "held: would remove "


def held_message(removed: int, running: int, revision: str) -> str:
    # Forges cut descriptions (GitHub: 140 characters): the gist first, a 12-digit sha.
    return (f"{DELETION_HELD_PREFIX}{removed} of {running} deployments; confirm with "
            f"`modelfleet confirm {revision[:12]}` or a commit trailer `{CONFIRM_TRAILER}`")


@dataclass(frozen=True)
class DeletionHold:
    """The removals this pass holds for deletion safety (empty when none are)."""

    message: str | None = None
    keys: frozenset[Key] = frozenset()  # deployments whose removal is held
    held: tuple[Action, ...] = ()


def deletion_hold(proposed: Sequence[Action], actual: Iterable[ObservedReplica], owned: Collection[str] | None,
                  revision: str, max_percent: float, confirmed: bool) -> DeletionHold:
    """Which removals to hold. ``proposed``: the actions the pass would take; ``actual``: what runs
    (the observation plus replicas assumed running on suspect hosts); ``owned``: the inventory's
    container ids (None: every managed container is ours)."""
    if confirmed or max_percent >= 100:
        return DeletionHold()
    removing = {(a.model, a.environment) for a in proposed if a.op == "remove" and a.reason in DELETION_REASONS}
    if not removing:
        return DeletionHold()
    running = {r.key for r in actual if owned is None or r.container_id in owned}
    removing &= running
    total = len(running)
    if not removing or (len(removing) < total and len(removing) * 100 <= max_percent * total):
        return DeletionHold()
    message = held_message(len(removing), total, revision)
    held = tuple(a for a in proposed if a.op == "remove" and a.reason in DELETION_REASONS
                 and (a.model, a.environment) in removing)
    return DeletionHold(message, frozenset(removing), held)
