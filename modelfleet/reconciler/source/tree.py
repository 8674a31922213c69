"""Read a manifest tree lazily from a directory: the pure loader asks only for what it needs."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

SKIP_DIRS = {".git", ".venv", "node_modules", "__pycache__"}


class DirectoryTree(Mapping[str, bytes]):
    """``relative/path -> bytes``; files are read only when looked up."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
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
        return (self.root / key).read_bytes()

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def __contains__(self, key: object) -> bool:
        return key in self._set
