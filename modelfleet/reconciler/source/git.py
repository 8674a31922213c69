"""Git source: a bare mirror of the watched branch under stateDir, read lazily at a commit.

Faults it survives (what the pass and the user see is decided in state/source.py):

* the remote unreachable, or the branch gone from it: ``sync`` returns the commit fetched last with
  the failure (the pass goes on with it); with no commit ever fetched it raises GitSourceError;
* a force-push: the fetch refspec is forced (``+refs/heads/<branch>:refs/heads/<branch>``), so the
  mirror follows a rewritten branch to an older or unrelated commit;
* a damaged mirror (HEAD deleted, truncated objects or packs, a broken config): checked when first
  opened (``git fsck --connectivity-only``) and whenever git reports damage or a commit cannot be
  read; it is moved aside to ``repo.git.corrupt`` and fetched afresh, never trusted;
* a huge repository: only manifest candidates are listed (with their sizes, ``git ls-tree -l``)
  and read, within ``TreeLimits`` (source/tree.py).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import git

from modelfleet.reconciler.errors import GitSourceError
from modelfleet.reconciler.secrets import redact_url
from modelfleet.reconciler.source.tree import (
    DEFAULT_LIMITS,
    TreeLimits,
    TreeTooLarge,
    too_large,
    too_many_bytes,
    too_many_files,
)
from modelfleet.state.loader import is_manifest_path
from modelfleet.state.source import BRANCH_MISSING, MIRROR_UNWRITABLE, REMOTE_UNREACHABLE, FetchFailure

log = logging.getLogger("modelfleet.source")

# English messages whatever the locale (they are classified), and never a prompt.
GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C", "LANGUAGE": "C"}
CORRUPT_SUFFIX = ".corrupt"
# Where the heads of review branches are fetched to in the mirror (review.branches).
REVIEW_REFS = "refs/modelfleet/review/"
# Where the heads of the forge's open pull requests are fetched to (refs/modelfleet/pulls/<number>).
PULL_REFS = "refs/modelfleet/pulls/"
# What git says about a damaged local repository (confirmed with `git fsck` before acting on it).
_LOCAL_DAMAGE = re.compile(
    r"packfile|does not match index|is corrupt|corrupt (?:loose|object|pack)|bad object|invalid sha1 pointer"
    r"|unable to read|inflate|not a git repository|broken link|missing (?:blob|tree|commit)|bad config"
    r"|index file|unable to parse|fatal: bad|did not send all necessary objects", re.IGNORECASE)
_BRANCH_MISSING = re.compile(r"couldn't find remote ref", re.IGNORECASE)
# Lines git adds to every remote error: they say nothing about this one.
_BOILERPLATE = re.compile(r"Could not read from remote repository|Please make sure you have the correct access"
                          r"|^and the repository exists")
# The fetch could not write into the mirror (the remote answered).
_LOCAL_WRITE = re.compile(r"No space left on device|Read-only file system|Disk quota exceeded", re.IGNORECASE)


def local_path_of(url: str) -> Path | None:
    """The filesystem path of a local repository URL (a path or file://), else None."""
    if url.startswith("file://"):
        return Path(url[len("file://"):])
    if "://" in url or re.match(r"^[\w.-]+@[\w.-]+:", url):
        return None
    return Path(url)


@dataclass(frozen=True)
class Synced:
    """The commit to converge on; ``failure`` when the fetch failed and it is the one fetched last."""

    revision: str
    failure: FetchFailure | None = None


class _Damaged(Exception):
    """The local mirror cannot be trusted (the message says why)."""


def _summary(stderr: str, limit: int = 300) -> str:
    """The last lines git wrote, redacted, on one line."""
    text = stderr.strip().removeprefix("stderr:").strip().strip("'").strip()
    if text.startswith("Timeout:"):
        seconds = re.search(r"in (\d+(?:\.\d+)?) secs", text)
        waited = seconds.group(1) if seconds else "?"
        return f"no answer within {waited} s (fetch killed; the limit is repo.fetchTimeout)"
    lines = [line.strip() for line in text.splitlines() if line.strip() and not _BOILERPLATE.search(line)]
    return redact_url("; ".join(lines[-3:]))[-limit:] or "git exited with an error and said nothing"


class GitTree(Mapping[str, bytes]):
    """``path -> bytes`` of a commit. Iterates its manifest candidates (``*.yaml``/``*.yml`` outside
    hidden directories), listed once with their sizes; each is read only when asked for, and only
    within ``limits.max_file_bytes`` (else ``UnreadableFile``, which the loader reports). Any other
    file (a model named by ``origin.file.path``) is looked up by path when asked for."""

    def __init__(self, git_dir: Path, odb_read: Callable[[str], bytes], commit: str,
                 limits: TreeLimits = DEFAULT_LIMITS, on_damage: Callable[[str], None] | None = None) -> None:
        self.git_dir = git_dir
        self.commit = commit
        self.limits = limits
        self._read = odb_read
        self._on_damage = on_damage
        self._entries = self._list_manifest_candidates()
        self._others: dict[str, tuple[str, int] | None] = {}

    def _git(self, *args: str) -> list[str]:
        return ["git", f"--git-dir={self.git_dir}", *args]

    def _list_manifest_candidates(self) -> dict[str, tuple[str, int]]:
        """Streams ``git ls-tree -r -l -z``; keeps only manifest candidates (bounded by the limits)."""
        where = f"commit {self.commit[:12]}"
        entries: dict[str, tuple[str, int]] = {}
        total = 0
        with tempfile.TemporaryFile() as errors:
            proc = subprocess.Popen(self._git("ls-tree", "-r", "-l", "-z", "--full-tree", self.commit),
                                    stdout=subprocess.PIPE, stderr=errors, stdin=subprocess.DEVNULL,
                                    env={**os.environ, **GIT_ENV})
            assert proc.stdout is not None
            try:
                pending = b""
                for chunk in iter(lambda: proc.stdout.read(1 << 16), b""):  # type: ignore[union-attr]
                    pending += chunk
                    *records, pending = pending.split(b"\0")
                    for record in records:
                        meta, _, raw_path = record.partition(b"\t")
                        fields = meta.split()
                        if len(fields) != 4 or fields[1] != b"blob" or fields[0] == b"120000":
                            continue  # trees of submodules, symlinks: never manifests
                        path = raw_path.decode("utf-8", "surrogateescape")
                        if not is_manifest_path(path):
                            continue
                        size = int(fields[3])
                        if len(entries) >= self.limits.max_files:
                            raise too_many_files(where, self.limits, path)
                        total += min(size, self.limits.max_file_bytes + 1)  # too large ones are not read
                        if total > self.limits.max_total_bytes:
                            raise too_many_bytes(where, self.limits, path)
                        entries[path] = (fields[2].decode(), size)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            finally:
                proc.stdout.close()
            code = proc.wait()
            if code != 0:
                errors.seek(0)
                raise _Damaged(f"git ls-tree {self.commit[:12]} failed: "
                               f"{_summary(errors.read().decode(errors='replace'))}")
        return entries

    def _lookup(self, key: str) -> tuple[str, int] | None:
        """(object id, size) of a file that is not a manifest candidate, or None."""
        if key in self._others:
            return self._others[key]
        found: tuple[str, int] | None = None
        if key and not key.startswith("-"):
            proc = subprocess.run(self._git("ls-tree", "-l", "-z", "--full-tree", self.commit, "--", key),
                                  capture_output=True, env={**os.environ, **GIT_ENV}, check=False)
            for record in proc.stdout.split(b"\0"):
                meta, _, raw_path = record.partition(b"\t")
                fields = meta.split()
                if (len(fields) == 4 and fields[1] == b"blob" and fields[0] != b"120000"
                        and raw_path.decode("utf-8", "surrogateescape") == key):
                    found = (fields[2].decode(), int(fields[3]))
        self._others[key] = found
        return found

    def _blob(self, key: str, oid: str) -> bytes:
        try:
            return self._read(oid)
        except Exception as exc:  # GitPython says ValueError, OSError, GitError... all mean the same here
            problem = f"cannot read {key} ({oid[:12]}) of commit {self.commit[:12]}: {type(exc).__name__}: {exc}"
            if self._on_damage is not None:
                self._on_damage(problem)
            raise GitSourceError(f"{problem}; the local mirror is checked (and fetched afresh if damaged) "
                                 "on the next pass") from None

    def __getitem__(self, key: str) -> bytes:
        entry = self._entries.get(key)
        if entry is not None:
            oid, size = entry
            if size > self.limits.max_file_bytes:
                raise too_large(size, self.limits)
            return self._blob(key, oid)
        if is_manifest_path(key):
            raise KeyError(key)  # the listing holds every manifest candidate
        other = self._lookup(key)
        if other is None:
            raise KeyError(key)
        return self._blob(key, other[0])

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        if key in self._entries:
            return True
        return not is_manifest_path(key) and self._lookup(key) is not None


class GitSource:
    def __init__(self, url: str, branch: str, state_dir: str | Path, timeout: float = 60.0,
                 limits: TreeLimits = DEFAULT_LIMITS) -> None:
        self.url = url
        self.branch = branch
        self.path = Path(state_dir) / "repo.git"
        self.timeout = timeout
        self.limits = limits
        self._lock = threading.RLock()
        self._repo: git.Repo | None = None
        # Why the next sync must check the mirror first (a blob could not be read), or None.
        self._suspect: str | None = None
        # The last time the mirror was found damaged and fetched afresh (for /api/v1/status).
        self.recovery: str | None = None
        self._messages: dict[str, str] = {}  # commit -> message (commit_message)

    @property
    def ref(self) -> str:
        return f"refs/heads/{self.branch}"

    @property
    def local_path(self) -> Path | None:
        return local_path_of(self.url)

    # --- the mirror -----------------------------------------------------------------------------

    def _git(self, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        """A local git command on the mirror (``--git-dir``: never a repository found elsewhere)."""
        try:
            return subprocess.run(["git", f"--git-dir={self.path}", *args], capture_output=True, text=True,
                                  errors="replace", env={**os.environ, **GIT_ENV}, check=False,
                                  timeout=timeout or self.timeout * 5, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(args, -9, "", f"Timeout: git {args[0]} did not complete in "
                                                             f"{timeout or self.timeout * 5:g} secs.")

    def check_mirror(self) -> str | None:
        """Why the mirror cannot be trusted, or None when it is sound (or does not exist yet)."""
        if not self.path.exists():
            return None
        if not (self.path / "HEAD").is_file():
            return "its HEAD is missing"
        probe = self._git("rev-parse", "--git-dir")
        if probe.returncode != 0:
            return f"git does not take it for a repository: {_summary(probe.stderr)}"
        config = self._git("config", "--get", "remote.origin.url")
        if config.returncode not in (0, 1):  # 1: no such key (fixed on open)
            return f"its config cannot be read: {_summary(config.stderr)}"
        fsck = self._git("fsck", "--connectivity-only", "--no-dangling", "--no-progress")
        if fsck.returncode != 0:
            return f"git fsck --connectivity-only: {_summary(fsck.stderr or fsck.stdout)}"
        return None

    def _open(self) -> git.Repo:
        if self._repo is not None:
            return self._repo
        problem = self.check_mirror()
        if problem is not None:
            self._discard(problem)
        try:
            if (self.path / "HEAD").exists():
                repo = git.Repo(self.path)
                with repo.config_writer() as cfg:
                    cfg.set_value('remote "origin"', "url", self.url)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                repo = git.Repo.init(self.path, bare=True)
                repo.create_remote("origin", self.url)
            # GIT_DIR: a mirror that lost its HEAD meanwhile must fail, not make git search upwards.
            repo.git.update_environment(**GIT_ENV, GIT_DIR=str(self.path))
        except (git.GitError, OSError, ValueError) as exc:
            raise GitSourceError(f"cannot prepare the local mirror at {self.path}: {exc}") from None
        self._repo = repo
        return repo

    def _close(self) -> None:
        if self._repo is not None:
            self._repo.close()  # ends its persistent cat-file processes
            self._repo = None

    def _discard(self, problem: str) -> None:
        """Move a damaged mirror aside (the previous one aside is dropped) so that it is fetched afresh."""
        self._close()
        aside = self.path.with_name(self.path.name + CORRUPT_SUFFIX)
        shutil.rmtree(aside, ignore_errors=True)
        try:
            os.replace(self.path, aside)
            where = f"moved it aside to {aside.name}"
        except OSError:
            shutil.rmtree(self.path, ignore_errors=True)
            where = "removed it"
        self.recovery = (f"the local mirror {self.path} was damaged ({problem}): {where} and fetched "
                         f"{redact_url(self.url)} afresh; nothing was read from it")
        log.error("the local Git mirror %s is damaged (%s): %s; fetching %s afresh", self.path, problem, where,
                  redact_url(self.url))

    def _reclone(self, problem: str) -> git.Repo:
        self._discard(problem)
        return self._open()

    @property
    def repo(self) -> git.Repo:
        return self._open()

    # --- sync -----------------------------------------------------------------------------------

    def sync(self) -> Synced:
        """Fetch the branch: the commit it points at, or — when the fetch fails — the commit fetched
        last with the failure. Raises GitSourceError when no commit can be had at all."""
        with self._lock:
            self._open()
            if self._suspect is not None:
                problem = self.check_mirror()
                self._suspect = None
                if problem is not None:
                    self._reclone(problem)
            # Fast path for a local repository: when its branch already points where our mirror's
            # does, there is nothing to fetch (saves a git process per pass).
            local = self.local_path
            if local is not None:
                source_dir = local / ".git" if (local / ".git").is_dir() else local
                theirs, ours = read_ref(source_dir, self.ref), read_ref(self.path, self.ref)
                if theirs is not None and theirs == ours:
                    return Synced(ours)
            try:
                return self._fetch_and_resolve()
            except _Damaged as exc:
                self._reclone(str(exc))
            try:
                return self._fetch_and_resolve()
            except _Damaged as exc:
                raise GitSourceError(f"the local mirror {self.path} is still unreadable after fetching "
                                     f"{redact_url(self.url)} afresh: {exc}") from None

    def _fetch_and_resolve(self) -> Synced:
        failure = self._fetch()
        last = self._last_fetched()
        if failure is None:
            if last is None:
                raise _Damaged(f"the fetch worked but {self.ref} is not in the mirror")
            return Synced(last)
        if last is None:
            what = (f"branch {self.branch!r} not found on remote {redact_url(self.url)} (deleted or renamed? "
                    "push it or set repo.branch)" if failure.reason == BRANCH_MISSING
                    else f"git remote {redact_url(self.url)} unreachable")
            raise GitSourceError(f"fetching branch {self.branch} failed: {what}: {failure.detail}; no commit was "
                                 "fetched before, so there is nothing to deploy yet (what runs keeps running)")
        return Synced(last, failure)

    def _fetch(self) -> FetchFailure | None:
        repo = self._open()
        try:
            code, _, stderr = repo.git.fetch("origin", f"+{self.ref}:{self.ref}", "--prune", "--no-tags",
                                             kill_after_timeout=self.timeout, with_extended_output=True,
                                             with_exceptions=False)
        except (git.GitError, OSError) as exc:  # e.g. the mirror's directory is gone
            raise _Damaged(f"git fetch cannot run in it: {exc}") from None
        stderr = str(stderr or "")
        if _LOCAL_DAMAGE.search(stderr) and not _BRANCH_MISSING.search(stderr):
            # (Also when the fetch "worked": git may read a damaged pack, complain and carry on.)
            problem = self.check_mirror()
            if problem is not None:
                raise _Damaged(problem)
        if code == 0:
            return None
        if _BRANCH_MISSING.search(stderr):
            reason = BRANCH_MISSING
        elif _LOCAL_WRITE.search(stderr):
            reason = MIRROR_UNWRITABLE
        else:
            reason = REMOTE_UNREACHABLE
        return FetchFailure(reason, _summary(stderr), redact_url(self.url), self.branch)

    def _last_fetched(self) -> str | None:
        """The branch's commit in the mirror; None when it was never fetched. Raises _Damaged when the
        ref is there but its commit (or the commit's tree) cannot be read."""
        if read_ref(self.path, self.ref) is None:
            return None
        resolved = self._git("rev-parse", f"{self.ref}^{{commit}}", f"{self.ref}^{{tree}}")
        lines = resolved.stdout.split()
        if resolved.returncode != 0 or len(lines) != 2:
            problem = self.check_mirror()
            raise _Damaged(problem or f"{self.ref} does not resolve to a readable commit: {_summary(resolved.stderr)}")
        return lines[0]

    # --- review branches ------------------------------------------------------------------------

    def fetch_review(self, patterns: list[str], timeout: float) -> list[tuple[str, str]]:
        """Fetch the branches matching ``patterns`` (review.branches, one ``*`` each) into
        ``refs/modelfleet/review/`` of the mirror, apart from the tracked branch: a separate fetch,
        so that its failure is never the pass's (the fast path of sync skips the fetch). Returns
        (branch, commit) of each, newest commit first; raises GitSourceError when the fetch fails."""
        if not patterns:
            return []
        specs = [f"+refs/heads/{p}:{REVIEW_REFS}{p}" for p in patterns]
        with self._lock:
            repo = self._open()
            try:
                code, _, stderr = repo.git.fetch("origin", *specs, "--prune", "--no-tags", "--no-write-fetch-head",
                                                 kill_after_timeout=timeout, with_extended_output=True,
                                                 with_exceptions=False)
            except (git.GitError, OSError) as exc:
                raise GitSourceError(f"fetching the review branches failed: {exc}") from None
            if code != 0 and _BRANCH_MISSING.search(str(stderr or "")) and any("*" not in p for p in patterns):
                # A branch named without '*' that does not exist (now): fetch the globs alone.
                globs = [spec for spec in specs if "*" in spec]
                code, _, stderr = (repo.git.fetch("origin", *globs, "--prune", "--no-tags", "--no-write-fetch-head",
                                                  kill_after_timeout=timeout, with_extended_output=True,
                                                  with_exceptions=False) if globs else (0, "", ""))
            if code != 0:
                raise GitSourceError(f"fetching the review branches {', '.join(patterns)} from "
                                     f"{redact_url(self.url)} failed: {_summary(str(stderr or ''))}")
            listed = self._git("for-each-ref", "--sort=-committerdate", "--format=%(objectname) %(refname)",
                               REVIEW_REFS)
        heads = []
        for line in listed.stdout.splitlines():
            sha, _, ref = line.partition(" ")
            branch = ref.removeprefix(REVIEW_REFS)
            if branch != self.branch and re.fullmatch(r"[0-9a-f]{40}", sha):
                heads.append((branch, sha))
        return heads

    def fetch_pulls(self, refs: Mapping[int, str], timeout: float) -> dict[int, str]:
        """Fetch the heads of pull requests (number -> the forge's ref, e.g. ``refs/pull/7/head``)
        into ``refs/modelfleet/pulls/<number>`` of the mirror, in a fetch of their own; the refs of
        pull requests no longer listed are deleted. Returns number -> fetched commit; a ref the
        remote does not have (yet) is left out. Raises GitSourceError when the remote cannot be read."""
        with self._lock:
            repo = self._open()
            for line in self._git("for-each-ref", "--format=%(refname)", PULL_REFS).stdout.splitlines():
                number = line.removeprefix(PULL_REFS)
                if not number.isdigit() or int(number) not in refs:
                    self._git("update-ref", "-d", line)
            if not refs:
                return {}

            def fetch(numbers: list[int]) -> tuple[int, str]:
                specs = [f"+{refs[n]}:{PULL_REFS}{n}" for n in numbers]
                code, _, stderr = repo.git.fetch("origin", *specs, "--no-tags", "--no-write-fetch-head",
                                                 kill_after_timeout=timeout, with_extended_output=True,
                                                 with_exceptions=False)
                return int(code), str(stderr or "")

            try:
                code, stderr = fetch(sorted(refs))
                if code != 0 and _BRANCH_MISSING.search(stderr) and len(refs) > 1:
                    # One ref the remote lacks fails the whole fetch: fetch them one by one.
                    results = [fetch([n]) for n in sorted(refs)]
                    code = 0 if any(c == 0 or _BRANCH_MISSING.search(e) for c, e in results) else results[0][0]
                    stderr = next((e for c, e in results if c != 0 and not _BRANCH_MISSING.search(e)), "")
                elif code != 0 and _BRANCH_MISSING.search(stderr):
                    code = 0
            except (git.GitError, OSError) as exc:
                raise GitSourceError(f"fetching the pull request heads failed: {exc}") from None
            if code != 0:
                raise GitSourceError(f"fetching the pull request heads from {redact_url(self.url)} failed: "
                                     f"{_summary(stderr)}")
            heads: dict[int, str] = {}
            for wanted in sorted(refs):
                sha = read_ref(self.path, f"{PULL_REFS}{wanted}")
                if sha is not None:
                    heads[wanted] = sha
            return heads

    # --- reading --------------------------------------------------------------------------------

    def _read_blob(self, oid: str) -> bytes:
        data: bytes = self._open().odb.stream(bytes.fromhex(oid)).read()
        return data

    def _mark_suspect(self, problem: str) -> None:
        log.error("%s: the local mirror is checked on the next pass", problem)
        self._suspect = problem

    def _make_tree(self, commit: str) -> GitTree:
        self._open()
        return GitTree(self.path, self._read_blob, commit, self.limits, self._mark_suspect)

    def tree(self, commit: str) -> GitTree:
        with self._lock:
            try:
                try:
                    return self._make_tree(commit)
                except _Damaged as exc:
                    problem = self.check_mirror()
                    if problem is None:
                        raise GitSourceError(f"cannot read commit {commit}: {exc}") from None
                    self._reclone(problem)
                try:
                    self._fetch_and_resolve()
                    return self._make_tree(commit)
                except _Damaged as exc:
                    raise GitSourceError(f"cannot read commit {commit} even after fetching "
                                         f"{redact_url(self.url)} afresh: {exc}") from None
            except TreeTooLarge as exc:
                raise GitSourceError(str(exc)) from None

    def commit_message(self, commit: str) -> str | None:
        """The full message of a commit of the mirror (its trailers: deletion safety); None when it
        cannot be read. Cached per commit (one git call per new commit)."""
        cached = self._messages.get(commit)
        if cached is not None:
            return cached
        if not re.fullmatch(r"[0-9a-f]{40}", commit):
            return None
        with self._lock:
            self._open()
            shown = self._git("log", "-1", "--format=%B", commit, "--", timeout=self.timeout)
        if shown.returncode != 0:
            log.warning("cannot read the message of commit %s: %s", commit[:12], _summary(shown.stderr))
            return None
        if len(self._messages) > 20:
            self._messages.clear()
        self._messages[commit] = shown.stdout
        return shown.stdout

    def watch_paths(self) -> list[Path]:
        """Paths whose change means a push happened (local repositories only)."""
        local = self.local_path
        if local is None:
            return []
        git_dir = local / ".git" if (local / ".git").is_dir() else local
        return [p for p in (git_dir / "refs" / "heads", git_dir / "packed-refs", git_dir) if p.exists()]


def read_ref(git_dir: Path, ref: str) -> str | None:
    """A ref's commit read straight from the files (loose ref, then packed-refs); None if absent."""
    try:
        value = (git_dir / ref).read_text().strip()
        if re.fullmatch(r"[0-9a-f]{40}", value):
            return value
    except OSError:
        pass
    try:
        for line in (git_dir / "packed-refs").read_text().splitlines():
            parts = line.split(" ", 1)
            if len(parts) == 2 and parts[1] == ref and re.fullmatch(r"[0-9a-f]{40}", parts[0]):
                return parts[0]
    except OSError:
        pass
    return None
