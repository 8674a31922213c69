"""`modelfleet logs`: what it prints, and --follow asking only for what is new."""

from __future__ import annotations

import json
from typing import Any

import pytest

from modelfleet.reconciler.cli.events import EventsUnavailable
from modelfleet.reconciler.cli.logs import FOLLOW_LIMIT, follow, render

RECORD = {"seq": 4, "time": 1_700_000_000.5, "request_id": "r1", "model": "m", "environment": "production",
          "status": 200, "duration_ms": 3.25, "request_bytes": 0, "response_bytes": 9, "spec_hash": "a" * 64,
          "revision": "b" * 40, "host": "h1", "location": "paris-1", "replica": 0, "container": "m-production-0",
          "cold_start": False, "overflow": False, "retry": False, "gateway": "g", "gateway_location": ""}
CONTAINER = {"environment": "production", "replica": 0, "host": "h1", "container": "m-production-0",
             "lines": ["2026-12-03T10:00:00Z model loaded"]}


def test_render_prints_container_lines_then_executions() -> None:
    lines = render({"executions": [RECORD], "containers": [CONTAINER, {**CONTAINER, "container": "m-production-1",
                                                                       "lines": None, "error": "host h2 is down"}]},
                   as_json=False)
    assert lines == [
        "[m-production-0] 2026-12-03T10:00:00Z model loaded",
        "[m-production-1 (production, replica 0, h1)] cannot read its log: host h2 is down",
        "2023-11-14T22:13:20.500Z m/production 200 3.2ms 9B h1/r0 aaaaaaaaaaaa@bbbbbbbbbbbb paris-1 id=r1",
    ]
    as_json = render({"executions": [RECORD], "containers": [CONTAINER]}, as_json=True)
    assert json.loads(as_json[0]) == {"container": "m-production-0", "host": "h1",
                                      "line": "2026-12-03T10:00:00Z model loaded"}
    assert json.loads(as_json[1]) == RECORD


def test_follow_asks_for_executions_after_the_last_and_container_lines_since_the_last_poll() -> None:
    asked: list[dict[str, str]] = []
    answers: list[Any] = [{"executions": [RECORD], "containers": [CONTAINER], "next": 4},
                          EventsUnavailable("the daemon is away"),
                          {"executions": [], "containers": [], "next": 4}]
    printed: list[str] = []
    warned: list[str] = []
    clock = iter([100.0, 101.0, 102.0])

    def fetch(params: dict[str, str]) -> dict[str, Any]:
        asked.append(dict(params))
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return dict(answer)

    def sleep(_: float) -> None:
        if not answers:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        follow(fetch, {"limit": "20", "tail": "20", "environment": "production"}, printed.append, warned.append,
               sleep=sleep, clock=lambda: next(clock))
    assert asked[0] == {"limit": "20", "tail": "20", "environment": "production"}
    assert asked[1] == {"limit": str(FOLLOW_LIMIT), "since": "4", "containerSince": "100.000",
                        "environment": "production"}
    assert asked[2] == asked[1]  # the failed poll changed nothing
    assert len(printed) == 2
    assert warned == ["the daemon is away (retrying every 1s)", "the daemon API answers again"]


def test_follow_without_containers_never_asks_for_them() -> None:
    asked: list[dict[str, str]] = []

    def fetch(params: dict[str, str]) -> dict[str, Any]:
        asked.append(dict(params))
        return {"executions": [], "containers": [], "next": 0}

    def sleep(_: float) -> None:
        if len(asked) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        follow(fetch, {"limit": "5", "tail": "0"}, lambda _: None, lambda _: None, sleep=sleep, clock=lambda: 1.0)
    assert all(q.get("tail") == "0" and "containerSince" not in q for q in asked)
