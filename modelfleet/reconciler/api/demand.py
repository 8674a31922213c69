"""``POST /api/v1/demand``: the gateways' load reports (state/demand.py's DemandReport).

A report with requests held for activation wakes the daemon at once (an activation pass); the
rest feeds the autoscaler, which the daemon checks between passes. The reply (``DemandReply``)
carries the tokens each deployment with token limits used in its current windows, summed over
every gateway, which the gateway enforces the limits with.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from modelfleet.reconciler.api.wire import read_wire
from modelfleet.reconciler.secrets import bearer_token_matches
from modelfleet.state.demand import DemandReply, DemandReport

if TYPE_CHECKING:
    from modelfleet.reconciler.daemon.reconcile import Daemon

MAX_REPORT_BYTES = 4 * 2**20


def demand_routes(daemon: Daemon, api_token: str | None) -> list[Route]:
    async def demand(request: Request) -> Response:
        if api_token is not None and not bearer_token_matches(request.headers.get("authorization"), api_token):
            return JSONResponse({"error": "unauthorized: send Authorization: Bearer <api token>"}, status_code=401)
        report = await read_wire(request, DemandReport, MAX_REPORT_BYTES, "a demand report")
        if isinstance(report, Response):
            return report
        activating = daemon.on_demand(report)
        reply = DemandReply(activating=sorted(activating), tokens=daemon.token_usage())
        return Response(reply.model_dump_json(), status_code=202, media_type="application/json")

    return [Route("/api/v1/demand", demand, methods=["POST"])]
