"""The one way the gateway's protocols wake a coroutine waiting on a future (data, drain, shutdown)."""

from __future__ import annotations

import asyncio


def wake(waiter: asyncio.Future[None] | None) -> None:
    """Resolve ``waiter`` unless there is none or it is done already (cancelled with its waiter)."""
    if waiter is not None and not waiter.done():
        waiter.set_result(None)
