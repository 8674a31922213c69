"""Resumable upload sessions, on disk beside the store: ``<stateDir>/artifacts/uploads/<id>.{part,json}``.

The offset of a session is the size of its ``.part`` file: whatever reached the disk counts, so
an upload interrupted mid-request resumes where the data stopped (the client asks for the
offset). The sha256 is computed while the data arrives and kept in memory per session; after a
daemon restart it is recomputed from the file once, at completion. Completing verifies the
digest, validates a ``.mar``, then renames the file into the store (same filesystem: atomic).
Sessions untouched for ``abandon_after`` seconds are removed. Ids are 192 random bits.

A full disk is answered with 507 (``UploadError``): a session whose data no longer fits is
removed at once (its bytes would keep the disk full; the client uploads again once there is
room), and nothing half written ever reaches the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from modelfleet.reconciler.artifacts.errors import InvalidArtifact
from modelfleet.reconciler.artifacts.mar import DEFAULT_LIMITS, MarInfo, MarLimits, validate_mar
from modelfleet.reconciler.artifacts.store import ArtifactStore, StoredArtifact, normalize_digest
from modelfleet.reconciler.statedir import StoreError, write_failure

log = logging.getLogger("modelfleet.artifacts.uploads")
_ID = re.compile(r"^[A-Za-z0-9_-]{32}$")
_NAME = re.compile(r"^[^/\\\x00]{1,255}$")
DISK_MARGIN = 64 << 20


class UploadError(Exception):
    """An upload request that cannot be honoured; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


def storage_error(exc: StoreError, then: str) -> UploadError:
    """The answer to a write under stateDir that failed: 507 when the disk is full, else 500."""
    return UploadError(507 if exc.disk_full else 500, f"{exc.message}; {then}")


NOTHING_STORED = "nothing was stored: upload again once there is room"


@dataclass(frozen=True)
class UploadState:
    id: str
    name: str
    offset: int
    size: int | None  # declared total size, when the client said
    sha256: str | None  # declared digest (hex), when the client said
    created: float
    updated: float

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "offset": self.offset, "size": self.size,
                "sha256": f"sha256:{self.sha256}" if self.sha256 else None,
                "created": self.created, "updated": self.updated}


@dataclass(frozen=True)
class CompletedUpload:
    artifact: StoredArtifact
    name: str
    mar: MarInfo | None

    def to_json(self) -> dict[str, Any]:
        return artifact_json(self.artifact, {"name": self.name, **mar_meta(self.mar)})


def mar_meta(mar: MarInfo | None) -> dict[str, Any]:
    if mar is None:
        return {"model_name": None, "handler": None, "version": None}
    return {"model_name": mar.model_name, "handler": mar.handler, "version": mar.version,
            "serialized_file": mar.serialized_file, "model_file": mar.model_file}


def artifact_json(artifact: StoredArtifact, meta: dict[str, Any]) -> dict[str, Any]:
    ref = artifact.ref
    return {"sha256": ref, "size": artifact.size, "created": artifact.created, **meta,
            "origin": {"file": {"sha256": ref}}}


