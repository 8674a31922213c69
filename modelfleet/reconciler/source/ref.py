"""Any ref of the remote repository, fetched into a scratch bare repository (``modelfleet plan
--ref``): the daemon's mirror under stateDir is never written."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import git

from modelfleet.reconciler.secrets import redact_url
from modelfleet.reconciler.source.git import GIT_ENV, GitTree, _summary

_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
LOCAL_REF = "refs/modelfleet/plan"


class RefError(Exception):
    """The ref could not be fetched (the message says why and from where)."""


def _candidates(ref: str) -> list[str]:
    if ref.startswith("refs/") or _SHA.fullmatch(ref):
        return [ref]
    return [f"refs/heads/{ref}", f"refs/tags/{ref}"]


def fetch_ref(url: str, ref: str, scratch: Path, timeout: float = 120.0) -> tuple[GitTree, str]:
    """Fetch ``ref`` (a branch, tag, full ref or commit sha) of ``url`` into ``scratch``; its tree and commit."""
    if not ref or ref.startswith("-") or any(c.isspace() for c in ref):
        raise RefError(f"--ref {ref!r}: give a branch, a tag, a full ref (refs/...) or a commit sha")
    env = {**os.environ, **GIT_ENV}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(["git", f"--git-dir={scratch}", *args], capture_output=True, text=True,
                                  errors="replace", env=env, check=False, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(args, -9, "", f"no answer within {timeout:g} s")

    init = subprocess.run(["git", "init", "-q", "--bare", str(scratch)], capture_output=True, text=True,
                          env=env, check=False)
    if init.returncode != 0:
        raise RefError(f"cannot prepare a scratch repository in {scratch}: {_summary(init.stderr)}")
    problems = []
    for source in _candidates(ref):
        fetched = run("fetch", "-q", "--no-tags", "--depth=1", url, f"+{source}:{LOCAL_REF}")
        if fetched.returncode == 0:
            break
        problems.append(_summary(fetched.stderr))
    else:
        raise RefError(f"cannot fetch {ref!r} from {redact_url(url)}: {problems[-1]}")
    resolved = run("rev-parse", "--verify", f"{LOCAL_REF}^{{commit}}")
    sha = resolved.stdout.strip()
    if resolved.returncode != 0 or not _SHA.fullmatch(sha):
        raise RefError(f"{ref!r} of {redact_url(url)} is not a commit")
    repo = git.Repo(scratch)

    def read(oid: str) -> bytes:
        data: bytes = repo.odb.stream(bytes.fromhex(oid)).read()
        return data

    return GitTree(scratch, read, sha), sha
