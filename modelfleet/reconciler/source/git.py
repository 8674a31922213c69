"""Git source: a bare mirror of the watched branch under stateDir, read lazily at a commit."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import git

from modelfleet.reconciler.errors import GitSourceError
from modelfleet.reconciler.secrets import redact_url


def local_path_of(url: str) -> Path | None:
    """The filesystem path of a local repository URL (a path or file://), else None."""
    if url.startswith("file://"):
        return Path(url[len("file://"):])
    if "://" in url or re.match(r"^[\w.-]+@[\w.-]+:", url):
        return None
    return Path(url)


class GitTree(Mapping[str, bytes]):
    """``path -> bytes`` of a commit's tree; blobs are read only when asked for."""

    def __init__(self, repo: git.Repo, commit: str) -> None:
        self._commit = repo.commit(commit)
        self._blobs: dict[str, git.Blob] = {str(item.path): item for item in self._commit.tree.traverse()
                                            if isinstance(item, git.Blob)}

    def __getitem__(self, key: str) -> bytes:
        blob = self._blobs[key]
        return bytes(blob.data_stream.read())

    def __iter__(self) -> Iterator[str]:
        return iter(self._blobs)

    def __len__(self) -> int:
        return len(self._blobs)

    def __contains__(self, key: object) -> bool:
        return key in self._blobs


class GitSource:
    def __init__(self, url: str, branch: str, state_dir: str | Path, timeout: float = 60.0) -> None:
        self.url = url
        self.branch = branch
        self.path = Path(state_dir) / "repo.git"
        self.timeout = timeout
        self._lock = threading.Lock()
        self._repo: git.Repo | None = None

    @property
    def local_path(self) -> Path | None:
        return local_path_of(self.url)

    def _open(self) -> git.Repo:
        if self._repo is not None:
            return self._repo
        env = {"GIT_TERMINAL_PROMPT": "0"}
        try:
            if (self.path / "HEAD").exists():
                repo = git.Repo(self.path)
                with repo.config_writer() as cfg:
                    cfg.set_value('remote "origin"', "url", self.url)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                repo = git.Repo.init(self.path, bare=True)
                repo.create_remote("origin", self.url)
            repo.git.update_environment(**env)
        except (git.GitError, OSError) as exc:
            raise GitSourceError(f"cannot prepare the local mirror at {self.path}: {exc}") from None
        self._repo = repo
        return repo

    @property
    def repo(self) -> git.Repo:
        return self._open()

    def sync(self) -> str:
        """Fetch the branch; returns the commit it points at."""
        with self._lock:
            repo = self._open()
            ref = f"refs/heads/{self.branch}"
            # Fast path for a local repository: when its branch already points where our mirror's
            # does, there is nothing to fetch (saves a git process per pass).
            local = self.local_path
            if local is not None:
                source_dir = local / ".git" if (local / ".git").is_dir() else local
                theirs, ours = read_ref(source_dir, ref), read_ref(self.path, ref)
                if theirs is not None and theirs == ours:
                    return ours
            try:
                repo.git.fetch("origin", f"+{ref}:{ref}", "--prune", "--no-tags",
                               kill_after_timeout=self.timeout)
                return repo.git.rev_parse(f"{ref}^{{commit}}").strip()
            except git.GitCommandError as exc:
                detail = redact_url(str(exc.stderr or exc).strip())[-400:]
                raise GitSourceError(f"fetching {redact_url(self.url)} branch {self.branch} failed: {detail}") from None

    def tree(self, commit: str) -> GitTree:
        try:
            return GitTree(self._open(), commit)
        except (git.GitError, ValueError) as exc:
            raise GitSourceError(f"cannot read commit {commit}: {exc}") from None

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

