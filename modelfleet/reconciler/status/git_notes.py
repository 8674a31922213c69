"""The embedded status provider: JSON git notes under ``refs/notes/modelfleet``, pushed to the remote.

One note per commit, shaped like::

    {"statuses": {"modelfleet/production/sentiment": {"state": "success", "description": "...",
                                                      "target_url": null,
                                                      "updated_at": "2024-05-01T12:00:00.123456Z"}},
     "updated_at": "2024-05-01T12:00:00.123456Z"}

``publish`` merges into what the note already holds (other contexts stay, the same context is
replaced), then, with push on and a remote configured, fetches the remote notes ref, merges it
(three-way over the notes tree; a note changed on both sides is merged per context, newest
``updated_at`` wins) and pushes, retrying when a concurrent writer pushed first. The local note
is written before any network I/O, so it survives an unreachable remote.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from io import BytesIO
from typing import TYPE_CHECKING, Any

import git
from git.exc import CommandError, InvalidGitRepositoryError, NoSuchPathError
from gitdb.base import IStream

from modelfleet.reconciler.secrets import redact_url
from modelfleet.reconciler.status import NOTES_REF, CommitStatus, StatusError

if TYPE_CHECKING:
    from modelfleet.reconciler.config import StatusSettings

log = logging.getLogger("modelfleet.status.git_notes")

# Where the remote's notes ref is fetched to before merging (outside refs/notes/ on purpose:
# `git notes` and `git log --notes` should not show it as a notes namespace of its own).
REMOTE_NOTES_REF = "refs/modelfleet/remote-notes"

_HEX_NAME = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_DEFAULT_IDENTITY = {"name": "modelfleet", "email": "modelfleet@localhost"}


def rfc3339(moment: datetime) -> str:
    """``2024-05-01T12:00:00.123456Z`` (UTC, microseconds so that quick successive writes order)."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _utcnow() -> datetime:
    return datetime.now(UTC)


