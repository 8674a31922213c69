"""The daemon's HTTP API: health, status JSON, Prometheus metrics, webhook, dashboard."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from modelfleet.reconciler.secrets import bearer_token_matches
from modelfleet.state.pulls import webhook_route

if TYPE_CHECKING:
    from modelfleet.reconciler.daemon.reconcile import Daemon

log = logging.getLogger("modelfleet.api")
MAX_WEBHOOK_BYTES = 5 * 2**20


def verify_webhook(headers: Mapping[str, str], body: bytes, secret: str) -> bool:
    """GitHub/Gitea sign the body with HMAC-SHA256; GitLab sends the shared token as is.

    Compared in constant time on bytes: a signature that is malformed or not ASCII is simply
    wrong (a 401), never an error.
    """
    key = secret.encode()
    expected = hmac.new(key, body, hashlib.sha256).hexdigest().encode("ascii")
    github = headers.get("x-hub-signature-256", "")
    if github.startswith("sha256="):
        return hmac.compare_digest(_wire_bytes(github[len("sha256="):]), expected)
    for header in ("x-gitea-signature", "x-gogs-signature", "x-forgejo-signature"):
        if header in headers:
            return hmac.compare_digest(_wire_bytes(headers[header]), expected)
    if "x-gitlab-token" in headers:
        return hmac.compare_digest(_wire_bytes(headers["x-gitlab-token"]), key)
    return False


def _wire_bytes(header_value: str) -> bytes:
    """The bytes a header value was received as (ASGI servers decode them as latin-1)."""
    try:
        return header_value.encode("latin-1")
    except UnicodeEncodeError:  # not from the wire: beyond latin-1, so compare its UTF-8 bytes
        return header_value.encode("utf-8", "surrogatepass")


def pushed_branch(payload: Any) -> str | None:
    ref = payload.get("ref") if isinstance(payload, dict) else None
    return ref.removeprefix("refs/heads/") if isinstance(ref, str) else None


def make_api(daemon: Daemon, api_token: str | None, webhook_secret: str | None,
             trigger: Callable[[str], None]) -> Starlette:
    def authorized(request: Request) -> bool:
        if api_token is None:
            return True
        return bearer_token_matches(request.headers.get("authorization"), api_token)

    def denied() -> JSONResponse:
        return JSONResponse({"error": "unauthorized: send Authorization: Bearer <api token>"}, status_code=401)

    async def healthz(_: Request) -> Response:
        return PlainTextResponse("ok")

    async def readyz(_: Request) -> Response:
        if daemon.status.observed_once:
            return PlainTextResponse("ready")
        return PlainTextResponse("not ready: the pool has not been observed yet", status_code=503)

    async def status(request: Request) -> Response:
        if not authorized(request):
            return denied()
        return JSONResponse(daemon.status.to_json())

    async def hosts(request: Request) -> Response:
        if not authorized(request):
            return denied()
        return JSONResponse({"hosts": daemon.status.to_json()["hosts"]})

    async def history(request: Request) -> Response:
        if not authorized(request):
            return denied()
        return JSONResponse({"passes": daemon.store.recent_passes(), "actions": daemon.store.recent_actions()})

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(daemon.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def sync(request: Request) -> Response:
        if not authorized(request):
            return denied()
        trigger("api")
        return JSONResponse({"queued": True}, status_code=202)

    async def webhook(request: Request) -> Response:
        if webhook_secret is None:
            return JSONResponse({"error": "webhook disabled: set repo.webhookSecretFile"}, status_code=404)
        body = await request.body()
        if len(body) > MAX_WEBHOOK_BYTES:
            return JSONResponse({"error": "payload too large"}, status_code=413)
        if not verify_webhook(dict(request.headers), body, webhook_secret):
            log.warning("webhook with a bad or missing signature refused")
            return JSONResponse({"error": "bad signature"}, status_code=401)
        try:
            payload = json.loads(body or b"{}")
        except ValueError:
            return JSONResponse({"error": "body is not JSON"}, status_code=400)
        route = webhook_route(request.headers, payload, daemon.config.repo.branch)
        if route.kind == "ignore":
            return JSONResponse({"ignored": route.reason})
        if route.kind == "review":
            # A pull request opened or pushed to: its plan, never a pass (nothing of it is applied).
            if daemon.reviews.pulls is None:
                return JSONResponse({"ignored": "pull request event: pull requests are planned only with a forge "
                                                "status.provider (and review.pullRequests)"})
            daemon.reviews.wake("webhook")
            return JSONResponse({"queued": "review"}, status_code=202)
        trigger("webhook")
        return JSONResponse({"queued": True}, status_code=202)

    from modelfleet.reconciler.api.artifacts import artifact_routes
    from modelfleet.reconciler.api.confirm import confirm_routes
    from modelfleet.reconciler.api.dashboard import dashboard_routes
    from modelfleet.reconciler.api.demand import demand_routes
    from modelfleet.reconciler.api.executions import execution_routes
    from modelfleet.reconciler.api.plans import plan_routes
    from modelfleet.reconciler.api.releases import release_routes
    from modelfleet.reconciler.api.routes import route_table_routes
    from modelfleet.reconciler.artifacts.uploads import UploadManager

    uploads = UploadManager(daemon.artifacts)  # one for the upload routes and the dashboard's read-only view
    return Starlette(routes=[
        *artifact_routes(daemon.artifacts, api_token, uploads=uploads),
        *dashboard_routes(daemon, api_token, uploads),
        *demand_routes(daemon, api_token),
        *execution_routes(daemon, api_token),
        *plan_routes(daemon, api_token),
        *confirm_routes(daemon, api_token),
        *release_routes(daemon, api_token),
        *route_table_routes(daemon, api_token),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/api/v1/status", status),
        Route("/api/v1/hosts", hosts),
        Route("/api/v1/history", history),
        Route("/api/v1/sync", sync, methods=["POST"]),
        Route("/metrics", metrics),
        Route("/webhook", webhook, methods=["POST"]),
    ])

