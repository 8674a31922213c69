"""Read a manifest tree lazily from a directory: the pure loader asks only for what it needs.

Bounds shared with the Git tree (source/git.py): a manifest candidate (``*.yaml``/``*.yml``
outside hidden directories) larger than ``TreeLimits.max_file_bytes`` is never read — its size is
checked first and the loader reports it as that file's error (``UnreadableFile``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from modelfleet.state.loader import MAX_MANIFEST_BYTES, UnreadableFile, is_manifest_path

SKIP_DIRS = {".git", ".venv", "node_modules", "__pycache__"}


@dataclass(frozen=True)
class TreeLimits:
    """What the daemon reads of a commit at most (its memory must not depend on the repository's size)."""

    max_file_bytes: int = MAX_MANIFEST_BYTES  # one manifest file (1 MiB)
    max_files: int = 20_000  # manifest candidates (*.yaml/*.yml outside hidden directories)
    max_total_bytes: int = 64 * 2**20  # all manifest candidates together


DEFAULT_LIMITS = TreeLimits()


class TreeTooLarge(Exception):
    """A commit with more manifest candidates (or bytes of them) than the daemon reads."""


def human_size(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f}".removesuffix(".0") + f" {unit}"
    return f"{size} bytes"


def too_large(size: int, limits: TreeLimits) -> UnreadableFile:
    """The error for a manifest candidate over the size limit (it is not read)."""
    return UnreadableFile(
        f"file is {human_size(size)}, over the {human_size(limits.max_file_bytes)} limit for a manifest (not read)",
        f"keep manifests under {human_size(limits.max_file_bytes)}; move large YAML that is not a manifest "
        "into a hidden directory (e.g. .data/)")


def too_many_files(where: str, limits: TreeLimits, first_over: str) -> TreeTooLarge:
    return TreeTooLarge(
        f"{where} has more than {limits.max_files} YAML files outside hidden directories (the limit; "
        f"{first_over!r} is one too many): move YAML that is not a manifest into a hidden directory "
        "(e.g. .data/) or split the repository")


def too_many_bytes(where: str, limits: TreeLimits, first_over: str) -> TreeTooLarge:
    return TreeTooLarge(
        f"{where}: its YAML files outside hidden directories add up to more than "
        f"{human_size(limits.max_total_bytes)} (the limit, reached at {first_over!r}): move YAML that is "
        "not a manifest into a hidden directory (e.g. .data/) or split the repository")


class DirectoryTree(Mapping[str, bytes]):
    """``relative/path -> bytes``; files are read only when looked up (a manifest candidate only
    when it is within ``limits.max_file_bytes``)."""

    def __init__(self, root: str | os.PathLike[str], limits: TreeLimits = DEFAULT_LIMITS) -> None:
        self.root = Path(root)
        self.limits = limits
        self._paths = sorted(self._walk())
        self._set = set(self._paths)

    def _walk(self) -> Iterator[str]:
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
            for name in filenames:
                full = Path(dirpath) / name
                if full.is_file():
                    yield full.relative_to(self.root).as_posix()

    def __getitem__(self, key: str) -> bytes:
        if key not in self._set:
            raise KeyError(key)
        path = self.root / key
        if is_manifest_path(key):
            size = path.stat().st_size
            if size > self.limits.max_file_bytes:
                raise too_large(size, self.limits)
            with open(path, "rb") as file:  # bounded even if the file grows meanwhile
                data = file.read(self.limits.max_file_bytes + 1)
            if len(data) > self.limits.max_file_bytes:
                raise too_large(max(size, len(data)), self.limits)
            return data
        return path.read_bytes()

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def __contains__(self, key: object) -> bool:
        return key in self._set
