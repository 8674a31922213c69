"""The plan page of a review branch head: ``GET /plans/<sha>`` (HTML, also with ``?token=`` like the
dashboard) and ``GET /api/v1/plans/<sha>`` (JSON), behind the API token; ``GET /api/v1/plans``
lists the review plans kept (the last 50, in memory). What is shown is daemon/review.py's document
(state/review.py shapes it); the page only renders it, with Jinja2 (autoescape on, no CDN)."""

from __future__ import annotations

import hmac
import re
import time
from typing import TYPE_CHECKING, Any

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from modelfleet.reconciler.secrets import bearer_token_matches

if TYPE_CHECKING:
    from modelfleet.reconciler.daemon.reconcile import Daemon

_SHA = re.compile(r"[0-9a-fA-F]{7,64}")
_templates: Environment | None = None


def templates() -> Environment:
    global _templates
    if _templates is None:
        _templates = Environment(loader=PackageLoader("modelfleet.reconciler.api", "templates"),
                                 autoescape=select_autoescape(default=True, default_for_string=True),
                                 trim_blocks=True, lstrip_blocks=True)
        _templates.filters["when"] = lambda t: time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if t else "-"
        _templates.filters["short"] = lambda s: str(s)[:12] if s else "-"
        _templates.filters["show"] = _show
        # The dashboard's (api/dashboard.py).
        _templates.filters["clock"] = lambda t: time.strftime("%H:%M:%S", time.gmtime(t)) if t else "-"
        _templates.filters["seconds"] = _seconds
        _templates.filters["bytes"] = _bytes
        _templates.filters["cpus"] = lambda v: f"{v:g}" if isinstance(v, (int, float)) else "-"
    return _templates


def _seconds(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    if value < 10:
        return f"{value:.2f} s"
    if value < 120:
        return f"{value:.1f} s"
    return f"{int(value) // 60} min {int(value) % 60} s"


def _bytes(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{int(value)} B"


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "(none)"
    return str(value)


def render_plan_page(document: dict[str, Any] | None, revision: str) -> str:
    """The HTML of a review plan (``document`` None: not planned, or no longer kept)."""
    plan = (document or {}).get("plan") or {}
    deployments = {(d["model"], d["environment"]): d for d in plan.get("deployments", [])}
    return templates().get_template("plan.html").render(doc=document, revision=revision, plan=plan,
                                                        deployments=deployments)


def plan_routes(daemon: Daemon, api_token: str | None) -> list[Route]:
    def authorized(request: Request, query_token: bool = False) -> bool:
        if api_token is None:
            return True
        if bearer_token_matches(request.headers.get("authorization"), api_token):
            return True
        candidate = request.query_params.get("token") if query_token else None
        return bool(candidate) and hmac.compare_digest(str(candidate).encode("utf-8", "surrogatepass"),
                                                       api_token.encode("utf-8"))

    def denied() -> JSONResponse:
        return JSONResponse({"error": "unauthorized: send Authorization: Bearer <api token>"}, status_code=401)

    def bad(sha: str) -> JSONResponse:
        return JSONResponse({"error": f"not a commit sha: {sha[:80]!r} (7 to 64 hex digits)"}, status_code=400)

    async def plan_json(request: Request) -> Response:
        if not authorized(request):
            return denied()
        sha = request.path_params["sha"]
        if not _SHA.fullmatch(sha):
            return bad(sha)
        document = daemon.reviews.get(sha)
        if document is None:
            return JSONResponse({"error": f"no review plan for {sha}: not the head of a review branch "
                                          f"({', '.join(daemon.config.review.branches) or 'review.branches is empty'}),"
                                          " not planned yet, or no longer kept"}, status_code=404)
        return JSONResponse(document)

    async def plan_list(request: Request) -> Response:
        if not authorized(request):
            return denied()
        return JSONResponse({"branches": list(daemon.config.review.branches), "plans": daemon.reviews.summaries()})

    async def plan_page(request: Request) -> Response:
        if not authorized(request, query_token=True):
            return denied()
        sha = request.path_params["sha"]
        if not _SHA.fullmatch(sha):
            return bad(sha)
        document = daemon.reviews.get(sha)
        return HTMLResponse(render_plan_page(document, sha), status_code=200 if document is not None else 404)

    return [Route("/api/v1/plans", plan_list), Route("/api/v1/plans/{sha}", plan_json),
            Route("/plans/{sha}", plan_page)]
