"""SteadyWallClock: wall-clock readings that system clock steps do not move."""

from __future__ import annotations

from modelfleet.reconciler.clock import SteadyWallClock


def test_steps_of_the_system_clock_do_not_move_it() -> None:
    wall, mono = [1_700_000_000.0], [50.0]
    clock = SteadyWallClock(wall=lambda: wall[0], monotonic=lambda: mono[0])
    assert clock() == 1_700_000_000.0
    mono[0] += 5
    wall[0] += 3600 + 5  # NTP stepped the clock an hour forward meanwhile
    assert clock() == 1_700_000_005.0
    wall[0] -= 7200  # then two hours back
    mono[0] += 1
    assert clock() == 1_700_000_006.0

