"""`modelfleet events`: the daemon's pass history, each finished pass printed once (--follow polls)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from modelfleet.reconciler.cli import events
from modelfleet.reconciler.cli.events import EventsUnavailable, finished_passes, follow
from modelfleet.reconciler.cli.main import main
from tests.http_server import ServerThread

TOKEN = "api-t0ken"


def a_pass(pass_id: int, finished: bool = True, result: str = "ok", actions: int = 0) -> dict[str, Any]:
    return {"id": pass_id, "revision": "3f786850e387550fdab836ed7e6dc881de23001b", "trigger": "poll",
            "started_at": 1_780_000_000.0 + pass_id, "finished_at": 1_780_000_001.0 + pass_id if finished else None,
            "result": result if finished else None,
            "summary": {"actions": actions, "seconds": 0.25, "held_actions": 0} if finished else None}


def an_action(action_id: int, pass_id: int, op: str = "create", result: str | None = "ok",
              error: str | None = None) -> dict[str, Any]:
    return {"id": action_id, "pass_id": pass_id, "op": op, "model": "echo", "environment": "production",
            "host": "par-1", "replica": 0, "container": None, "started_at": 1.0, "finished_at": 2.0,
            "result": result, "error": error}


def history(*passes: dict[str, Any], actions: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    # The API lists the most recent first.
    return {"passes": sorted(passes, key=lambda p: -p["id"]), "actions": sorted(actions, key=lambda a: -a["id"])}


def test_finished_passes_come_oldest_first_with_their_actions_and_skip_running_and_seen() -> None:
    data = history(a_pass(1), a_pass(2, actions=2), a_pass(3, finished=False), a_pass(4),
                   actions=(an_action(10, 2), an_action(11, 2, "remove"), an_action(12, 3)))
    result = finished_passes(data, seen=[4])
    assert [p["id"] for p in result] == [1, 2]
    assert [a["op"] for a in result[1]["actions"]] == ["create", "remove"]
    assert result[0]["actions"] == []


def test_follow_prints_each_pass_once_as_it_finishes_and_reports_an_outage_once() -> None:
    answers: list[dict[str, Any] | Exception] = [
        history(a_pass(1)),
        history(a_pass(1), a_pass(2, finished=False), actions=(an_action(5, 2, result=None),)),
        EventsUnavailable("cannot reach the daemon API at http://x"),
        EventsUnavailable("cannot reach the daemon API at http://x"),
        history(a_pass(1), a_pass(2, actions=1, result="degraded"),
                actions=(an_action(5, 2, result="failed", error="image not found"),)),
        history(a_pass(2), a_pass(3)),
    ]
    printed: list[str] = []
    warnings: list[str] = []
    sleeps: list[float] = []

    def fetch() -> dict[str, Any]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if not answers:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        follow(fetch, printed.append, warnings.append, as_json=True, sleep=sleep)
    assert [json.loads(line)["id"] for line in printed] == [1, 2, 3]
    second = json.loads(printed[1])
    assert second["result"] == "degraded"
    assert second["actions"] == [an_action(5, 2, result="failed", error="image not found")]
    assert len(warnings) == 2 and "cannot reach" in warnings[0] and "answers again" in warnings[1]
    assert sleeps == [1.0] * 6


def test_text_lines_name_the_pass_and_its_actions() -> None:
    entry = finished_passes(history(a_pass(7, actions=1, result="degraded"),
                                    actions=(an_action(1, 7, "replace", "failed", "not ready in 300s"),)))[0]
    text = events.format_pass(entry)
    first, action = text.splitlines()
    assert "pass 7 degraded" in first and "trigger=poll" in first and "revision=3f786850e387 " in first
    assert "actions=1" in first and first.startswith("2026-")
    assert action == "  replace echo/production replica 0 on par-1: failed: not ready in 300s"


@pytest.fixture
def api() -> Iterator[tuple[ServerThread, list[dict[str, Any]]]]:
    """A stand-in daemon API: /api/v1/history answers the next of a list (the last one repeats)."""
    answers: list[dict[str, Any]] = []

    async def endpoint(request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        return JSONResponse(answers.pop(0) if len(answers) > 1 else answers[0])

    server = ServerThread.for_app(Starlette(routes=[Route("/api/v1/history", endpoint)])).start()
    yield server, answers
    server.stop()


def config_for(tmp_path: Path, server: ServerThread) -> str:
    (tmp_path / "token").write_text(TOKEN + "\n")
    path = tmp_path / "modelfleet.yaml"
    path.write_text(f"api: {{listen: '127.0.0.1:{server.port}', tokenFile: token}}\n")
    return str(path)


def test_events_prints_the_finished_passes_with_the_config_token(
        api: tuple[ServerThread, list[dict[str, Any]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server, answers = api
    answers.append(history(a_pass(1), a_pass(2, finished=False)))
    assert main(["events", "--config", config_for(tmp_path, server), "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["id"] for line in lines] == [1]


def test_events_follow_polls_the_api(api: tuple[ServerThread, list[dict[str, Any]]], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    server, answers = api
    answers += [history(a_pass(1)), history(a_pass(1), a_pass(2)), history(a_pass(1), a_pass(2), a_pass(3))]
    polls: list[float] = []

    def sleep(seconds: float) -> None:
        polls.append(seconds)
        if len(polls) == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(events, "follow", _with_sleep(events.follow, sleep))
    assert main(["events", "--config", config_for(tmp_path, server), "--follow"]) == 130
    out = capsys.readouterr().out
    assert [line.split(" pass ")[1].split()[0] for line in out.splitlines()] == ["1", "2", "3"]


def _with_sleep(function: Any, sleep: Any) -> Any:
    def run(*args: Any, **kwargs: Any) -> Any:
        return function(*args, **{**kwargs, "sleep": sleep})

    return run


def test_an_unreachable_api_is_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.http_server import bound_socket

    sock = bound_socket()  # bound, not listening: refused
    try:
        assert main(["events", "--api", f"http://127.0.0.1:{sock.getsockname()[1]}"]) == 3
    finally:
        sock.close()
    assert "cannot reach the daemon API" in capsys.readouterr().err


def test_a_wrong_token_is_exit_3_with_the_status(api: tuple[ServerThread, list[dict[str, Any]]],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    server, answers = api
    answers.append(history(a_pass(1)))
    assert main(["events", "--api", server.url]) == 3
    assert "answered 401" in capsys.readouterr().err
