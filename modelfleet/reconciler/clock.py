"""A wall clock that does not jump: the daemon's ``now`` for facts it keeps across restarts.

Since when a host (or the Git remote) is unreachable is stored as wall-clock time, so that a
restart does not reset ``docker.downAfter``. Read from ``time.time`` directly, a step of the system
clock (NTP setting it, ``date -s``, a VM restored from a snapshot) would move every such duration
by the step: an hour forward and a host unreachable for five seconds would be "down" at once,
its replicas rescheduled. ``SteadyWallClock`` reads ``time.time`` once and then advances with
``time.monotonic`` (which NTP slews but never steps): durations within a process are true elapsed
time, and the readings stay within the steps taken since the daemon started of the system clock.
A since-time that is in the future after a restart (the clock was set back) is handled by the plan
(state/planning.py: it counts from now).
"""

from __future__ import annotations

import time
from collections.abc import Callable


class SteadyWallClock:
    """Seconds since the epoch, anchored to the system clock once and advancing monotonically."""

    def __init__(self, wall: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._anchor_wall = wall()
        self._anchor_monotonic = monotonic()

    def __call__(self) -> float:
        return self._anchor_wall + (self._monotonic() - self._anchor_monotonic)
