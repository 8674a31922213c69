"""Who waits for the next route table: the long-polls of ``GET /api/v1/routes`` (api/routes.py).

The daemon calls :meth:`RouteWatch.published` (from any thread) after each publish; waiters on
any event loop wake at once. A waiter also wakes every ``RECHECK`` seconds to look at the store
itself, so that a table published some other way is still seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

RECHECK = 1.0


class RouteWatch:
    def __init__(self) -> None:
        self.version = 0
        self.closed = False  # the daemon is stopping: long-polls end now, not at their timeout
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def published(self, version: int) -> None:
        with self._lock:
            if version == self.version:
                return
            self.version = version
            waiters, self._waiters = self._waiters, []
        self._wake_all(waiters)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            waiters, self._waiters = self._waiters, []
        self._wake_all(waiters)

    @staticmethod
    def _wake_all(waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]) -> None:
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_wake, future)

    async def wait(self, timeout: float) -> None:
        """Return on the next publish, or after ``timeout`` seconds (at most RECHECK)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self.closed:
                return
            self._waiters.append((loop, future))
        try:
            await asyncio.wait_for(future, min(timeout, RECHECK))
        except TimeoutError:
            pass
        finally:
            with self._lock, contextlib.suppress(ValueError):
                self._waiters.remove((loop, future))


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
