"""The dashboard's rendering (api/dashboard.py, templates/dashboard*): what it shows, escaping of
hostile names and messages, empty states; its event stream; its routes behind the API token."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.testclient import TestClient

from modelfleet.reconciler.api.app import make_api
from modelfleet.reconciler.api.dashboard import (
    SECTIONS,
    SectionFeed,
    event_stream,
    render_page,
    render_sections,
    shape,
)
from modelfleet.reconciler.artifacts.store import ArtifactStore

TOKEN = "dash-t0ken"
HOSTILE = '<script>alert("x")</script>'
HOSTILE_ATTR = '"><img src=x onerror=alert(1)>'


def deployment(model: str, environment: str, state: str = "success", **extra: Any) -> dict[str, Any]:
    ready = state == "success"
    return {
        "model": model, "environment": environment, "state": state,
        "reason": "Ready" if ready else "Unschedulable",
        "message": extra.pop("message", "2/2 replicas ready" if ready else "not enough capacity"),
        "hosts": ["par-0", "fra-1"], "ready_replicas": 2 if ready else 0, "desired_replicas": 2,
        "revision": "a" * 40, "context": f"modelfleet/{environment}/{model}", "notes": [],
        "conditions": [{"type": "Ready", "status": "True" if ready else "False", "reason": "Ready", "message": "",
                        "last_transition_time": 1.0},
                       {"type": "Stalled", "status": "False" if ready else "True", "reason": "x", "message": "",
                        "last_transition_time": 1.0}],
        **extra,
    }


def host(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "url": "tcp://10.0.0.1:2375", "up": True, "state": "up", "error": None,
            "location": {"name": "paris-1", "country": "FR", "continent": "EU"}, "flavors": ["amd-genoa"],
            "capacity": {"cpus": 8, "memory": 32 * 2**30}, "reserved": {"cpus": 2, "memory": 8 * 2**30},
            "replicas": 2, "observe_seconds": 0.01, **extra}


def status(**extra: Any) -> dict[str, Any]:
    return {"revision": "b" * 40, "lastAppliedRevision": "b" * 40, "ready": True,
            "lastPass": {"id": 7, "trigger": "poll", "result": "ok", "finishedAt": 1_700_000_000.0},
            "errors": [], "sourceError": None, "deployments": [], "hosts": [], "gateways": {}, "transfers": [],
            **extra}


def view(st: dict[str, Any] | None = None, passes: list[dict[str, Any]] | None = None,
         actions: list[dict[str, Any]] | None = None, reviews: list[dict[str, Any]] | None = None,
         uploads: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return shape(st if st is not None else status(), passes or [], actions or [], reviews or [], uploads or [])


class _Text(HTMLParser):
    """The page as a reader sees it: text, and the elements that were really parsed."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parsed(html: str) -> _Text:
    parser = _Text()
    parser.feed(html)
    return parser


def text_of(html: str) -> str:
    return re.sub(r"\s+", " ", " ".join(parsed(html).text)).strip()


# --- what it shows ----------------------------------------------------------------------------


def test_deployments_form_a_model_by_environment_matrix_with_state_and_replicas() -> None:
    st = status(deployments=[deployment("echo", "production"), deployment("echo", "development", "failure"),
                             deployment("bert", "production", "pending")])
    html = render_sections(view(st))["deployments"]
    header = re.search(r"<thead><tr>(.*?)</tr></thead>", html, re.S)
    assert header is not None
    assert re.findall(r"<th scope=\"col\">(.*?)</th>", header.group(1)) == ["model", "development", "production"]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"<tr><th scope=\"row\">(\w+)</th>(.*?)</tr>", html, re.S)}
    assert list(rows) == ["bert", "echo"]
    assert "—" in rows["bert"]  # bert has no development deployment
    assert "failure" in rows["echo"] and "success" in rows["echo"] and "2/2" in rows["echo"] and "0/2" in rows["echo"]
    text = text_of(html)
    assert "not enough capacity" in text and "Stalled: True" in text and "Ready: False" in text
    # The matrix links to each deployment's row (keyboard-reachable).
    anchors = [a["href"] for tag, a in parsed(html).tags if tag == "a"]
    ids = {a.get("id") for tag, a in parsed(html).tags if tag == "tr"}
    assert anchors and all(href is not None and href[1:] in ids for href in anchors)


