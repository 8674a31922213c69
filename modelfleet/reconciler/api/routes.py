"""``GET /api/v1/routes``: the route table, for gateways on other machines (``gateway.follow: controlPlane``).

The answer is :meth:`RouteTable.to_payload`: the ready backends, activation and overflow settings,
each deployment's gateway secret and the continent of each location, with ``ETag: "<version>"``.
With ``If-None-Match: "<version>"`` and ``?wait=S`` (at most 60) it is a long-poll: the answer
comes as soon as a table with another version is published (within milliseconds), else ``304``
after S seconds. It needs the API token; without one configured, only callers on this machine
(loopback) get it: the table carries the secrets that let a request past the runtimes' guard.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from dataclasses import replace
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from modelfleet.reconciler.gateway.follower import RouteFollower
from modelfleet.reconciler.secrets import bearer_token_matches

if TYPE_CHECKING:
    from modelfleet.reconciler.daemon.reconcile import Daemon

MAX_WAIT = 60.0


def _loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _ServedTable:
    """The latest table with its secrets and locations, serialized once per version."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.follower: RouteFollower | None = None  # the API loop's own reader of routes.db, made when first asked
        self.version: int | None = None
        self.body = b""
        # Location name -> continent of the pool's hosts: where a remote gateway's own location is
        # (read with the first table: an API without a daemon config never serves one).
        self.locations: dict[str, str] = {}

    def latest(self) -> tuple[int, bytes] | None:
        """(version, JSON body) of the latest table; None before the first publish."""
        if self.follower is None:
            self.follower = RouteFollower(self.daemon.state_dir)
            self.locations = {h.location.name: h.location.continent for h in self.daemon.config.pool.hosts}
        table = self.follower.poll()
        if table is not None:
            secrets = {}
            for key in table.routes:
                model, _, environment = key.partition("/")
                secret = self.daemon.gateway_secrets.for_deployment(model, environment)
                if secret is not None:
                    secrets[key] = secret
            full = replace(table, secrets=secrets, locations=self.locations)
            self.version = table.version
            self.body = json.dumps(full.to_payload(), separators=(",", ":")).encode()
        return None if self.version is None else (self.version, self.body)


def route_table_routes(daemon: Daemon, api_token: str | None) -> list[Route]:
    served = _ServedTable(daemon)

    async def routes(request: Request) -> Response:
        if api_token is not None:
            if not bearer_token_matches(request.headers.get("authorization"), api_token):
                return JSONResponse({"error": "unauthorized: send Authorization: Bearer <api token>"}, status_code=401)
        elif not _loopback(request):
            return JSONResponse({"error": "the route table carries the deployments' gateway secrets: set api.tokenFile "
                                          "to serve it to gateways on other machines"}, status_code=403)
        try:
            wait = min(float(request.query_params.get("wait") or 0), MAX_WAIT)
        except ValueError:
            return JSONResponse({"error": "wait must be a number of seconds"}, status_code=400)
        known = request.headers.get("if-none-match", "").strip()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(wait, 0.0)
        while True:
            answer = served.latest()
            if answer is not None and f'"{answer[0]}"' != known:
                return Response(answer[1], media_type="application/json", headers={"etag": f'"{answer[0]}"'})
            left = deadline - loop.time()
            if daemon.route_watch.closed:
                return JSONResponse({"error": "the daemon is stopping"}, status_code=503, headers={"retry-after": "1"})
            if left <= 0:
                if answer is None:
                    return JSONResponse({"error": "no route table published yet"}, status_code=503,
                                        headers={"retry-after": "1"})
                return Response(status_code=304, headers={"etag": f'"{answer[0]}"'})
            await daemon.route_watch.wait(left)

    return [Route("/api/v1/routes", routes)]
