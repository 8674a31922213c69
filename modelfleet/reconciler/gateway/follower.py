"""Following the route table the daemon publishes in ``<stateDir>/routes.db``, keeping the last one read.

:class:`RouteFollower` reads the file (blocking); :class:`RouteFeed` holds the table being served
and refreshes it from a worker thread, so the event loop never waits for SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from modelfleet.reconciler.gateway.metrics import GatewayMetrics
from modelfleet.reconciler.gateway.routes import ROUTES_DB, RouteStore, RouteTable

log = logging.getLogger("modelfleet.gateway")


class RouteFollower:
    """Reads the latest route table from ``<stateDir>/routes.db``; blocking, call from one thread.

    :meth:`poll` is cheap when nothing changed (a ``stat`` and ``SELECT MAX(version)``). The file is
    reopened when it is replaced (another inode), so a daemon that recreates it is followed; a
    missing or unreadable file leaves the caller with the table it already has.
    """

    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / ROUTES_DB
        self.error: str | None = None
        self._store: RouteStore | None = None
        self._ident: tuple[int, int] | None = None
        self._loaded: tuple[int, int, int] | None = None  # (device, inode, version) last returned

    def poll(self) -> RouteTable | None:
        """The latest table if it differs from the one returned last, else None."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            self._close()
            self._set_error(f"{self.path}: {exc.strerror or exc}")
            return None
        ident = (st.st_dev, st.st_ino)
        try:
            if self._store is None or ident != self._ident:
                self._close()
                self._store = RouteStore(self.state_dir)
                self._ident = ident
                # A new file may reuse the inode number of an old one and restart versions at 1:
                # after reopening, the table is read again whatever its version.
                self._loaded = None
            version = self._store.latest_version()
            if self._loaded == (*ident, version):
                self._set_error(None)
                return None
            table = self._store.latest()
        except (sqlite3.Error, ValueError, TypeError, KeyError, AttributeError) as exc:
            self._close()
            self._set_error(f"cannot read {self.path}: {exc}")
            return None
        if table is None:  # created but nothing published yet: keep what we have
            self._set_error(None)
            return None
        self._loaded = (*ident, table.version)
        self._set_error(None)
        return table

    def close(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._store is not None:
            with contextlib.suppress(sqlite3.Error):
                self._store.close()
        self._store = None
        self._ident = None

    def _set_error(self, error: str | None) -> None:
        if error != self.error:
            if error is None:
                log.info("route table readable again: %s", self.path)
            else:
                log.warning("%s; keeping the last route table", error)
        self.error = error


class RouteFeed:
    """The route table being served, refreshed from ``follower`` in a worker thread.

    Requests read :attr:`table` once and keep that table for their whole exchange; a new table
    replaces it in one assignment. ``on_install`` is called with each new table.
    """

    def __init__(self, follower: RouteFollower, metrics: GatewayMetrics,
                 on_install: Callable[[RouteTable], None] | None = None) -> None:
        self.follower = follower
        self.metrics = metrics
        self.table = RouteTable(0, {})
        self.loaded_at = 0.0
        self._on_install = on_install
        self._executor: ThreadPoolExecutor | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._refresh_waiters: asyncio.Future[None] | None = None

    @property
    def error(self) -> str | None:
        """Why routes.db cannot be read now (the last table read is still served), else None."""
        return self.follower.error

    def start(self) -> None:
        """Read the table once, here and now, so that the first requests find their routes."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-routes")
        table = self.follower.poll()
        if table is not None:
            self._install(table)

    def close(self) -> None:
        if self._executor is not None:
            executor = self._executor
            self._executor = None
            executor.submit(self.follower.close)
            executor.shutdown(wait=True)

    async def refresh(self) -> None:
        """Read the route table now; returns after a read that started after this call.

        Concurrent callers share reads: while one read runs, every new caller waits for the next one.
        """
        loop = asyncio.get_running_loop()
        if self._refresh_waiters is None:
            self._refresh_waiters = loop.create_future()
        waiters = self._refresh_waiters
        if self._refresher is None or self._refresher.done():
            self._refresher = loop.create_task(self._run_refreshes())
        await asyncio.shield(waiters)

    async def _run_refreshes(self) -> None:
        loop = asyncio.get_running_loop()
        while self._refresh_waiters is not None:
            waiters = self._refresh_waiters
            self._refresh_waiters = None
            try:
                table = await loop.run_in_executor(self._executor, self.follower.poll)
                if table is not None:
                    self._install(table)
                self.metrics.route_table_read_failing.set(0 if self.follower.error is None else 1)
            except Exception:  # never fatal: the current table stays
                log.exception("route table refresh failed")
            finally:
                if not waiters.done():
                    waiters.set_result(None)

    def _install(self, table: RouteTable) -> None:
        previous = self.table
        self.table = table  # the swap: requests read self.table once
        self.loaded_at = time.time()
        if self._on_install is not None:
            self._on_install(table)
        self.metrics.route_table_version.set(table.version)
        self.metrics.route_table_published.set(table.published_at)
        log.info("route table version %d (%d deployments, %d ready backends), was %d", table.version,
                 len(table.routes), sum(len(b) for b in table.routes.values()), previous.version)
