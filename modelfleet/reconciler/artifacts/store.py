"""Content-addressed artifact store: ``<stateDir>/artifacts/sha256/<hex>``.

A file gets its final name only once it is complete: ingestion writes to a temporary file in
the same directory (named with a leading dot, so it is never listed nor found by ``has``),
hashes on the fly, fsyncs, then renames atomically and fsyncs the directory. A crash at any point
leaves either nothing or a complete, correctly named file (plus a stale temporary file that
``cleanup_temp`` removes). Nothing is ever read whole into memory.

Small JSON metadata (the upload's file name, the archive's model name) lives beside the objects
in ``<stateDir>/artifacts/meta/<hex>.json``; it is informative only, never needed to serve a file.

A write that fails (a full disk, an I/O error) raises a StoreError (``disk_full`` set when the disk
is full; the upload API answers 507) after removing the temporary file: nothing half written is
left behind, and nothing half written is ever visible.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from modelfleet.reconciler.artifacts.errors import ArtifactNotFound
from modelfleet.reconciler.statedir import write_failure
from modelfleet.state.artifacts import normalize_digest

_DIGEST = re.compile(r"^[0-9a-f]{64}$")  # an object's file name
_TEMP_PREFIX = ".ingest-"
CHUNK_SIZE = 1 << 20
WHAT = "the artifact store"


def reference(digest: str) -> str:
    """The form users write in manifests: ``sha256:<hex>``."""
    return "sha256:" + normalize_digest(digest)


@dataclass(frozen=True)
class StoredArtifact:
    digest: str  # hex
    size: int
    path: Path
    created: float  # mtime, seconds since the epoch

    @property
    def ref(self) -> str:
        return "sha256:" + self.digest


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArtifactWriter:
    """One ingestion in progress: write chunks, then ``commit()`` (or ``abort()``).

    Used as a context manager, an exception (or a missing commit) removes the temporary file.
    Between the last write and commit the caller may inspect ``temp_path`` (e.g. validate an
    archive) before the file becomes visible in the store.
    """

    def __init__(self, store: ArtifactStore) -> None:
        self._store = store
        self.temp_path = store.objects / f"{_TEMP_PREFIX}{secrets.token_hex(8)}"
        self._hash = hashlib.sha256()
        self.size = 0
        self._done = False
        self._file: IO[bytes] | None = None
        try:
            self._file = open(self.temp_path, "xb")  # noqa: SIM115 - closed in commit/abort
        except OSError as exc:
            self.abort()
            raise write_failure(store.objects, exc, WHAT) from exc

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        assert self._file is not None, "writer is closed"
        try:
            self._file.write(chunk)
        except OSError as exc:
            self.abort()  # what reached the disk is unknown: this ingestion is over
            raise write_failure(self._store.objects, exc, WHAT) from exc
        self._hash.update(chunk)
        self.size += len(chunk)

    @property
    def digest(self) -> str:
        return self._hash.hexdigest()

    def flush(self) -> None:
        """Flush and fsync what was written so far (the file is still not visible in the store)."""
        if self._file is not None:
            try:
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError as exc:
                self.abort()
                raise write_failure(self._store.objects, exc, WHAT) from exc

    def commit(self, expected: str | None = None) -> StoredArtifact:
        """fsync, check ``expected`` (ValueError on mismatch, nothing stored), rename into place."""
        try:
            self.flush()
            assert self._file is not None
            self._file.close()
            self._file = None
            digest = self.digest
            if expected is not None and normalize_digest(expected) != digest:
                raise ValueError(f"content has sha256:{digest}, expected {reference(expected)}")
            final = self._store.objects / digest
            try:
                os.replace(self.temp_path, final)  # same directory: atomic; same content if it existed
                self._done = True  # in place and complete: an fsync failure below must not remove it
                _fsync_dir(self._store.objects)
            except OSError as exc:
                raise write_failure(self._store.objects, exc, WHAT) from exc
            return self._store.get(digest)
        finally:
            if not self._done:
                self.abort()

    def abort(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        with contextlib.suppress(FileNotFoundError):
            self.temp_path.unlink()
        self._done = True

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self.abort()


class ArtifactStore:
    """Files named by the sha256 of their content, under ``<state_dir>/artifacts/sha256/``."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.root = Path(state_dir) / "artifacts"
        self.objects = self.root / "sha256"
        self.meta_dir = self.root / "meta"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.meta_dir.mkdir(parents=True, exist_ok=True)

    # --- writing ----------------------------------------------------------------------------

    def writer(self) -> ArtifactWriter:
        return ArtifactWriter(self)

    def ingest(
        self,
        chunks: Iterable[bytes],
        expected: str | None = None,
        validate: Callable[[Path], object] | None = None,
    ) -> StoredArtifact:
        """Store a stream of chunks; ``validate(temp_path)`` may raise to refuse the content."""
        with self.writer() as writer:
            for chunk in chunks:
                writer.write(chunk)
            if validate is not None:
                writer.flush()
                validate(writer.temp_path)
            return writer.commit(expected)

    def ingest_file(self, path: str | os.PathLike[str], expected: str | None = None,
                    chunk_size: int = CHUNK_SIZE) -> StoredArtifact:
        def chunks() -> Iterable[bytes]:
            with open(path, "rb") as fh:
                while chunk := fh.read(chunk_size):
                    yield chunk

        return self.ingest(chunks(), expected)

    def adopt(self, path: str | os.PathLike[str], digest: str) -> StoredArtifact:
        """Move a complete file that the caller has hashed into the store (same filesystem).

        The caller vouches for ``digest`` (e.g. an upload hashed while it arrived).
        """
        hexdigest = normalize_digest(digest)
        source = Path(path)
        try:
            with open(source, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(source, self.objects / hexdigest)
            _fsync_dir(self.objects)
        except OSError as exc:
            raise write_failure(self.objects, exc, WHAT) from exc
        return self.get(hexdigest)

    # --- reading ----------------------------------------------------------------------------

    def has(self, digest: str) -> bool:
        try:
            return (self.objects / normalize_digest(digest)).is_file()
        except ValueError:
            return False

    def path(self, digest: str) -> Path:
        """Path of a stored file; ArtifactNotFound when it is not (completely) there."""
        hexdigest = normalize_digest(digest)
        path = self.objects / hexdigest
        if not path.is_file():
            raise ArtifactNotFound(f"artifact sha256:{hexdigest} is not in the store "
                                   "(upload it with `modelfleet upload FILE.mar`)")
        return path

    def get(self, digest: str) -> StoredArtifact:
        path = self.path(digest)
        st = path.stat()
        return StoredArtifact(path.name, st.st_size, path, st.st_mtime)

    def open(self, digest: str) -> IO[bytes]:
        return open(self.path(digest), "rb")

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

    def remove(self, digest: str) -> bool:
        hexdigest = normalize_digest(digest)
        removed = False
        with contextlib.suppress(FileNotFoundError):
            (self.objects / hexdigest).unlink()
            removed = True
        with contextlib.suppress(FileNotFoundError):
            (self.meta_dir / f"{hexdigest}.json").unlink()
        return removed

    def list(self) -> list[StoredArtifact]:
        out = []
        for entry in os.scandir(self.objects):
            if _DIGEST.match(entry.name) and entry.is_file(follow_symlinks=False):
                st = entry.stat()
                out.append(StoredArtifact(entry.name, st.st_size, Path(entry.path), st.st_mtime))
        return sorted(out, key=lambda a: (a.created, a.digest))

    # --- metadata and housekeeping ------------------------------------------------------------

    def put_meta(self, digest: str, meta: dict[str, Any]) -> None:
        hexdigest = normalize_digest(digest)
        target = self.meta_dir / f"{hexdigest}.json"
        temp = self.meta_dir / f".{hexdigest}.{secrets.token_hex(4)}.tmp"
        try:
            temp.write_text(json.dumps(meta, sort_keys=True), encoding="utf-8")
            os.replace(temp, target)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
            raise write_failure(self.meta_dir, exc, WHAT) from exc

    def meta(self, digest: str) -> dict[str, Any]:
        try:
            data = json.loads((self.meta_dir / f"{normalize_digest(digest)}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def cleanup_temp(self, older_than: float = 3600.0) -> int:
        """Remove temporary files of ingestions that died (older than ``older_than`` seconds)."""
        removed = 0
        cutoff = time.time() - older_than
        for directory in (self.objects, self.meta_dir):
            for entry in os.scandir(directory):
                if entry.name.startswith(".") and entry.stat().st_mtime < cutoff:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        removed += 1
        return removed
