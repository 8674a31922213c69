"""The operator's dashboard: ``GET /`` (HTML, rendered on the server with the Jinja2 templates of
api/templates/, autoescape on) and ``GET /api/v1/dashboard/events`` (server-sent events: the
page's sections, rendered again and sent when they changed, with a keep-alive comment). Both
behind the API token, as a bearer header or ``?token=`` (an EventSource cannot send headers).

What it shows is read, never decided: the status JSON (daemon.status.to_json()), the pass and
action history of the store, the review plans the ReviewPlanner keeps, the artifact transfers
(shipping progress in the status, upload sessions on disk) and the load the gateways report.
``shape`` turns those into the template's view; it is a plain function of plain data.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from modelfleet.reconciler.api.plans import templates
from modelfleet.reconciler.artifacts.uploads import UploadManager
from modelfleet.reconciler.secrets import bearer_token_matches

if TYPE_CHECKING:
    from modelfleet.reconciler.daemon.reconcile import Daemon

EVENTS_PATH = "/api/v1/dashboard/events"
# The page's sections, each a template under templates/dashboard/ and an element id="s-<name>".
SECTIONS = ("summary", "deployments", "hosts", "traffic", "passes", "reviews", "transfers")
POLL_SECONDS = 1.0  # how often an open event stream looks for changes
KEEPALIVE_SECONDS = 15.0  # a comment line at least this often, so proxies keep the stream open
RETRY_MILLISECONDS = 3000  # the browser reconnects after this long when the stream drops
PASSES_SHOWN = 10
ACTIONS_SHOWN = 50
FINISHED_TRANSFERS_SHOWN = 5


# --- the view ---------------------------------------------------------------------------------


def shape(status: Mapping[str, Any], passes: Iterable[Mapping[str, Any]], actions: Iterable[Mapping[str, Any]],
          reviews: Iterable[Mapping[str, Any]], uploads: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The template's view of what the daemon knows now (pure: data in, data out)."""
    deployments = [dict(d) for d in status.get("deployments") or []]
    environments = sorted({d["environment"] for d in deployments})
    models = sorted({d["model"] for d in deployments})
    cells = {(d["model"], d["environment"]): d for d in deployments}
    for d in deployments:
        d["anchor"] = _anchor(d["model"], d["environment"])
    counts: dict[str, int] = {}
    for d in deployments:
        counts[d["state"]] = counts.get(d["state"], 0) + 1

    hosts = []
    for h in status.get("hosts") or []:
        capacity = h.get("capacity") or {}
        reserved = h.get("reserved") or {}
        hosts.append({**h, "cpu_share": _share(reserved.get("cpus"), capacity.get("cpus")),
                      "memory_share": _share(reserved.get("memory"), capacity.get("memory"))})

    by_pass: dict[Any, list[dict[str, Any]]] = {}
    for a in actions:
        item = dict(a)
        item["seconds"] = _duration(a.get("started_at"), a.get("finished_at"))
        by_pass.setdefault(a.get("pass_id"), []).append(item)
    shown_passes = []
    for p in passes:
        summary = p.get("summary") or {}
        seconds = summary.get("seconds", _duration(p.get("started_at"), p.get("finished_at")))
        shown_passes.append({**p, "seconds": seconds,
                             "planned": summary.get("actions"), "failed": summary.get("failed_actions") or [],
                             "error": summary.get("error"),
                             "actions": sorted(by_pass.get(p.get("id"), []), key=lambda a: a.get("id") or 0)})

    current = status.get("revision")
    open_reviews: dict[str, dict[str, Any]] = {}
    for r in reviews:  # newest first: the first of a branch is its head, the older heads are superseded
        if r.get("branch") not in open_reviews:
            open_reviews[r.get("branch") or ""] = {**r, "stale": current is not None and r.get("base") != current}

    transfers = [dict(t) for t in status.get("transfers") or []]
    for t in transfers:
        t["percent"] = _share(t.get("sent"), t.get("total")) or 0
    uploading = [{**u, "percent": _share(u.get("offset"), u.get("size"))} for u in uploads]

    traffic = [d for d in deployments if d.get("traffic") or d.get("load") or d.get("overflow")]
    gateways = [{"name": name, **info} for name, info in sorted((status.get("gateways") or {}).items())]
    return {
        "status": status,
        "revision": current,
        "last_pass": status.get("lastPass") or {},
        "errors": list(status.get("errors") or []),
        "counts": counts,
        "environments": environments,
        "models": models,
        "cells": cells,
        "deployments": deployments,
        "hosts": hosts,
        "passes": shown_passes,
        "reviews": list(open_reviews.values()),
        "shipping": [t for t in transfers if not t.get("done")],
        "shipped": [t for t in transfers if t.get("done")][:FINISHED_TRANSFERS_SHOWN],
        "uploads": uploading,
        "traffic": traffic,
        "gateways": gateways,
        "events_url": EVENTS_PATH.lstrip("/"),  # relative: works behind a path prefix
    }


def _anchor(model: str, environment: str) -> str:
    """An element id for a deployment (ids must not contain spaces; names are DNS labels anyway)."""
    return "d-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in f"{model}--{environment}")


