"""The daemon's HTTP API: health, status JSON, Prometheus metrics, webhook, dashboard."""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
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


def _query_token_matches(candidate: str | None, token: str) -> bool:
    """A ``?token=`` value (percent-decoded as UTF-8) against the token, in constant time on bytes."""
    if not candidate:
        return False
    return hmac.compare_digest(candidate.encode("utf-8", "surrogatepass"), token.encode("utf-8"))


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

    async def dashboard(request: Request) -> Response:
        if not authorized(request) and not _query_token_matches(request.query_params.get("token"), api_token or ""):
            return denied()
        return HTMLResponse(render_dashboard(daemon.status.to_json()))

    from modelfleet.reconciler.api.artifacts import artifact_routes
    from modelfleet.reconciler.api.confirm import confirm_routes
    from modelfleet.reconciler.api.demand import demand_routes
    from modelfleet.reconciler.api.executions import execution_routes
    from modelfleet.reconciler.api.plans import plan_routes
    from modelfleet.reconciler.api.releases import release_routes
    from modelfleet.reconciler.api.routes import route_table_routes

    return Starlette(routes=[
        *artifact_routes(daemon.artifacts, api_token),
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
        Route("/", dashboard),
    ])


_COLORS = {"success": "#1a7f37", "pending": "#9a6700", "failure": "#cf222e", "error": "#cf222e"}


def render_dashboard(status: dict[str, Any]) -> str:
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(d['model'])}</td><td>{esc(d['environment'])}</td>"
        f"<td style='color:{_COLORS.get(d['state'], '#000')}'><b>{esc(d['state'])}</b></td>"
        f"<td>{d['ready_replicas']}/{d['desired_replicas']}</td><td>{esc(', '.join(d['hosts']))}</td>"
        f"<td>{esc(d['message'])}</td></tr>"
        for d in status["deployments"])
    hosts = "".join(
        f"<tr><td>{esc(h['name'])}</td><td>{'up' if h['up'] else '<b style=color:#cf222e>down</b>'}</td>"
        f"<td>{esc(h['location']['name'])} ({esc(h['location']['country'])})</td>"
        f"<td>{esc(', '.join(h['flavors']))}</td><td>{h['replicas']}</td></tr>"
        for h in status["hosts"])
    last = status.get("lastPass") or {}
    when = time.strftime("%H:%M:%S", time.localtime(last["finishedAt"])) if last.get("finishedAt") else "-"
    errors = "".join(f"<li><code>{esc(e)}</code></li>" for e in status.get("errors") or [])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>modelfleet</title>
<meta http-equiv="refresh" content="5">
<style>body{{font-family:system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border-bottom:1px solid #ddd;padding:.3em .8em;text-align:left}}</style></head><body>
<h1>modelfleet</h1>
<p>Revision <code>{esc(str(status.get('revision') or '-'))}</code> · last applied
<code>{esc(str(status.get('lastAppliedRevision') or '-'))}</code> · last pass {esc(when)}
({esc(str(last.get('result', '-')))})</p>
{f'<h2>Errors</h2><ul>{errors}</ul>' if errors else ''}
<h2>Deployments</h2><table><tr><th>model</th><th>environment</th><th>state</th><th>ready</th><th>hosts</th>
<th>message</th></tr>{rows}</table>
<h2>Hosts</h2><table><tr><th>host</th><th>health</th><th>location</th><th>flavors</th><th>replicas</th></tr>
{hosts}</table></body></html>"""
