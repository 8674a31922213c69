"""Pass triggers: poll timer, ref watcher, webhook. Passes never overlap; triggers that arrive
during a pass coalesce into exactly one more pass."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("modelfleet.triggers")


class TriggerQueue:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: str | None = None

    def fire(self, reason: str) -> None:
        with self._cond:
            if self._pending is None:
                self._pending = reason
            self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> str | None:
        """The reason of the next pass, or None on timeout."""
        with self._cond:
            if self._pending is None:
                self._cond.wait(timeout)
            reason, self._pending = self._pending, None
            return reason


def watch_refs(paths: list[Path], on_change: Callable[[], None], stop: threading.Event) -> threading.Thread:
    """Watch a local repository's refs with watchfiles: a push triggers a pass within a second."""
    from watchfiles import watch

    def relevant(_change: object, path: str) -> bool:
        return "/refs/heads" in path or path.endswith(("packed-refs", "/HEAD", "ORIG_HEAD", "FETCH_HEAD"))

    def loop() -> None:
        while not stop.is_set():
            try:
                for _changes in watch(*paths, watch_filter=relevant, stop_event=stop, debounce=50,
                                      step=20, rust_timeout=1000, yield_on_timeout=False,
                                      raise_interrupt=False):
                    on_change()
            except Exception as exc:  # a vanished path or an inotify limit must not kill the daemon
                log.warning("watching %s failed (%s); polling still runs", paths, exc)
                stop.wait(5)

    thread = threading.Thread(target=loop, name="modelfleet-watch", daemon=True)
    thread.start()
    return thread
