"""Test servers: an ASGI app (or a ready uvicorn server) served in a daemon thread on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Protocol

import uvicorn


class Server(Protocol):
    """What a server thread runs: uvicorn's server, or the gateway's (gateway/frontend.py)."""

    started: bool
    should_exit: bool

    def run(self, sockets: list[socket.socket]) -> None: ...


def bound_socket() -> socket.socket:
    """A TCP socket bound to a free loopback port, not listening yet (connections are refused)."""
    # proto=IPPROTO_TCP, as getaddrinfo gives: asyncio only sets TCP_NODELAY on such sockets.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class ServerThread:
    """A server in a daemon thread on a pre-bound loopback socket (no race for the port).

    ``ServerThread(server)`` serves a configured ``uvicorn.Server`` (or the gateway's server);
    :meth:`for_app` configures an uvicorn one for a plain ASGI app. :meth:`start` returns once the
    server accepts connections.
    """

    def __init__(self, server: Server) -> None:
        self.server = server
        self.sock = bound_socket()
        self.port: int = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @classmethod
    def for_app(cls, app: Any, **config: Any) -> ServerThread:
        """``config``: more uvicorn.Config options (defaults: no lifespan, quiet, no access log)."""
        options: dict[str, Any] = {"lifespan": "off", "log_level": "warning", "access_log": False, **config}
        return cls(uvicorn.Server(uvicorn.Config(app, **options)))

    def start(self, timeout: float = 5.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.005)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()