class GitNotesWriter:
    """Writes commit statuses as JSON git notes in the daemon's local clone and pushes them.

    ``remote`` is a remote name of that clone (or a URL/path); ``None``, or a name the clone does
    not know, keeps the notes local. ``timeout`` bounds every network git command (the process and
    its helpers are killed); ``attempts`` bounds the fetch-merge-push rounds lost to concurrent
    pushers of the notes ref.
    """

    def __init__(
        self,
        repo_path: str,
        remote: str | None = "origin",
        push: bool = True,
        *,
        timeout: float = 30.0,
        attempts: int = 5,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.repo_path = str(repo_path)
        self.remote = remote
        self.push = push
        self.timeout = timeout
        self.attempts = attempts
        self._clock = clock
        self._lock = threading.Lock()
        # Notes-ref tip last known to be on the remote: skips the network when nothing changed.
        self._synced_tip: str | None = None
        self._env: dict[str, str] | None = None  # for git commands, settled on the first publish

    def __repr__(self) -> str:
        remote = redact_url(self.remote) if self.remote else None
        return f"GitNotesWriter(repo_path={self.repo_path!r}, remote={remote!r}, push={self.push!r})"

    # -- StatusWriter -------------------------------------------------------------------------

    def publish(self, revision: str, statuses: list[CommitStatus]) -> None:
        with self._lock, _open_repo(self.repo_path) as repo:
            try:
                if self._env is None:
                    self._env = _environment(repo)
                repo.git.update_environment(**self._env)
                sha = _resolve_commit(repo, revision)
                changed = self._write_local(repo, sha, statuses)
                url = self._remote_url(repo) if self.push else None
                if url is None:
                    return
                if not changed and self._synced_tip is not None and _rev(repo, NOTES_REF) == self._synced_tip:
                    return  # same statuses as last time, already on the remote
                self._sync(repo, url)
            except CommandError as exc:
                raise StatusError(_describe(self.repo_path, "git", exc)) from None

    # -- local note ---------------------------------------------------------------------------

    def _write_local(self, repo: git.Repo, sha: str, statuses: list[CommitStatus]) -> bool:
        """Merge ``statuses`` into the local note of ``sha``; False when the note already said so."""
        document = _read_note(repo, sha)
        current: dict[str, Any] = document["statuses"]
        now = rfc3339(self._clock())
        changed = False
        for status in statuses:
            entry = {"state": status.state, "description": status.description,
                     "target_url": status.target_url}
            previous = current.get(status.context)
            if isinstance(previous, dict) and all(previous.get(k) == v for k, v in entry.items()):
                continue  # unchanged: keep its updated_at, do not grow the notes history
            current[status.context] = {**entry, "updated_at": now}
            changed = True
        if changed:
            document["updated_at"] = now
            with tempfile.TemporaryFile() as note:
                # Exact bytes: pretty JSON has no blank lines nor trailing blanks for git to clean up.
                note.write(_dump(document))
                note.seek(0)
                repo.git.notes("--ref", NOTES_REF, "add", "-f", "-F", "-", sha, istream=note)
        return changed

    # -- remote synchronisation ---------------------------------------------------------------

    def _remote_url(self, repo: git.Repo) -> str | None:
        if not self.remote:
            return None
        remote = next((r for r in repo.remotes if r.name == self.remote), None)
        if remote is None:
            if "/" in self.remote or ":" in self.remote:
                return self.remote  # a URL or a path
            log.debug("repository %s has no remote %r: notes stay local", self.repo_path, self.remote)
            return None
        # Push/fetch by URL, so that a mirror-configured remote cannot turn this into a mirror push.
        config = remote.config_reader
        url = config.get_value("pushurl", default="") or config.get_value("url", default="")
        return str(url) or None

    def _sync(self, repo: git.Repo, url: str) -> None:
        for attempt in range(1, self.attempts + 1):
            remote_tip = self._fetch(repo, url)
            # Now the remote tip or a descendant of it:
            local_tip = _merge_notes(repo, remote_tip) if remote_tip else _rev(repo, NOTES_REF)
            if local_tip is None or local_tip == remote_tip:
                self._synced_tip = local_tip
                return
            code, out, err = repo.git.push(
                "--porcelain", url, f"{NOTES_REF}:{NOTES_REF}",
                with_extended_output=True, with_exceptions=False, kill_after_timeout=self.timeout)
            if code == 0:
                self._synced_tip = local_tip
                return
            if not _push_lost_race(out, err):
                raise StatusError(self._failure("push", url, out, err))
            log.debug("notes push to %s lost a race (attempt %d/%d), merging again",
                      redact_url(url), attempt, self.attempts)
            if attempt < self.attempts:
                time.sleep(random.uniform(0.01, 0.05) * attempt)
        raise StatusError(f"cannot push {NOTES_REF} of repository {self.repo_path} to {redact_url(url)}: "
                          f"still rejected after {self.attempts} attempts (concurrent writers)")

    def _fetch(self, repo: git.Repo, url: str) -> str | None:
        """Fetch the remote notes ref to REMOTE_NOTES_REF; its tip, or None if the remote has none."""
        # (A leftover REMOTE_NOTES_REF from an earlier fetch is never read when the remote has none.)
        code, out, err = repo.git.fetch(
            "--no-tags", "--no-write-fetch-head", url, f"+{NOTES_REF}:{REMOTE_NOTES_REF}",
            with_extended_output=True, with_exceptions=False, kill_after_timeout=self.timeout)
        if code != 0:
            if "couldn't find remote ref" in err:
                return None
            raise StatusError(self._failure("fetch", url, out, err))
        return _rev(repo, REMOTE_NOTES_REF)

    def _failure(self, operation: str, url: str, out: str, err: str) -> str:
        timed_out = err.startswith("Timeout:")
        detail = f"timed out after {self.timeout:g} s" if timed_out else _last_lines(err or out)
        return (f"cannot {operation} {NOTES_REF} of repository {self.repo_path} "
                f"{'to' if operation == 'push' else 'from'} {redact_url(url)}: {detail}")


def from_settings(settings: StatusSettings, *, repo_path: str, repo_url: str | None) -> GitNotesWriter:
    """Provider ``git-notes`` (registered in status/registry.py): notes in the daemon's clone at
    ``repo_path``, pushed to its ``origin`` unless ``status.push`` is false."""
    return GitNotesWriter(repo_path, remote="origin", push=settings.push)


def read_statuses(repo_path: str, revision: str) -> dict[str, dict[str, Any]]:
    """The statuses noted on ``revision`` in the repository at ``repo_path`` ({} if none)."""
    with _open_repo(repo_path) as repo:
        try:
            statuses: dict[str, dict[str, Any]] = _read_note(repo, _resolve_commit(repo, revision))["statuses"]
        except CommandError as exc:
            raise StatusError(_describe(repo_path, "git", exc)) from None
    return statuses


# -- helpers --------------------------------------------------------------------------------------


def _open_repo(repo_path: str) -> git.Repo:
    try:
        return git.Repo(repo_path)
    except (InvalidGitRepositoryError, NoSuchPathError):
        raise StatusError(f"{repo_path} is not a git repository") from None


def _environment(repo: git.Repo) -> dict[str, str]:
    """No prompts from a daemon; an identity for the notes commits if git has none configured."""
    env = {"GIT_TERMINAL_PROMPT": "0"}
    for key, default in _DEFAULT_IDENTITY.items():
        code, value, _ = repo.git.config("--get", f"user.{key}", with_extended_output=True,
                                         with_exceptions=False)
        if code == 0 and str(value).strip():
            continue
        for role in ("AUTHOR", "COMMITTER"):
            variable = f"GIT_{role}_{key.upper()}"
            if not os.environ.get(variable):
                env[variable] = default
    return env


def _resolve_commit(repo: git.Repo, revision: str) -> str:
    sha = _rev(repo, revision)
    if sha is None:
        raise StatusError(f"commit {revision!r} is not in repository {repo.working_tree_dir or repo.git_dir}")
    return sha


def _rev(repo: git.Repo, ref: str) -> str | None:
    if ref.startswith("-"):
        return None  # never an option
    code, out, _ = repo.git.rev_parse("--verify", "--quiet", f"{ref}^{{commit}}",
                                      with_extended_output=True, with_exceptions=False)
    return str(out).strip() if code == 0 else None


def _is_ancestor(repo: git.Repo, ancestor: str, descendant: str) -> bool:
    code, _, _ = repo.git.merge_base("--is-ancestor", ancestor, descendant,
                                     with_extended_output=True, with_exceptions=False)
    return bool(code == 0)


def _empty_document() -> dict[str, Any]:
    return {"statuses": {}}


def _parse(data: bytes | str, where: str) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except ValueError:
        document = None
    if not isinstance(document, dict) or not isinstance(document.get("statuses"), dict):
        log.warning("note %s is not a modelfleet status document; replacing it", where)
        return _empty_document()
    return document


def _dump(document: Mapping[str, Any]) -> bytes:
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()


def _read_note(repo: git.Repo, sha: str) -> dict[str, Any]:
    code, out, _ = repo.git.notes("--ref", NOTES_REF, "list", sha,
                                  with_extended_output=True, with_exceptions=False)
    if code != 0:
        return _empty_document()
    return _parse(_blob(repo, str(out).strip()), f"on {sha}")


def _blob(repo: git.Repo, oid: str) -> bytes:
    data: bytes = repo.odb.stream(bytes.fromhex(oid)).read()
    return data


def _store_blob(repo: git.Repo, data: bytes) -> str:
    stream = repo.odb.store(IStream("blob", len(data), BytesIO(data)))
    binsha: bytes = stream.binsha
    return binsha.hex()


def _timestamp(entry: Any) -> tuple[datetime, str]:
    """Order of two writes of one context: updated_at, then content for a total, symmetric order."""
    moment = datetime.min.replace(tzinfo=UTC)
    if isinstance(entry, dict):
        try:
            moment = datetime.fromisoformat(str(entry.get("updated_at")))
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
        except ValueError:
            pass
    return moment, json.dumps(entry, sort_keys=True)


def merge_documents(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> dict[str, Any]:
    """Union of two notes' statuses; for a context in both, the newer write wins (commutative)."""
    statuses: dict[str, Any] = {}
    for side in (ours.get("statuses", {}), theirs.get("statuses", {})):
        for context, entry in side.items():
            if context not in statuses or _timestamp(entry) > _timestamp(statuses[context]):
                statuses[context] = entry
    stamps = [str(e["updated_at"]) for e in statuses.values() if isinstance(e, dict) and "updated_at" in e]
    document: dict[str, Any] = {"statuses": statuses}
    if stamps:
        document["updated_at"] = max(stamps, key=lambda s: _timestamp({"updated_at": s}))
    return document


def _notes_map(repo: git.Repo, commit: str | None) -> dict[str, str]:
    """{annotated object: note blob} of a notes commit (fan-out directories flattened)."""
    if commit is None:
        return {}
    notes: dict[str, str] = {}
    for line in str(repo.git.ls_tree("-r", commit)).splitlines():
        meta, _, path = line.partition("\t")
        parts = meta.split()
        name = path.replace("/", "")
        if len(parts) == 3 and parts[1] == "blob" and _HEX_NAME.fullmatch(name):
            notes[name] = parts[2]
        else:
            log.warning("ignoring non-note entry %r in %s", path, NOTES_REF)
    return notes


def _merge_notes(repo: git.Repo, remote_tip: str) -> str:
    """Bring the remote notes into NOTES_REF (fast-forward, or a three-way merge); its new tip."""
    local_tip = _rev(repo, NOTES_REF)
    if local_tip is None:
        repo.git.update_ref(NOTES_REF, remote_tip, "0" * len(remote_tip))  # only if still absent
        return remote_tip
    if local_tip == remote_tip or _is_ancestor(repo, remote_tip, local_tip):
        return local_tip
    if _is_ancestor(repo, local_tip, remote_tip):
        repo.git.update_ref(NOTES_REF, remote_tip, local_tip)
        return remote_tip
    code, base_out, _ = repo.git.merge_base(local_tip, remote_tip,
                                            with_extended_output=True, with_exceptions=False)
    base = str(base_out).strip() if code == 0 else None
    ours, theirs, common = (_notes_map(repo, c) for c in (local_tip, remote_tip, base))
    merged: dict[str, str] = {}
    for obj in ours.keys() | theirs.keys():
        mine, other, old = ours.get(obj), theirs.get(obj), common.get(obj)
        if mine == other or other == old:
            chosen = mine
        elif mine == old:
            chosen = other
        elif mine is None or other is None:
            chosen = mine or other  # removed on one side, changed on the other: keep the change
        else:
            document = merge_documents(_parse(_blob(repo, mine), f"on {obj}"),
                                       _parse(_blob(repo, other), f"on {obj}"))
            chosen = _store_blob(repo, _dump(document))
        if chosen is not None:
            merged[obj] = chosen
    with tempfile.TemporaryFile() as listing:
        listing.write("".join(f"100644 blob {blob}\t{obj}\n" for obj, blob in sorted(merged.items())).encode())
        listing.seek(0)
        tree = str(repo.git.mktree(istream=listing)).strip()
    commit = str(repo.git.commit_tree(tree, "-p", local_tip, "-p", remote_tip,
                                      "-m", "Notes merged by modelfleet")).strip()
    repo.git.update_ref(NOTES_REF, commit, local_tip)
    return commit


def _push_lost_race(out: str, err: str) -> bool:
    """The push was refused because the remote ref moved (not for auth, network, hooks, ...)."""
    text = f"{out}\n{err}"
    if "[rejected]" in text or "non-fast-forward" in text or "fetch first" in text:
        return True
    return "[remote rejected]" in text and ("lock" in text or "stale" in text)


def _last_lines(text: str, count: int = 3) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return redact_url("; ".join(lines[-count:])) or "unknown error"


def _describe(repo_path: str, operation: str, exc: CommandError) -> str:
    stderr = exc.stderr if isinstance(exc.stderr, str) else str(exc.stderr or "")
    stderr = stderr.strip().removeprefix("stderr:").strip().strip("'")
    detail = _last_lines(stderr) if stderr else f"exit status {exc.status}"
    return f"{operation} failed in repository {repo_path}: {detail}"