def test_hosts_show_health_location_flavors_and_capacity_reserved_of_total() -> None:
    st = status(hosts=[host("par-0"), host("vir-2", up=False, state="down (replicas moved to other eligible hosts)",
                                             error="host vir-2 is unreachable: connection refused",
                                             reserved={"cpus": 0.0, "memory": 0})])
    text = text_of(render_sections(view(st))["hosts"])
    assert "par-0 up paris-1 (FR, EU) amd-genoa 2 / 8 (25 %) 8.0 GiB / 32.0 GiB (25 %)" in text
    assert "vir-2 down : down (replicas moved to other eligible hosts)" in text
    assert "connection refused" in text and "0 / 8 (0 %)" in text


def test_passes_list_commits_actions_and_durations() -> None:
    passes = [{"id": 8, "revision": "c" * 40, "trigger": "watch", "started_at": 100.0, "finished_at": 102.5,
               "result": "degraded", "summary": {"actions": 2, "seconds": 2.5,
                                                 "failed_actions": ["create echo/production: boom"]}},
              {"id": 7, "revision": "b" * 40, "trigger": "poll", "started_at": 90.0, "finished_at": 90.02,
               "result": "ok", "summary": {"actions": 0, "seconds": 0.02}}]
    actions = [{"id": 2, "pass_id": 8, "op": "create", "model": "echo", "environment": "production", "host": "par-0",
                "replica": 1, "started_at": 100.1, "finished_at": 102.0, "result": "failed", "error": "boom"},
               {"id": 1, "pass_id": 8, "op": "create", "model": "echo", "environment": "production", "host": "fra-1",
                "replica": 0, "started_at": 100.1, "finished_at": 101.3, "result": "ok", "error": None}]
    text = text_of(render_sections(view(passes=passes, actions=actions))["passes"])
    assert "#8" in text and "cccccccccccc" in text and "watch" in text and "degraded" in text and "2.50 s" in text
    # Actions in the order they were recorded, each with its duration and outcome.
    assert text.index("#0 on fra-1: ok 1.20 s") < text.index("#1 on par-0: failed 1.90 s boom")
    assert "#7" in text and "0.02 s" in text


def test_open_review_plans_are_the_latest_head_of_each_branch_and_say_when_stale() -> None:
    reviews = [  # newest first, as ReviewPlanner.summaries gives them
        {"branch": "review/a", "revision": "1" * 40, "base": "b" * 40, "plannedAt": 10.0, "state": "success",
         "description": "would create 1 replica"},
        {"branch": "review/b", "revision": "2" * 40, "base": "0" * 40, "plannedAt": 9.0, "state": "failure",
         "description": "models/x.yaml:3: bad"},
        {"branch": "review/a", "revision": "3" * 40, "base": "b" * 40, "plannedAt": 8.0, "state": "success",
         "description": "older head"},
        {"branch": "feature-x", "revision": "4" * 40, "base": "b" * 40, "plannedAt": 7.0, "state": "success",
         "description": "would change nothing",
         "pullRequest": {"number": 12, "url": "https://forge.example/acme/models/pull/12", "title": "<b>Bold</b>"}},
        {"branch": "pull/13", "revision": "5" * 40, "base": "b" * 40, "plannedAt": 6.0, "state": "success",
         "description": "x", "pullRequest": {"number": 13, "url": "javascript:alert(1)", "title": "t"}},
    ]
    html = render_sections(view(reviews=reviews))["reviews"]
    text = text_of(html)
    assert "older head" not in text
    assert "review/a 111111111111" in text and "review/b 222222222222" in text
    assert text.count("stale") == 1 and "(stale: the base moved since)" in text.split("review/b")[1]
    assert "pull request #12 <b>Bold</b>" in text and "pull request #13 t" in text  # a title is text
    links = [a for tag, a in parsed(html).tags if tag == "a"]
    plans = [a for a in links if "data-api" in a]  # the page's script carries ?token= on them
    assert [a["href"] for a in plans] == [f"plans/{c * 40}" for c in "1245"]
    # The forge's page of a pull request is linked when it is a web address (never javascript:).
    assert [a["href"] for a in links if "data-api" not in a] == ["https://forge.example/acme/models/pull/12"]


