"""Real Git repositories for the source tests: a bare origin, a working clone to push from."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

API = "modelfleet.dev/v1alpha1"
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@localhost", "GIT_CONFIG_NOSYSTEM": "1", "LC_ALL": "C"}
MANIFESTS: dict[str, Any] = {
    "environments.yaml": [{"apiVersion": API, "kind": "Environment", "metadata": {"name": "production"}}],
    "models/echo.yaml": [{"apiVersion": API, "kind": "Model", "metadata": {"name": "echo"}, "spec": {
        "deployments": [{"environment": "production", "runtime": {"type": "custom", "image": "x:1"}}]}}],
}


def git(cwd: Path, *args: str, stdin: bytes | None = None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **GIT_ENV}, check=True,
                          capture_output=True, input=stdin).stdout.decode().strip()


@dataclass
class Remote:
    """A bare repository (the remote) and a clone of it to commit and push from."""

    origin: Path
    work: Path

    def commit(self, files: dict[str, object], message: str = "change", push: bool = True) -> str:
        for path, content in files.items():
            target = self.work / path
            if content is None:
                target.unlink(missing_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            elif isinstance(content, str):
                target.write_text(content)
            else:
                docs = content if isinstance(content, list) else [content]
                target.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        git(self.work, "add", "-A")
        git(self.work, "commit", "-q", "--allow-empty", "-m", message)
        if push:
            git(self.work, "push", "-q", "origin", "main")
        return git(self.work, "rev-parse", "HEAD")

    def force_push(self, commit: str) -> None:
        git(self.work, "push", "-q", "--force", "origin", f"{commit}:refs/heads/main")

    def take_away(self) -> Path:
        """The remote disappears (unreachable); returns where it went, for bring_back."""
        aside = self.origin.with_name(self.origin.name + ".away")
        shutil.move(self.origin, aside)
        return aside

    def bring_back(self, aside: Path) -> None:
        shutil.move(aside, self.origin)


def make_remote(root: Path, files: dict[str, object] | None = None) -> Remote:
    origin, work = root / "origin.git", root / "work"
    root.mkdir(parents=True, exist_ok=True)
    git(root, "init", "-q", "--bare", "-b", "main", str(origin))
    git(root, "clone", "-q", str(origin), str(work))
    git(work, "checkout", "-q", "-b", "main")
    remote = Remote(origin, work)
    remote.commit(files if files is not None else MANIFESTS, "init")
    return remote


def damage_objects(git_dir: Path) -> int:
    """Truncate every object file and pack of a repository; how many files were damaged."""
    count = 0
    for path in (git_dir / "objects").rglob("*"):
        if path.is_file() and (path.suffix == ".pack" or len(path.parent.name) == 2):
            path.chmod(0o644)
            with open(path, "r+b") as handle:
                handle.truncate(max(0, min(10, path.stat().st_size // 2)))
            count += 1
    return count
