"""``POST /api/v1/confirm/<sha>``: confirm the deletions a commit's pass holds (deletion safety).

The sha (7 to 40 hex digits, a prefix of the commit) is remembered in the store
(FACT_CONFIRMED_DELETIONS, the 50 most recent) and a pass is triggered: the plan then takes the
removals it held (state/safety.py decides).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from modelfleet.reconciler.daemon.store import FACT_CONFIRMED_DELETIONS
from modelfleet.reconciler.errors import ModelfleetError
from modelfleet.reconciler.secrets import bearer_token_matches
from modelfleet.state.safety import valid_sha

if TYPE_CHECKING:
    from modelfleet.reconciler.daemon.reconcile import Daemon

MAX_CONFIRMED = 50


def confirm_routes(daemon: Daemon, api_token: str | None) -> list[Route]:
    async def confirm(request: Request) -> Response:
        if api_token is not None and not bearer_token_matches(request.headers.get("authorization"), api_token):
            return JSONResponse({"error": "unauthorized: send Authorization: Bearer <api token>"}, status_code=401)
        sha = str(request.path_params["sha"]).strip().lower()
        if not valid_sha(sha):
            return JSONResponse({"error": f"{sha[:60]!r} is not a commit id: give 7 to 40 hex digits "
                                          "(the sha the held status names)"}, status_code=400)
        confirmed = [s for s in daemon.store.fact(FACT_CONFIRMED_DELETIONS, []) if isinstance(s, str) and s != sha]
        confirmed = [*confirmed, sha][-MAX_CONFIRMED:]
        try:
            daemon.store.set_fact(FACT_CONFIRMED_DELETIONS, confirmed)
        except ModelfleetError as exc:
            return JSONResponse({"error": f"{exc}; nothing was confirmed"}, status_code=507)
        daemon.triggers.fire("confirm")
        revision = daemon.status.revision
        current = revision is not None and revision.startswith(sha)
        return JSONResponse({"confirmed": sha, "queued": True, "currentRevision": revision,
                             "isCurrent": current}, status_code=202)

    return [Route("/api/v1/confirm/{sha}", confirm, methods=["POST"])]
