"""Following the route table the daemon publishes in ``<stateDir>/routes.db``, keeping the last one read.

:class:`RouteFollower` reads the file (blocking); :class:`RouteFeed` holds the table being served
and refreshes it from a worker thread, so the event loop never waits for SQLite. :class:`TableFeed`
is what every feed shares (the one over HTTP is gateway/remote_routes.py): the table being served,
as this gateway's location prefers it.
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


class TableFeed:
    """The route table being served.

    Requests read :attr:`table` once and keep that table for their whole exchange; a new table
    replaces it in one assignment. ``on_install`` is called with each new table. With a
    ``location`` (gateway.location), each deployment is served by its backends nearest to it
    (``RouteTable.preferring``; ``continent``: that of the location, when the table does not say).
    """

    source = ""  # where tables come from, for the logs and /routes

    def __init__(self, metrics: GatewayMetrics, on_install: Callable[[RouteTable], None] | None = None, *,
                 location: str | None = None, continent: str | None = None) -> None:
        self.metrics = metrics
        self.table = RouteTable(0, {})
        self.loaded_at = 0.0
        self.location = location
        self.continent = continent
        self._on_install = on_install
        self._unknown_location_warned = False

    @property
    def error(self) -> str | None:
        """Why the table cannot be read now (the last one is still served), else None."""
        return None

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        self.close()

    async def refresh(self) -> None:
        """Bring the table up to date now (the retry of a failed request calls it)."""

    def _install(self, table: RouteTable) -> None:
        previous = self.table
        if self.location:
            continent = self.continent or table.locations.get(self.location)
            if continent is None and not self._unknown_location_warned:
                self._unknown_location_warned = True
                log.warning("gateway.location %s is the location of no pool host: requests go to the replicas in "
                            "that location when there are any, else to any replica", self.location)
            table = table.preferring(self.location, continent)
        self.table = table  # the swap: requests read self.table once
        self.loaded_at = time.time()
        if self._on_install is not None:
            self._on_install(table)
        self.metrics.route_table_version.set(table.version)
        self.metrics.route_table_published.set(table.published_at)
        log.info("route table version %d (%d deployments, %d ready backends), was %d", table.version,
                 len(table.routes), sum(len(b) for b in table.routes.values()), previous.version)


class RouteFeed(TableFeed):
    """The route table of ``<stateDir>/routes.db``, refreshed from ``follower`` in a worker thread.

    Besides the gateway's periodic refresh, changes to the file (inotify, through watchfiles) start
    a read at once: a published table is served within a few milliseconds. Where the directory
    cannot be watched, the periodic refresh alone follows it.
    """

    def __init__(self, follower: RouteFollower, metrics: GatewayMetrics,
                 on_install: Callable[[RouteTable], None] | None = None, *,
                 location: str | None = None, continent: str | None = None) -> None:
        super().__init__(metrics, on_install, location=location, continent=continent)
        self.follower = follower
        self.source = str(follower.path)
        self._executor: ThreadPoolExecutor | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._refresh_waiters: asyncio.Future[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._stop_watching: asyncio.Event | None = None

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
        with contextlib.suppress(RuntimeError):  # no running loop: the periodic refresh only
            asyncio.get_running_loop()
            self._stop_watching = asyncio.Event()
            self._watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        import watchfiles

        directory = self.follower.state_dir
        stop = self._stop_watching
        assert stop is not None
        name = self.follower.path.name
        while not stop.is_set():
            if not directory.is_dir():  # the daemon has not made its stateDir yet
                await asyncio.sleep(1.0)
                continue
            try:
                async for _ in watchfiles.awatch(directory, stop_event=stop, debounce=1, step=1, rust_timeout=500,
                                                 watch_filter=lambda _, path: os.path.basename(path).startswith(name),
                                                 recursive=False, ignore_permission_denied=True):
                    await self.refresh()
            except Exception as exc:  # inotify limits, the directory replaced: the periodic refresh goes on
                log.info("not watching %s (%s); following it every refresh interval", directory, exc)
                await asyncio.sleep(5.0)

    async def aclose(self) -> None:
        if self._stop_watching is not None:
            self._stop_watching.set()
        if self._watcher is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._watcher, 2.0)
            self._watcher = None
        self.close()

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
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