def test_transfers_in_progress_and_uploads_with_their_progress() -> None:
    st = status(transfers=[
        {"host": "par-0", "artifact": "sha256-abc", "sent": 3 * 2**30, "total": 4 * 2**30, "done": False, "at": 2.0},
        {"host": "fra-1", "artifact": "sha256-old", "sent": 100, "total": 100, "done": True, "at": 1.0}])
    uploads = [{"name": "big.mar", "offset": 2**30, "size": 4 * 2**30, "sha256": None, "created": 1.0, "updated": 2.0}]
    html = render_sections(view(st, uploads=uploads))["transfers"]
    text = text_of(html)
    assert "par-0 sha256-abc" in text and "3.0 GiB / 4.0 GiB (75 %)" in text
    assert "big.mar 1.0 GiB / 4.0 GiB (25 %)" in text
    assert "Shipped lately: sha256-old to fra-1" in text
    progress = [a for tag, a in parsed(html).tags if tag == "progress"]
    assert progress == [{"max": "100", "value": "75", "aria-label": "sha256-abc to par-0"}]


def test_traffic_shows_every_deployments_rates_and_the_serverless_load() -> None:
    st = status(deployments=[
        deployment("lazy", "production", load={"concurrency": 1.5, "rps": 12.25, "inFlight": 2, "queued": 1,
                                               "idleSeconds": 0.0}),
        deployment("onprem", "production", overflow={"endpointHealthy": False, "toEndpoint": 3, "toPool": 9}),
        deployment("steady", "production", traffic={"rps": 40.5, "errorsPerSecond": 0.2, "window": 10.0}),
        deployment("quiet", "production")],
        gateways={"gw-1": {"lastReportSecondsAgo": 0.5, "tableVersion": 4, "location": "paris-1"}})
    text = text_of(render_sections(view(st))["traffic"])
    assert "lazy/production 12.25 - 1.5 2 1 - -" in text  # serverless, before a rate: the load's rps
    assert "onprem/production - - - - - 3 (unhealthy) 9" in text
    assert "steady/production 40.5 0.2 - - - - -" in text
    assert "quiet/production" not in text
    assert "gw-1 (paris-1), route table v4" in text


# --- escaping and empty states ----------------------------------------------------------------


