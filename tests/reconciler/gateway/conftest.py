"""Fixtures of the gateway tests: every server a test starts is stopped at the end, even when it fails."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from modelfleet.reconciler.gateway.routes import Activation, Backend
from tests.http_server import ServerThread
from tests.reconciler.gateway.harness import (
    PARSER,
    DemandServer,
    EchoBackend,
    GatewayUnderTest,
    RawBackend,
    start_backend,
    stop_all,
)


@pytest.fixture
def servers() -> Iterator[list[ServerThread]]:
    """Every server a test starts, stopped at the end even when the test fails."""
    started: list[ServerThread] = []
    yield started
    stop_all(started)


@pytest.fixture
def backends(servers: list[ServerThread]) -> Callable[[str], tuple[EchoBackend, ServerThread]]:
    def make(name: str) -> tuple[EchoBackend, ServerThread]:
        app, server = start_backend(name)
        servers.append(server)
        return app, server

    return make


@pytest.fixture
def demand_server(servers: list[ServerThread]) -> Callable[..., tuple[DemandServer, ServerThread]]:
    """A stand-in for the daemon's API receiving demand reports (checks the bearer token when given one)."""

    def make(token: str | None = None) -> tuple[DemandServer, ServerThread]:
        app = DemandServer(token)
        server = ServerThread.for_app(app).start()
        servers.append(server)
        return app, server

    return make


@pytest.fixture
def make_gateway(tmp_path: Path, servers: list[ServerThread]) -> Iterator[Callable[..., GatewayUnderTest]]:
    gateways: list[GatewayUnderTest] = []

    def make(routes: dict[str, tuple[Backend, ...]] | None = None, token: str | None = None,
             parser: str = PARSER, activation: dict[str, Activation] | None = None,
             **options: Any) -> GatewayUnderTest:
        gateway = GatewayUnderTest(tmp_path / f"state{len(gateways)}", token, parser, **options)
        gateways.append(gateway)
        if routes is not None:
            gateway.publish(routes, activation)
        servers.append(gateway.thread)
        gateway.thread.start()
        return gateway

    yield make
    for gateway in gateways:
        gateway.client.close()
        gateway.store.close()


@pytest.fixture
def raw_backend() -> Iterator[RawBackend]:
    backend = RawBackend()
    yield backend
    backend.stop()
