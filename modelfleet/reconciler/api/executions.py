"""Executions and logs: ``POST /api/v1/executions`` (the gateways' records, state/executions.py's
ExecutionBatch) and ``GET /api/v1/logs/<model>`` (what ``modelfleet logs`` shows).

``GET /api/v1/logs/<model>?environment=E&since=N&limit=L&tail=T&containerSince=S``:

- ``executions``: the deployment's records after sequence number ``since`` (at most ``limit``,
  default 100, the newest), each with its ``seq``; ``next``: the ``since`` of the next call;
- ``containers``: each replica of the deployment (every environment without ``environment``) with
  its last ``tail`` container log lines (default 20; 0: none), or those after Unix time
  ``containerSince``; a host that cannot be read says why instead of lines.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from modelfleet.reconciler.api.wire import read_wire
from modelfleet.reconciler.errors import ModelfleetError
from modelfleet.reconciler.secrets import bearer_token_matches
from modelfleet.state.executions import ExecutionBatch

if TYPE_CHECKING:
    from modelfleet.reconciler.daemon.reconcile import Daemon

MAX_BATCH_BYTES = 8 * 2**20
MAX_LIMIT = 5000
MAX_TAIL = 1000


def _integer(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if not low <= value <= high:
        raise ValueError(f"{name}={value} is out of range {low}..{high}")
    return value


def container_logs(daemon: Daemon, model: str, environment: str | None, tail: int,
                   since: float | None) -> list[dict[str, Any]]:
    """The log lines of the deployment's replicas (blocking: Docker calls)."""
    replicas = []
    for row in daemon.store.inventory():
        if row.model != model or (environment is not None and row.environment != environment):
            continue
        if not row.container_id or row.phase == "removing":
            continue
        entry: dict[str, Any] = {"environment": row.environment, "replica": row.replica, "host": row.host,
                                 "container": row.name, "spec_hash": row.spec_hash, "revision": row.revision}
        client = daemon.clients.get(row.host)
        if client is None:
            entry["error"] = f"host {row.host} is not in the pool any more"
        else:
            try:
                entry["lines"] = client.log_lines(row.container_id, tail=tail, since=since)
            except ModelfleetError as exc:
                entry["error"] = str(exc)
        replicas.append(entry)
    return sorted(replicas, key=lambda r: (r["environment"], r["replica"], r["container"]))


def execution_routes(daemon: Daemon, api_token: str | None) -> list[Route]:
    def denied(request: Request) -> Response | None:
        if api_token is not None and not bearer_token_matches(request.headers.get("authorization"), api_token):
            return JSONResponse({"error": "unauthorized: send Authorization: Bearer <api token>"}, status_code=401)
        return None

    async def receive(request: Request) -> Response:
        if (refusal := denied(request)) is not None:
            return refusal
        batch = await read_wire(request, ExecutionBatch, MAX_BATCH_BYTES, "an execution batch")
        if isinstance(batch, Response):
            return batch
        last = daemon.executions.add(batch)
        return JSONResponse({"accepted": len(batch.executions), "last": last}, status_code=202)

    async def logs(request: Request) -> Response:
        if (refusal := denied(request)) is not None:
            return refusal
        model = request.path_params["model"]
        environment = request.query_params.get("environment") or None
        try:
            since = _integer(request, "since", 0, 0, 1 << 62)
            limit = _integer(request, "limit", 100, 0, MAX_LIMIT)
            tail = _integer(request, "tail", 20, 0, MAX_TAIL)
            container_since = request.query_params.get("containerSince")
            after = float(container_since) if container_since else None
        except ValueError as exc:
            return JSONResponse({"error": f"{exc}"}, status_code=400)
        known = {(m, e) for m, e in daemon.status.deployments}
        if not any(m == model and (environment is None or e == environment) for m, e in known):
            where = f' in environment "{environment}"' if environment else ""
            return JSONResponse({"error": f'no deployment of model "{model}"{where}; `modelfleet status` lists them'},
                                status_code=404)
        entries = daemon.executions.read(model, environment, since, limit)
        containers = [] if tail == 0 and after is None else await run_in_threadpool(
            container_logs, daemon, model, environment, tail, after)
        return JSONResponse({
            "model": model, "environment": environment,
            "executions": [{"seq": seq, **execution.model_dump()} for seq, execution in entries],
            "next": entries[-1][0] if entries else max(since, 0),
            "containers": containers,
        })

    return [Route("/api/v1/executions", receive, methods=["POST"]),
            Route("/api/v1/logs/{model}", logs)]