def test_hostile_names_and_messages_are_escaped_everywhere() -> None:
    st = status(
        revision=HOSTILE, errors=[HOSTILE], sourceError=HOSTILE,
        lastPass={"id": 1, "trigger": HOSTILE, "result": HOSTILE, "error": HOSTILE, "finishedAt": 1.0},
        deployments=[deployment(HOSTILE, HOSTILE_ATTR, "failure", message=HOSTILE, hosts=[HOSTILE],
                                notes=[HOSTILE], load={"rps": 1.0}),
                     deployment("ok", HOSTILE, message=HOSTILE_ATTR)],
        hosts=[host(HOSTILE_ATTR, error=HOSTILE, flavors=[HOSTILE],
                    location={"name": HOSTILE, "country": HOSTILE_ATTR, "continent": "EU"})],
        gateways={HOSTILE: {"tableVersion": 1, "location": HOSTILE_ATTR}},
        transfers=[{"host": HOSTILE_ATTR, "artifact": HOSTILE, "sent": 1, "total": 2, "done": False, "at": 1.0}])
    passes = [{"id": 1, "revision": HOSTILE, "trigger": HOSTILE, "started_at": 0.0, "finished_at": 1.0,
               "result": HOSTILE, "summary": {"error": HOSTILE}}]
    actions = [{"id": 1, "pass_id": 1, "op": HOSTILE, "model": HOSTILE, "environment": HOSTILE_ATTR,
                "host": HOSTILE, "replica": 0, "started_at": 0.0, "finished_at": 1.0, "result": "failed",
                "error": HOSTILE}]
    reviews = [{"branch": HOSTILE, "revision": HOSTILE_ATTR, "base": HOSTILE, "plannedAt": 1.0,
                "state": HOSTILE_ATTR, "description": HOSTILE}]
    uploads = [{"name": HOSTILE_ATTR, "offset": 1, "size": 2, "created": 1.0, "updated": 1.0}]
    v = view(st, passes, actions, reviews, uploads)
    for html in (render_page(v), *render_sections(v).values()):
        assert "<script>alert" not in html and "<img" not in html
        tags = parsed(html).tags
        assert not any(tag == "img" for tag, _ in tags)
        assert not any(name.startswith("on") for _, attrs in tags for name in attrs)
    page = render_page(v)
    assert page.count("<script>") == 1  # the page's own, and nothing else
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page
    assert HOSTILE in text_of(page)  # shown as text, as it is


def test_an_empty_daemon_renders_every_section_with_its_empty_state() -> None:
    v = shape({}, [], [], [], [])
    sections = {name: text_of(html) for name, html in render_sections(v).items()}
    assert set(sections) == set(SECTIONS)
    assert "none yet" in sections["summary"]
    assert "No deployments" in sections["deployments"] and "nothing fetched yet" in sections["deployments"]
    assert "No hosts observed yet" in sections["hosts"]
    assert "No pass has run yet" in sections["passes"]
    assert "No review plans" in sections["reviews"]
    assert "No transfer in progress" in sections["transfers"]
    assert "No traffic reported" in sections["traffic"]
    page = render_page(v)
    assert page.startswith("<!doctype html>") and '<html lang="en">' in page
    for name in SECTIONS:
        assert f'id="s-{name}"' in page


def test_the_page_is_accessible_and_self_contained() -> None:
    st = status(deployments=[deployment("echo", "production")], hosts=[host("par-0")])
    passes = [{"id": 1, "revision": "b" * 40, "trigger": "poll", "started_at": 0.0, "finished_at": 1.0,
               "result": "ok", "summary": {}}]
    page = render_page(view(st, passes=passes))
    # Every table has a caption and column headers with a scope.
    tables = page.count("<table")
    assert tables >= 4 and page.count("<caption>") == tables
    assert "<th>" not in page and '<th scope="col">' in page
    # No external resource: no CDN, no remote script, style or font.
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "@import" not in page
    # Without JavaScript the page still updates (a refresh inside <noscript>).
    assert '<noscript><meta http-equiv="refresh"' in page
    # A skip link to the content, and the live status for screen readers.
    assert '<a class="skip" href="#main">' in page and 'role="status"' in page


# --- the event stream -------------------------------------------------------------------------


async def _collect(stream: Any, count: int) -> list[str]:
    chunks = []
    async for chunk in stream:
        chunks.append(chunk)
        if len(chunks) == count:
            break
    return chunks


def test_the_event_stream_sends_every_section_then_only_changes_and_keeps_alive() -> None:
    frames = [{"a": "1", "b": "x"}, {"a": "1", "b": "x"}, {"a": "2", "b": "x"}, {"a": "2", "b": "x"}]
    now = [0.0]

    def render() -> dict[str, str]:
        now[0] += 10.0  # each poll: 10 s later on the stream's clock
        return frames.pop(0) if frames else {"a": "2", "b": "x"}

    stream = event_stream(render, lambda: False, poll=0, keepalive=15, clock=lambda: now[0])
    chunks = asyncio.run(_collect(stream, 4))
    assert chunks[0] == "retry: 3000\n\n"
    assert chunks[1] == 'event: sections\ndata: {"sections":{"a":"1","b":"x"}}\n\n'
    assert chunks[2] == 'event: sections\ndata: {"sections":{"a":"2"}}\n\n'  # 10 s without a change: nothing yet
    assert chunks[3] == ": keep-alive\n\n"  # 20 s without a change