class Appender:
    """Appends to a session's file, hashing on the fly when the hash so far is known."""

    def __init__(self, manager: UploadManager, upload_id: str, offset: int) -> None:
        self._manager = manager
        self.id = upload_id
        self.offset = offset
        self._hash = manager._take_hash(upload_id, offset)
        try:
            self._file: IO[bytes] | None = open(manager._part(upload_id), "ab")  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise write_failure(manager.dir, exc, "the upload") from exc

    def write(self, data: bytes) -> None:
        """StoreError when the bytes cannot be written (``disk_full`` when the disk is full)."""
        assert self._file is not None
        try:
            self._file.write(data)
        except OSError as exc:
            self._hash = None  # what reached the disk is unknown now: recompute at completion
            raise write_failure(self._manager.dir, exc, "the upload") from exc
        if self._hash is not None:
            self._hash.update(data)
        self.offset += len(data)

    def close(self) -> int:
        """Flush; remember the hash state; return the offset (the file's real size)."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.flush()
            with contextlib.suppress(OSError):  # a flush that failed above fails again in close
                self._file.close()
            self._file = None
        real = self._manager._part(self.id).stat().st_size
        if real != self.offset:
            self._hash = None
        self._manager._put_hash(self.id, real, self._hash)
        self._manager._touch(self.id)
        return real


class UploadManager:
    def __init__(self, store: ArtifactStore, *, abandon_after: float = 24 * 3600.0,
                 max_size: int | None = None, limits: MarLimits = DEFAULT_LIMITS) -> None:
        self.store = store
        self.dir = store.root / "uploads"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.abandon_after = abandon_after
        self.max_size = max_size
        self.limits = limits
        self._lock = threading.Lock()
        self._hashes: dict[str, tuple[int, Any]] = {}  # id -> (offset, sha256 object)
        self._last_cleanup = 0.0

    # --- paths and bookkeeping -------------------------------------------------------------------

    def _part(self, upload_id: str) -> Path:
        return self.dir / f"{upload_id}.part"

    def _meta(self, upload_id: str) -> Path:
        return self.dir / f"{upload_id}.json"

    def _take_hash(self, upload_id: str, offset: int) -> Any:
        with self._lock:
            known = self._hashes.pop(upload_id, None)
        if known is not None and known[0] == offset:
            return known[1]
        return hashlib.sha256() if offset == 0 else None

    def _put_hash(self, upload_id: str, offset: int, hasher: Any) -> None:
        with self._lock:
            if hasher is None:
                self._hashes.pop(upload_id, None)
            else:
                self._hashes[upload_id] = (offset, hasher)

    def _touch(self, upload_id: str) -> None:
        with contextlib.suppress(OSError):
            os.utime(self._meta(upload_id))

    # --- sessions -----------------------------------------------------------------------------------

    def create(self, name: str, size: int | None = None, sha256: str | None = None) -> UploadState:
        self.maybe_cleanup()
        if not isinstance(name, str) or not _NAME.match(name):
            raise UploadError(400, "name must be a file name (no '/', at most 255 characters)")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise UploadError(400, "size must be a non-negative integer")
        if size is not None and self.max_size is not None and size > self.max_size:
            raise UploadError(413, f"size {size} exceeds the limit of {self.max_size} bytes")
        digest = None
        if sha256 is not None:
            try:
                digest = normalize_digest(sha256)
            except ValueError as exc:
                raise UploadError(400, str(exc)) from None
        if size is not None:
            free = shutil.disk_usage(self.dir).free
            if size + DISK_MARGIN > free:
                raise UploadError(507, f"not enough disk space for {size} bytes ({free} free)")
        upload_id = secrets.token_urlsafe(24)
        now = time.time()
        meta = {"id": upload_id, "name": name, "size": size, "sha256": digest, "created": now}
        temp = self.dir / f".{upload_id}.tmp"
        try:
            self._part(upload_id).touch()
            temp.write_text(json.dumps(meta), encoding="utf-8")
            os.replace(temp, self._meta(upload_id))
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
            self.abort(upload_id)
            raise storage_error(write_failure(self.dir, exc, "the upload"), "no upload was started") from None
        return UploadState(upload_id, name, 0, size, digest, now, now)

    def get(self, upload_id: str) -> UploadState | None:
        if not _ID.match(upload_id or ""):
            return None
        try:
            meta = json.loads(self._meta(upload_id).read_text(encoding="utf-8"))
            part = self._part(upload_id).stat()
            updated = self._meta(upload_id).stat().st_mtime
        except (OSError, ValueError):
            return None
        return UploadState(upload_id, meta["name"], part.st_size, meta.get("size"), meta.get("sha256"),
                           meta.get("created", 0.0), max(updated, part.st_mtime))

    def sessions(self) -> list[UploadState]:
        """The upload sessions open now (read only: for the dashboard), most recently written first."""
        try:
            names = [entry.name for entry in os.scandir(self.dir)]
        except OSError:
            return []
        found = [self.get(name.removesuffix(".json")) for name in names
                 if name.endswith(".json") and not name.startswith(".")]
        return sorted((s for s in found if s is not None), key=lambda s: s.updated, reverse=True)

    def appender(self, upload_id: str, offset: int) -> Appender:
        return Appender(self, upload_id, offset)

    def complete(self, upload_id: str, sha256: str | None = None) -> CompletedUpload:
        """Verify, validate and move into the store. A bad upload is deleted (nothing stored)."""
        state = self.get(upload_id)
        if state is None:
            raise UploadError(404, f"no upload {upload_id}")
        if state.size is not None and state.offset != state.size:
            raise UploadError(409, f"upload has {state.offset} of {state.size} bytes: send the rest first",
                              offset=state.offset)
        expected = state.sha256
        if sha256 is not None:
            try:
                expected = normalize_digest(sha256)
            except ValueError as exc:
                raise UploadError(400, str(exc)) from None
        part = self._part(upload_id)
        hasher = self._take_hash(upload_id, state.offset)
        if hasher is None:
            hasher = hashlib.sha256()
            with open(part, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    hasher.update(chunk)
        digest = hasher.hexdigest()
        if expected is not None and expected != digest:
            self.abort(upload_id)
            raise UploadError(422, f"{state.name}: content has sha256:{digest}, expected sha256:{expected}"
                                   " (corrupted in transit? upload again)")
        mar = None
        if state.name.lower().endswith(".mar"):
            try:
                mar = validate_mar(part, self.limits, display_name=state.name)
            except InvalidArtifact as exc:
                self.abort(upload_id)
                raise UploadError(422, exc.message) from None
        try:
            artifact = self.store.adopt(part, digest)
        except StoreError as exc:
            self.abort(upload_id)  # its bytes would keep the disk full
            raise storage_error(exc, NOTHING_STORED) from None
        try:
            self.store.put_meta(digest, {"name": state.name, "uploaded": time.time(), **mar_meta(mar)})
        except StoreError as exc:  # informative only: the artifact is stored and complete
            log.warning("artifact %s stored without its metadata: %s", artifact.ref, exc)
        self.abort(upload_id)
        return CompletedUpload(artifact, state.name, mar)

    def abort(self, upload_id: str) -> None:
        with self._lock:
            self._hashes.pop(upload_id, None)
        for path in (self._part(upload_id), self._meta(upload_id)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def cleanup(self, now: float | None = None) -> list[str]:
        """Remove sessions untouched for ``abandon_after`` seconds (and stray temporary files)."""
        now = time.time() if now is None else now
        removed = []
        for entry in os.scandir(self.dir):
            name = entry.name
            upload_id = name.split(".")[0] if not name.startswith(".") else name[1:].split(".")[0]
            try:
                age = now - entry.stat().st_mtime
            except FileNotFoundError:
                continue
            if age < self.abandon_after:
                continue
            if name.startswith("."):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                continue
            state = self.get(upload_id)
            if state is None or now - state.updated >= self.abandon_after:
                self.abort(upload_id)
                if upload_id not in removed:
                    removed.append(upload_id)
        self.store.cleanup_temp(older_than=self.abandon_after)
        return removed

    def maybe_cleanup(self, every: float = 60.0) -> None:
        now = time.time()
        if now - self._last_cleanup >= every:
            self._last_cleanup = now
            self.cleanup(now)
