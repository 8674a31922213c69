"""The key of a deployment's endpoint in the route table that the daemon publishes and gateways
follow, and which of its replicas a gateway prefers (the nearest)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

T = TypeVar("T")


def route_key(model: str, environment: str) -> str:
    return f"{model}/{environment}"


def prefer_nearby(items: Sequence[T], location: str, continent: str | None,
                  where: Callable[[T], tuple[str, str]]) -> tuple[T, ...]:
    """The items a gateway in ``location`` (on ``continent``) prefers: those in its location if
    any, else those on its continent if any, else all. ``where(item)`` is (location, continent)."""
    local = tuple(item for item in items if where(item)[0] == location)
    if local:
        return local
    if continent:
        same_continent = tuple(item for item in items if where(item)[1] == continent)
        if same_continent:
            return same_continent
    return tuple(items)


def gateways_behind(version: int, acknowledged: Mapping[str, int]) -> list[str]:
    """The gateways (id -> the route table version each serves) that do not serve ``version`` yet."""
    return sorted(gateway for gateway, served in acknowledged.items() if served < version)