def test_the_event_stream_ends_when_the_daemon_stops() -> None:
    stop = threading.Event()
    renders = []

    def render() -> dict[str, str]:
        renders.append(1)
        if len(renders) == 2:
            stop.set()
        return {"a": str(len(renders))}

    chunks = asyncio.run(_collect(event_stream(render, stop.is_set, poll=0), 100))
    assert [c.strip().splitlines()[-1] for c in chunks[1:]] == ['data: {"sections":{"a":"1"}}',
                                                                 'data: {"sections":{"a":"2"}}']
    assert len(renders) == 2


def test_the_section_feed_reads_once_per_interval_and_renders_only_changes() -> None:
    """Shared by every open stream: ten dashboards polling cost one read per interval, and an
    unchanged daemon costs no render."""
    now = [0.0]
    reads: list[int] = []
    current = [status(deployments=[deployment("echo", "production")])]

    def read() -> tuple[Any, ...]:
        reads.append(1)
        return (current[0], [], [], [], [])

    feed = SectionFeed(read, max_age=1.0, clock=lambda: now[0])
    first = feed.sections()
    assert "echo/production" in first["deployments"]
    for _ in range(10):  # ten streams within the same second
        assert feed.sections() is first
    assert len(reads) == 1 and feed.renders == 1
    now[0] += 1.0
    assert feed.sections() is first and len(reads) == 2 and feed.renders == 1  # read again, same: no render
    current[0] = status(deployments=[deployment("echo", "production", "failure", message="it broke")])
    now[0] += 1.0
    assert "it broke" in feed.sections()["deployments"] and feed.renders == 2


# --- the routes -------------------------------------------------------------------------------


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    stop = threading.Event()
    stop.set()  # an event stream sends its sections once and ends
    st = status(deployments=[deployment("echo", "production", message=HOSTILE)], hosts=[host("par-0")])
    daemon: Any = SimpleNamespace(
        status=SimpleNamespace(to_json=lambda: st, observed_once=True),
        config=SimpleNamespace(repo=SimpleNamespace(branch="main")),
        store=SimpleNamespace(recent_passes=lambda limit: [], recent_actions=lambda limit: []),
        reviews=SimpleNamespace(summaries=lambda: []), stop_event=stop,
        artifacts=ArtifactStore(tmp_path / "state"))
    return TestClient(make_api(daemon, TOKEN, None, lambda _: None))


def test_the_page_needs_the_token_as_a_bearer_header_or_query(client: TestClient) -> None:
    assert client.get("/").status_code == 401
    assert client.get("/", params={"token": "wrong"}).status_code == 401
    response = client.get("/", params={"token": TOKEN})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "echo/production" in text_of(response.text) and HOSTILE in text_of(response.text)
    assert TOKEN not in response.text  # the script reads it from the address, the page never holds it
    assert client.get("/", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_the_event_stream_needs_the_token_and_sends_the_rendered_sections(client: TestClient) -> None:
    url = "/api/v1/dashboard/events"
    assert client.get(url).status_code == 401
    assert client.get(url, params={"token": "wrong"}).status_code == 401
    for kwargs in ({"params": {"token": TOKEN}}, {"headers": {"Authorization": f"Bearer {TOKEN}"}}):
        response = client.get(url, **kwargs)  # type: ignore[arg-type]
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-store"
        events = [block for block in response.text.split("\n\n") if block.startswith("event: sections")]
        assert len(events) == 1
        sections = json.loads(events[0].split("data: ", 1)[1])["sections"]
        assert set(sections) == set(SECTIONS)
        assert "echo/production" in sections["deployments"] and "<script>alert" not in sections["deployments"]
        assert TOKEN not in response.text
