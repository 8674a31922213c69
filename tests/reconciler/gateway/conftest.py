"""Fixtures of the gateway tests: every server a test starts is stopped at the end, even when it fails."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from modelfleet.reconciler.gateway.routes import Backend
from tests.http_server import ServerThread
from tests.reconciler.gateway.harness import (
    PARSER,
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
def make_gateway(tmp_path: Path, servers: list[ServerThread]) -> Iterator[Callable[..., GatewayUnderTest]]:
    gateways: list[GatewayUnderTest] = []

    def make(routes: dict[str, tuple[Backend, ...]] | None = None, token: str | None = None,
             parser: str = PARSER) -> GatewayUnderTest:
        gateway = GatewayUnderTest(tmp_path / f"state{len(gateways)}", token, parser)
        gateways.append(gateway)
        if routes is not None:
            gateway.publish(routes)
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
