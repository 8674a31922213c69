"""The gateway process: read its settings, bind ``gateway.listen`` and serve until SIGINT/SIGTERM.

A separate process from the control loop (docs/architecture.md, "Public contract"): it follows the
route table that the daemon publishes in ``<stateDir>/routes.db`` and keeps serving the last table
it read when the daemon is away or the file is missing or unreadable. It reports its demand to the
daemon's API (``gateway.controlPlane``, default the local ``api.listen``; token ``gateway.controlPlaneTokenFile``,
default ``api.tokenFile``), which is what activates and scales serverless deployments.

Public API: :func:`create_gateway` (the ASGI app for a config), :func:`build_server` (the
gateway's own HTTP server for it, gateway/frontend.py) and :func:`run_gateway` (serve until
SIGINT/SIGTERM), which raises :class:`GatewayError` when the gateway cannot start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket

from modelfleet.reconciler.config import Config, local_url, parse_listen
from modelfleet.reconciler.gateway.app import DEFAULT_POLL_INTERVAL, Gateway
from modelfleet.reconciler.gateway.frontend import HttpServer
from modelfleet.reconciler.gateway.pool import DEFAULT_READ_TIMEOUT
from modelfleet.reconciler.gateway.workers import WorkerSupervisor, worker_index
from modelfleet.reconciler.secrets import read_secret, redact_url

log = logging.getLogger("modelfleet.gateway")


class GatewayError(Exception):
    """The gateway cannot start (bad listen address, unreadable token file, port in use)."""


def read_token(token_file: str | None) -> str | None:
    """The token in ``gateway.tokenFile``, None when unset; an unreadable or empty file is a GatewayError."""
    if not token_file:
        return None
    try:
        token = read_secret(token_file)
    except OSError as exc:
        raise GatewayError(f"gateway.tokenFile: cannot read {token_file}: {exc.strerror}") from None
    if token is None:
        raise GatewayError(f"gateway.tokenFile: {token_file} is empty")
    return token


def read_control_plane_token(config: Config) -> str | None:
    """The token for the control plane: gateway.controlPlaneTokenFile, else api.tokenFile; None when neither is set."""
    explicit = config.gateway.control_plane_token_file
    path = explicit or config.api.token_file
    if not path:
        return None
    key = "gateway.controlPlaneTokenFile" if explicit else "gateway.controlPlaneTokenFile (default: api.tokenFile)"
    try:
        token = read_secret(path)
    except OSError as exc:
        raise GatewayError(f"{key}: cannot read {path}: {exc.strerror}; the gateway needs the daemon's API token "
                           "to report demand") from None
    if token is None:
        raise GatewayError(f"{key}: {path} is empty")
    return token


def bind_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A socket bound to ``host:port``; ``reuse_port``: shared with the other workers (SO_REUSEPORT)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise GatewayError(f"gateway.listen: cannot resolve {host}:{port}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # Inherited by accepted connections: no Nagle delay between a response's header and body writes.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if family == socket.AF_INET6:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise GatewayError(f"gateway.listen: cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def create_gateway(config: Config, *, read_timeout: float | None = None,
                   poll_interval: float = DEFAULT_POLL_INTERVAL) -> Gateway:
    """The ASGI app for ``config``: routes from ``<stateDir>/routes.db``, token from gateway.tokenFile.

    ``read_timeout`` defaults to ``config.gateway.read_timeout`` when the config has such a field,
    else 300 s.
    """
    if read_timeout is None:
        read_timeout = float(getattr(config.gateway, "read_timeout", None) or DEFAULT_READ_TIMEOUT)
    settings = config.gateway
    gateway_id = settings.id
    worker = worker_index()
    if worker is not None and gateway_id:  # one id per worker: the daemon sums gateways
        gateway_id = f"{gateway_id}-w{worker}"
    # The continent of gateway.location, from the pool (a table followed over HTTP says it too).
    continent = next((h.location.continent for h in config.pool.hosts if h.location.name == settings.location), None)
    return Gateway(config.state_dir, token=read_token(settings.token_file), read_timeout=read_timeout,
                   poll_interval=poll_interval, control_plane=settings.control_plane or local_url(config.api.listen),
                   control_plane_token=read_control_plane_token(config), gateway_id=gateway_id,
                   location=settings.location, follow=settings.follow, cache_dir=settings.cache_dir,
                   continent=continent)


def build_server(app: Gateway, *, graceful_shutdown: float = 30.0, loop: str = "auto") -> HttpServer:
    """The gateway's HTTP server for ``app`` (on uvloop when installed, ``loop``: auto, uvloop, asyncio).

    At SIGINT/SIGTERM it stops accepting connections, answers held requests (503), lets requests in
    flight finish for up to ``graceful_shutdown`` seconds, then stops the gateway.
    """
    return HttpServer(app, graceful_shutdown=graceful_shutdown, loop_impl=loop)


def gateway_workers(config: Config) -> int:
    """How many worker processes ``gateway.workers`` asks for (default: the number of cores)."""
    return config.gateway.workers or os.cpu_count() or 1


def run_gateway_workers(config: Config, config_path: str, workers: int, verbose: bool = False) -> int:
    """Serve with ``workers`` processes on ``gateway.listen`` (gateway/workers.py); the exit code.

    The port is tried first without SO_REUSEPORT: one in use (by anything, another gateway's workers
    included) is an error now, not a second group of workers sharing it."""
    try:
        host, port = parse_listen(config.gateway.listen)
    except ValueError as exc:
        raise GatewayError(f"gateway.listen: {exc}") from None
    bind_socket(host, port).close()
    read_token(config.gateway.token_file)  # a bad token file is one clear error, not one per worker
    return WorkerSupervisor(config_path, config.state_dir, workers, verbose).run()


def run_gateway(config: Config, *, read_timeout: float | None = None) -> None:
    """Serve the gateway on ``config.gateway.listen`` until SIGINT/SIGTERM (then drain, ≤ 30 s).

    Raises :class:`GatewayError` when it cannot start (the CLI maps it to exit code 3).
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        host, port = parse_listen(config.gateway.listen)
    except ValueError as exc:  # the config validates it; a Config built by hand may not
        raise GatewayError(f"gateway.listen: {exc}") from None
    app = create_gateway(config, read_timeout=read_timeout)
    sock = bind_socket(host, port, reuse_port=worker_index() is not None)
    log.info("gateway listening on %s:%d, following %s%s", host, port, app.routes.source,
             " (bearer token required)" if config.gateway.token_file else "")
    if app.reporter is not None:
        log.info("gateway %s reports demand to %s", app.reporter.gateway_id, redact_url(app.reporter.url))
    server = build_server(app)
    try:
        server.run(sockets=[sock])
    except Exception:
        if server.started:
            raise
        log.exception("the gateway failed to start")
    finally:
        sock.close()
    if not server.started:
        raise GatewayError("the gateway failed to start (see the log above)")


__all__ = ["GatewayError", "bind_socket", "build_server", "create_gateway", "gateway_workers",
           "read_control_plane_token", "read_token", "run_gateway", "run_gateway_workers"]
