"""Plans on pull requests, decided here (pure): which open pull/merge requests a review round plans,
which comment on a pull request is ours, what that comment says, and where a forge webhook goes.

The shell (reconciler/status/pulls.py) lists the forge's open pull requests and their comments and
writes what this module decides; reconciler/daemon/review.py plans their heads like review branches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

# The hidden first line of our comment on a pull request: how it is found again to be edited in place.
COMMENT_MARKER = "<!-- modelfleet-plan -->"
MAX_LISTED_ACTIONS = 30  # actions listed in a comment (the plan page has them all)
_ICONS = {"success": "✅", "failure": "❌", "error": "❌", "pending": "⏳"}


@dataclass(frozen=True)
class PullRequest:
    """An open pull request (GitLab: merge request) as the forge lists it. ``number`` is the
    number in its URL (GitLab's ``iid``); ``head_sha`` is what the forge says its head is."""

    number: int
    base: str
    head_branch: str
    head_sha: str
    title: str = ""
    url: str = ""
    updated_at: str = ""  # ISO 8601 as the forge writes it ("" when it does not say)
    from_fork: bool = False  # its head is in another repository than its base (a fork, or a deleted one)

    def to_json(self) -> dict[str, object]:
        return {"number": self.number, "base": self.base, "headBranch": self.head_branch, "title": self.title,
                "url": self.url, "fromFork": self.from_fork}


@dataclass(frozen=True)
class Comment:
    id: int
    body: str


def select_pulls(pulls: Sequence[PullRequest], base: str, limit: int, forks: bool = False) -> list[PullRequest]:
    """The open pull requests against ``base`` a round plans: newest first (last updated, then the
    highest number), at most ``limit``; one per number; from forks only with ``forks`` (their
    manifests are anyone's: planning them resolves their origins with the daemon's credentials)."""
    seen: dict[int, PullRequest] = {}
    for pull in pulls:
        if pull.base == base and pull.number not in seen and (forks or not pull.from_fork):
            seen[pull.number] = pull
    ordered = sorted(seen.values(), key=lambda p: (_instant(p.updated_at), p.number), reverse=True)
    return ordered[:max(0, limit)]


def _instant(text: str) -> float:
    """Seconds since the epoch of an ISO 8601 time (``Z`` or an offset); 0 when it cannot be read
    (times written with different offsets still order correctly)."""
    if not text:
        return 0.0
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def own_comment(comments: Sequence[Comment]) -> Comment | None:
    """Our comment on a pull request: the oldest one that starts with COMMENT_MARKER (a quote of it
    in someone's reply does not start with it). None: there is none yet, one is to be created."""
    ours = [c for c in comments if c.body.lstrip().startswith(COMMENT_MARKER)]
    return min(ours, key=lambda c: c.id) if ours else None


# --- the comment ----------------------------------------------------------------------------------


def _code(value: object) -> str:
    """``value`` as inline code on one line, safe inside a table cell."""
    text = " ".join(str(value).split()).replace("`", "'").replace("|", "\\|")
    return f"`{text}`" if text else "—"


def _value(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, list | tuple):
        return _code(", ".join(str(v) for v in value)) if value else "—"
    return _code(value)


def _short(sha: object) -> str:
    return str(sha)[:12] if sha else "—"


def comment_markdown(document: Mapping[str, Any], plan_url: str, base_branch: str) -> str:
    """The comment on a pull request for its review plan ``document`` (state/review.py's
    ``review_document`` or ``failed_document``), in markdown, starting with COMMENT_MARKER."""
    state = str(document.get("state", "pending"))
    description = " ".join(str(document.get("description", "")).split())
    planned = document.get("plannedAt")
    when = (datetime.fromtimestamp(float(planned), UTC).strftime("%Y-%m-%d %H:%M UTC")
            if isinstance(planned, int | float) else "")
    lines = [COMMENT_MARKER,
             f"### modelfleet plan {_ICONS.get(state, '')} {state}",
             "",
             f"Head `{_short(document.get('revision'))}` planned against `{base_branch}` at "
             f"`{_short(document.get('base'))}`{f' ({when})' if when else ''}: **{_md_text(description)}**. "
             f"[Full plan]({plan_url})",
             ""]
    errors = [e for e in document.get("errors") or [] if isinstance(e, Mapping)]
    plan = document.get("plan")
    if errors:
        lines += ["**Errors** (nothing of this change would be deployed until they are fixed):", ""]
        for error in errors[:20]:
            hint = f" — {_md_text(str(error['hint']))}" if error.get("hint") else ""
            lines.append(f"- {_code(error.get('text') or error.get('message'))}{hint}")
        if len(errors) > 20:
            lines.append(f"- … and {len(errors) - 20} more")
        lines.append("")
    elif plan is None:
        lines += [f"This head could not be planned: {_md_text(description)}", ""]
    diff = document.get("diff") or {}
    added = [f"{d['model']}/{d['environment']}" for d in diff.get("added") or []]
    removed = [f"{d['model']}/{d['environment']}" for d in diff.get("removed") or []]
    changed = list(diff.get("changed") or [])
    actions = list(plan.get("actions") or []) if isinstance(plan, Mapping) else []
    if plan is not None and not errors and not (added or removed or changed or actions):
        lines += ["**No changes**: this pull request would not change any deployment "
                  "(nothing to create, replace or remove).", ""]
    if added:
        lines.append("**Added**: " + ", ".join(_code(a) for a in added))
    if removed:
        lines.append("**Removed**: " + ", ".join(_code(r) for r in removed))
    if added or removed:
        lines.append("")
    if changed:
        lines += ["**Changed**:", "", "| deployment | field | now | with this change |", "|---|---|---|---|"]
        for change in changed:
            name = _code(f"{change['model']}/{change['environment']}")
            for field in change.get("changes") or []:
                lines.append(f"| {name} | {field['field']} | {_value(field.get('old'))} | "
                             f"{_value(field.get('new'))} |")
        lines.append("")
    if actions:
        lines += ["**Actions**, in order:", ""]
        for action in actions[:MAX_LISTED_ACTIONS]:
            where = f" on {_code(action.get('host'))}" if action.get("host") else ""
            why = f" — {_md_text(str(action['reason']))}" if action.get("reason") else ""
            name = _code(f"{action.get('model')}/{action.get('environment')}")
            lines.append(f"- {action.get('op')} {name}{where}{why}")
        if len(actions) > MAX_LISTED_ACTIONS:
            lines.append(f"- … and {len(actions) - MAX_LISTED_ACTIONS} more ([full plan]({plan_url}))")
        lines.append("")
    lines.append("<sub>Planned by modelfleet, never applied from the pull request; this comment is "
                 "updated on each push.</sub>")
    return "\n".join(lines) + "\n"


def _md_text(text: str) -> str:
    """Plain text that markdown shows as written (no HTML, no links, no emphasis)."""
    text = " ".join(text.split())
    for char in ("\\", "<", ">", "[", "]", "*", "_", "`", "|"):
        text = text.replace(char, "\\" + char)
    return text


# --- webhooks ------------------------------------------------------------------------------------

RouteKind = Literal["pass", "review", "ignore"]


@dataclass(frozen=True)
class WebhookRoute:
    """Where a verified webhook goes: a pass (a push to the tracked branch, or an event that is not
    about pull requests), the review planner (a pull request event against the tracked branch), or
    nowhere (``reason`` says why)."""

    kind: RouteKind
    reason: str = ""


def _event_name(headers: Mapping[str, str]) -> str:
    lowered = {k.lower(): v for k, v in headers.items()}
    for header in ("x-gitea-event", "x-forgejo-event", "x-gogs-event", "x-github-event", "x-gitlab-event"):
        if lowered.get(header):
            return lowered[header].strip().lower()
    return ""


def webhook_route(headers: Mapping[str, str], payload: Any, branch: str) -> WebhookRoute:
    """Route a webhook whose signature was checked: GitHub/Gitea/Forgejo ``pull_request`` events and
    GitLab ``Merge Request Hook`` events against ``branch`` wake the review planner (never a pass:
    nothing of a pull request is applied); pushes to other branches are ignored; anything else
    (a push to ``branch``, an event without a name) triggers a pass."""
    event = _event_name(headers)
    data = payload if isinstance(payload, Mapping) else {}
    # (Gitea may name the kind too, e.g. pull_request_sync; review events carry the pull request as well.)
    if event.startswith("pull_request") or event == "merge request hook" or data.get("object_kind") == "merge_request":
        if data.get("object_kind") == "merge_request" or event == "merge request hook":
            attributes = data.get("object_attributes")
            target = attributes.get("target_branch") if isinstance(attributes, Mapping) else None
        else:
            pull = data.get("pull_request")
            base = pull.get("base") if isinstance(pull, Mapping) else None
            target = base.get("ref") if isinstance(base, Mapping) else None
        if isinstance(target, str) and target.removeprefix("refs/heads/") != branch:
            return WebhookRoute("ignore", f"pull request against {target}, watching {branch}")
        return WebhookRoute("review", "pull request event")
    ref = data.get("ref")
    if isinstance(ref, str):
        pushed = ref.removeprefix("refs/heads/")
        if pushed != branch:
            return WebhookRoute("ignore", f"push to {pushed}, watching {branch}")
    return WebhookRoute("pass", event or "push")
