"""Which replicas a gateway prefers: its own location, then its continent, then any."""

from __future__ import annotations

import pytest

from modelfleet.state.routes import prefer_nearby

REPLICAS = [("r1", "paris-1", "EU"), ("r2", "berlin-1", "EU"), ("r3", "ohio-1", "NA"), ("r4", "paris-1", "EU")]


@pytest.mark.parametrize(("location", "continent", "chosen"), [
    ("paris-1", "EU", ["r1", "r4"]),  # its own location
    ("frankfurt-1", "EU", ["r1", "r2", "r4"]),  # none there: its continent
    ("tokyo-1", "AS", ["r1", "r2", "r3", "r4"]),  # none on its continent: any
    ("tokyo-1", None, ["r1", "r2", "r3", "r4"]),  # continent unknown: any
    ("ohio-1", "NA", ["r3"]),
])
def test_the_nearest_tier_that_has_replicas(location: str, continent: str | None, chosen: list[str]) -> None:
    picked = prefer_nearby(REPLICAS, location, continent, lambda r: (r[1], r[2]))
    assert [r[0] for r in picked] == chosen


def test_no_replicas_is_no_replicas() -> None:
    assert prefer_nearby([], "paris-1", "EU", lambda r: ("", "")) == ()
