"""Faults of the files the daemon keeps under stateDir: a full disk, I/O errors, a corrupt database.

Writers under stateDir (the store ``modelfleet.db``, the route table ``routes.db``, the artifact
store) translate these into :class:`StoreError`, a transient error with a message that names the
file and says what to do: the pass that hit it fails cleanly, what runs keeps running, and the next
pass retries once the disk has room again.

SQLite undoes a whole transaction by itself on SQLITE_FULL and on some I/O errors; a ROLLBACK
after that fails with "cannot rollback - no transaction is active" and hides the real error, so
:func:`sqlite_write` rolls back only a transaction that is still open.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from modelfleet.reconciler.errors import TransientError

log = logging.getLogger("modelfleet.statedir")

# Primary SQLite result codes (the low byte of an extended code).
SQLITE_PERM = 3
SQLITE_BUSY = 5
SQLITE_LOCKED = 6
SQLITE_READONLY = 8
SQLITE_IOERR = 10
SQLITE_CORRUPT = 11
SQLITE_FULL = 13
SQLITE_CANTOPEN = 14
SQLITE_NOTADB = 26
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class StoreError(TransientError):
    """A file under stateDir cannot be written or read (disk full, I/O error, corrupt database)."""

    def __init__(self, message: str, path: str | os.PathLike[str], *, disk_full: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.path = Path(path)
        self.disk_full = disk_full


def sqlite_code(exc: BaseException) -> int | None:
    """The primary SQLite result code of an sqlite3 error, when Python knows it."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def is_corrupt(exc: BaseException) -> bool:
    """The database file is damaged or is not a database at all (not a transient condition)."""
    return isinstance(exc, sqlite3.DatabaseError) and sqlite_code(exc) in (SQLITE_CORRUPT, SQLITE_NOTADB)


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in _DISK_FULL_ERRNOS
    if isinstance(exc, sqlite3.Error):
        return sqlite_code(exc) == SQLITE_FULL or "database or disk is full" in str(exc)
    return False


def free_bytes(path: str | os.PathLike[str]) -> int | None:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    target = Path(path)
    while not target.exists() and target.parent != target:
        target = target.parent
    try:
        return shutil.disk_usage(target).free
    except OSError:
        return None


def _is_storage_error(exc: BaseException) -> bool:
    """Errors of the storage under a database or file, as opposed to programming errors."""
    if isinstance(exc, OSError):
        return True
    # sqlite3.IntegrityError, ProgrammingError etc. are bugs: they keep their type.
    return type(exc) in (sqlite3.OperationalError, sqlite3.DatabaseError)


def write_failure(path: str | os.PathLike[str], exc: BaseException, what: str = "the store",
                  verb: str = "write") -> StoreError:
    """A StoreError for a failed write of ``what`` at ``path``, saying what to do about it."""
    path = Path(path)
    where = path.parent
    if is_disk_full(exc):
        free = free_bytes(path)
        amount = f"{free} bytes free" if free is not None else "free space unknown"
        return StoreError(f"cannot {verb} {what} at {path}: disk full ({amount}); free space under stateDir "
                          f"({where})", path, disk_full=True)
    if is_corrupt(exc):
        return StoreError(f"cannot {verb} {what} at {path}: the file is corrupt ({exc}); restart the daemon: "
                          "it moves a corrupt store aside and rebuilds it from the hosts", path)
    code = sqlite_code(exc)
    if code in (SQLITE_READONLY, SQLITE_PERM, SQLITE_CANTOPEN) or (
            isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM)):
        return StoreError(f"cannot {verb} {what} at {path}: not writable ({_detail(exc)}); check the permissions "
                          f"and mount of stateDir ({where})", path)
    if code in (SQLITE_BUSY, SQLITE_LOCKED):
        return StoreError(f"cannot {verb} {what} at {path}: locked by another process ({exc}); is a second "
                          "daemon running with the same stateDir?", path)
    if code == SQLITE_IOERR or isinstance(exc, OSError):
        return StoreError(f"cannot {verb} {what} at {path}: disk I/O error ({_detail(exc)}); check the disk "
                          f"under stateDir ({where})", path)
    return StoreError(f"cannot {verb} {what} at {path}: {exc}", path)


def _detail(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def translated(path: str | os.PathLike[str], exc: BaseException, what: str = "the store",
               verb: str = "write") -> BaseException:
    """``exc`` as a StoreError when it is a storage error, else ``exc`` itself (a bug stays a bug)."""
    if isinstance(exc, StoreError) or not _is_storage_error(exc):
        return exc
    return write_failure(path, exc, what, verb)


def rollback(db: sqlite3.Connection) -> None:
    """Roll back the open transaction, if SQLite has not already done so itself."""
    if not db.in_transaction:
        return
    try:
        db.execute("ROLLBACK")
    except sqlite3.Error as exc:  # the connection rolls back when it closes; never hide the first error
        log.warning("rollback failed: %s", exc)


@contextmanager
def sqlite_write(db: sqlite3.Connection, path: str | os.PathLike[str],
                 what: str = "the store") -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``; all or nothing. A storage failure (disk full, I/O error,
    lock timeout, corruption) becomes a StoreError after the transaction is rolled back."""
    try:
        db.execute("BEGIN IMMEDIATE")  # a failure here never reaches the yield: it raises from here
        yield db
        db.execute("COMMIT")
    except BaseException as exc:
        rollback(db)
        error = translated(path, exc, what)
        if error is exc:
            raise
        raise error from exc