def _share(part: Any, whole: Any) -> int | None:
    if not isinstance(part, (int, float)) or not isinstance(whole, (int, float)) or whole <= 0:
        return None
    return max(0, min(100, round(100 * part / whole)))


def _duration(start: Any, end: Any) -> float | None:
    if isinstance(start, (int, float)) and isinstance(end, (int, float)):
        return max(0.0, end - start)
    return None


def render_page(view: Mapping[str, Any]) -> str:
    return templates().get_template("dashboard.html").render(**view, sections=SECTIONS)


def render_sections(view: Mapping[str, Any]) -> dict[str, str]:
    """Each section's inner HTML, as the full page has it (what the event stream sends)."""
    env = templates()
    return {name: env.get_template(f"dashboard/{name}.html").render(**view) for name in SECTIONS}


def read(daemon: Daemon, uploads: UploadManager) -> tuple[Any, ...]:
    """What the dashboard shows, as read now (a few SQLite reads and in-memory copies): the
    arguments of ``shape``."""
    status = daemon.status.to_json()
    # Figures that move on every read and are not shown: left out, so that reading again finds no change.
    status["gateways"] = {name: {k: v for k, v in info.items() if k != "lastReportSecondsAgo"}
                          for name, info in (status.get("gateways") or {}).items()}
    for d in status.get("deployments") or []:
        if isinstance(d.get("load"), dict):
            d["load"] = {k: v for k, v in d["load"].items() if k != "idleSeconds"}
    return (status, daemon.store.recent_passes(PASSES_SHOWN),
            daemon.store.recent_actions(ACTIONS_SHOWN), daemon.reviews.summaries(),
            # Not the id: it is the capability to write into the session.
            [{k: v for k, v in s.to_json().items() if k != "id"} for s in uploads.sessions()])


def gather(daemon: Daemon, uploads: UploadManager) -> dict[str, Any]:
    return shape(*read(daemon, uploads))


class SectionFeed:
    """The rendered sections, shared by every open event stream: read at most once per
    ``max_age`` seconds, and rendered again only when what was read differs from last time (so
    the cost does not grow with the number of open dashboards, and an idle daemon renders nothing)."""

    def __init__(self, read: Callable[[], tuple[Any, ...]], max_age: float = POLL_SECONDS * 0.9,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._read = read
        self._max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        self._at: float | None = None
        self._key: str | None = None
        self._sections: dict[str, str] = {}
        self.renders = 0

    def sections(self) -> dict[str, str]:
        with self._lock:
            now = self._clock()
            if self._at is not None and now - self._at < self._max_age:
                return self._sections
            inputs = self._read()
            key = json.dumps(inputs, sort_keys=True, default=str)
            if key != self._key:
                self._sections = render_sections(shape(*inputs))
                self._key = key
                self.renders += 1
            self._at = now
            return self._sections


# --- server-sent events -------------------------------------------------------------------------


def sse(event: str | None, data: Any) -> str:
    """One event in the text/event-stream format (JSON data: one line, no bare newlines)."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def event_stream(render: Callable[[], dict[str, str]], stop: Callable[[], bool], *,
                       poll: float = POLL_SECONDS, keepalive: float = KEEPALIVE_SECONDS,
                       clock: Callable[[], float] = time.monotonic) -> AsyncIterator[str]:
    """``retry:``, then every section at once (event ``sections``), then the sections that changed
    whenever one did, and a ``: keep-alive`` comment when nothing was sent for ``keepalive``
    seconds. Ends once ``stop()`` is true, after sending what changed (the daemon shuts down: no
    open stream holds it)."""
    yield f"retry: {RETRY_MILLISECONDS}\n\n"
    sent: dict[str, str] = {}
    last_sent = clock()
    while True:
        current = await run_in_threadpool(render)
        changed = {name: html for name, html in current.items() if sent.get(name) != html}
        if changed:
            sent.update(changed)
            yield sse("sections", {"sections": changed})
            last_sent = clock()
        elif clock() - last_sent >= keepalive:
            yield ": keep-alive\n\n"
            last_sent = clock()
        if stop():
            return
        await asyncio.sleep(poll)


# --- routes ---------------------------------------------------------------------------------------


def dashboard_routes(daemon: Daemon, api_token: str | None, uploads: UploadManager) -> list[Route]:
    def authorized(request: Request) -> bool:
        if api_token is None:
            return True
        if bearer_token_matches(request.headers.get("authorization"), api_token):
            return True
        candidate = request.query_params.get("token")
        return bool(candidate) and hmac.compare_digest(str(candidate).encode("utf-8", "surrogatepass"),
                                                       api_token.encode("utf-8"))

    def denied() -> JSONResponse:
        return JSONResponse({"error": "unauthorized: send Authorization: Bearer <api token>, or ?token=<api token>"},
                            status_code=401)

    async def page(request: Request) -> Response:
        if not authorized(request):
            return denied()
        view = await run_in_threadpool(gather, daemon, uploads)
        return HTMLResponse(render_page(view), headers={"Cache-Control": "no-store"})

    feed = SectionFeed(lambda: read(daemon, uploads))

    async def events(request: Request) -> Response:
        if not authorized(request):
            return denied()
        return StreamingResponse(event_stream(feed.sections, daemon.stop_event.is_set), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    return [Route("/", page), Route(EVENTS_PATH, events)]
