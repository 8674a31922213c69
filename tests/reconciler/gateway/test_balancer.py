"""The balancer: least outstanding requests first, ties round-robin, through the gateway and as a unit."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from modelfleet.reconciler.gateway.balancer import Balancer
from modelfleet.reconciler.gateway.routes import Backend
from tests.reconciler.gateway.harness import route, who

pytestmark = pytest.mark.timeout(30)


def test_spreads_load_least_outstanding_first(backends: Any, make_gateway: Any) -> None:
    backend_a, a = backends("a")
    _, b = backends("b")
    gw = make_gateway({"m/production": (route(a, "ca"), route(b, "cb"))})
    seen = [who(gw.client.get("/models/m/x")) for _ in range(20)]
    assert seen.count("a") == 10 and seen.count("b") == 10  # idle backends: round-robin

    # One slow request outstanding on a backend: the next ones all go to the other.
    slow = threading.Thread(target=lambda: gw.client.get("/models/m/slow?ms=300"))
    slow.start()
    try:
        deadline = time.monotonic() + 2
        while sum(gw.app.balancer.outstanding.values()) == 0 and time.monotonic() < deadline:
            time.sleep(0.002)
        busy = next(iter(gw.app.balancer.outstanding))
        idle = "b" if busy == a.url else "a"
        assert {who(gw.client.get("/models/m/x")) for _ in range(5)} == {idle}
    finally:
        slow.join(5)
    assert backend_a.requests > 0


def test_balancer_round_robin_and_least_outstanding() -> None:
    balancer = Balancer()
    pool = tuple(Backend(f"http://b{i}", f"c{i}", "h") for i in range(3))
    assert [balancer.pick("k", pool).url for _ in range(6)] == [b.url for b in pool * 2]
    balancer.acquire("http://b0")
    balancer.acquire("http://b1")
    assert {balancer.pick("k", pool).url for _ in range(4)} == {"http://b2"}
    assert balancer.pick("k", pool, avoid="http://b2").url in {"http://b0", "http://b1"}
    assert balancer.pick("k", pool[:1], avoid="http://b0").url == "http://b0"
    balancer.release("http://b0")
    balancer.release("http://b1")
    assert balancer.outstanding == {}

