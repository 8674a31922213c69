"""Holding requests for serverless deployments while they have no ready replica (activation).

A request for a deployment that has activation settings in the route table but no ready backend
is held (after Knative's activator) instead of being answered 503: the gateway tells the daemon at
once (the demand reporter's kick), the daemon starts a replica and publishes it, and the held
requests go to it the moment the route table that lists it is installed. Bounds: at most
``Activation.queue`` requests held per deployment (more get 503 ``ActivationQueueFull``) and
``Activation.timeout`` seconds each (then 503 ``ActivationTimeout``). A deployment removed from the
table while requests are held answers them 404; a gateway shutting down answers them 503.

The proxy drives it (``admit``, ``wait``, ``leave``); the app calls :meth:`Activator.installed` with
every new route table and :meth:`Activator.close` when it shuts down. Everything runs on the event
loop: one ``asyncio.Event`` per deployment with held requests, replaced each time it is set.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable

from prometheus_client import Gauge

from modelfleet.reconciler.gateway.follower import TableFeed
from modelfleet.reconciler.gateway.metrics import GatewayMetrics
from modelfleet.reconciler.gateway.routes import Activation, Backend, RouteTable


class Outcome(enum.Enum):
    READY = "ready"  # backends were published: forward the request
    TIMEOUT = "timeout"  # none within Activation.timeout
    GONE = "gone"  # the deployment was removed from the route table
    NOT_SERVERLESS = "not-serverless"  # still no backend, and its activation settings were removed
    SHUTDOWN = "shutdown"  # the gateway is shutting down


class Waiting:
    """The requests held for one deployment: their count and the event that wakes them."""

    __slots__ = ("count", "event", "gauge")

    def __init__(self, gauge: Gauge) -> None:
        self.count = 0
        self.event = asyncio.Event()
        self.gauge = gauge

    def wake(self) -> None:
        """Wake every request waiting now; later waits use a new event."""
        event = self.event
        self.event = asyncio.Event()
        event.set()


class Activator:
    """Requests held per route key. ``on_activate(key)``: a deployment starts holding requests (or
    turns one away while holding none, when its queue is 0)."""

    def __init__(self, routes: TableFeed, metrics: GatewayMetrics,
                 on_activate: Callable[[str], None] | None = None) -> None:
        self.routes = routes
        self.metrics = metrics
        self.on_activate = on_activate
        self.closing = False
        self._waiting: dict[str, Waiting] = {}

    def held(self, key: str) -> int:
        """Requests held now for ``key``."""
        waiting = self._waiting.get(key)
        return waiting.count if waiting is not None else 0

    def counts(self) -> dict[str, int]:
        """Route key -> requests held now, for the deployments holding any."""
        return {key: waiting.count for key, waiting in self._waiting.items() if waiting.count}

    def admit(self, key: str, activation: Activation, model: str, environment: str) -> Waiting | None:
        """Take a place in ``key``'s queue; None when it is full (or the gateway is shutting down)."""
        waiting = self._waiting.get(key)
        if waiting is None:
            if self.closing:
                return None
            if activation.queue <= 0:
                self._activate(key)  # nothing may wait, but the daemon must still hear of the demand
                return None
            waiting = self._waiting[key] = Waiting(self.metrics.held(model, environment))
        elif waiting.count >= activation.queue or self.closing:
            return None
        waiting.count += 1
        waiting.gauge.inc()
        self.metrics.activation(model, environment)
        if waiting.count == 1:
            self._activate(key)
        return waiting

    async def wait(self, waiting: Waiting, key: str, deadline: float) -> tuple[Outcome, tuple[Backend, ...]]:
        """Wait until ``key`` has backends, is removed, or the loop time ``deadline`` passes.

        Cancelled (the client went away): the caller's ``leave`` frees the place.
        """
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    table = self.routes.table
                    backends = table.routes.get(key)
                    if backends is None:
                        return Outcome.GONE, ()
                    if backends:
                        return Outcome.READY, backends
                    if self.closing:
                        return Outcome.SHUTDOWN, ()
                    if key not in table.activation:
                        return Outcome.NOT_SERVERLESS, ()
                    await waiting.event.wait()
        except TimeoutError:
            return Outcome.TIMEOUT, ()

    def leave(self, waiting: Waiting, key: str) -> None:
        waiting.count -= 1
        waiting.gauge.dec()
        if waiting.count <= 0 and self._waiting.get(key) is waiting:
            del self._waiting[key]

    def installed(self, table: RouteTable) -> None:
        """A new route table: every held request looks at it (most go back to waiting)."""
        for waiting in self._waiting.values():
            waiting.wake()

    def close(self) -> None:
        """The gateway is shutting down: held requests are answered 503, new ones are not held."""
        self.closing = True
        for waiting in self._waiting.values():
            waiting.wake()

    def _activate(self, key: str) -> None:
        if self.on_activate is not None:
            self.on_activate(key)
