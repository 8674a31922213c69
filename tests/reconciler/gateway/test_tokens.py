"""Token limits at the gateway: usage read from responses, 429 over a limit, the daemon's sums applied."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from modelfleet.reconciler.daemon.tokens import TokenBook
from modelfleet.reconciler.gateway.metrics import GatewayMetrics
from modelfleet.reconciler.gateway.tokens import ResponseTokens, TokenLedger, parse_usage
from modelfleet.state.demand import WindowUsage
from modelfleet.state.token_limits import TokenBudget, TokenCounts, TokenLayer, TokenLimits, window_start
from tests.reconciler.gateway.harness import route, wait_for, who

pytestmark = pytest.mark.timeout(30)

KEY = "m/production"
FREE = "free/production"
LIMITS = TokenLimits((TokenLayer('environment "production"', (TokenBudget("ten-a-minute", "minute", total=10),)),))

USAGES = [
    # name, body, is an event stream, counts
    ("embeddings", b'{"object": "list", "data": [], "usage": {"prompt_tokens": 7, "total_tokens": 7}}', False,
     TokenCounts(7, 0)),
    ("chat completion", b'{"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}',
     False, TokenCounts(5, 3)),
    ("responses API names", b'{"output": [], "usage": {"input_tokens": 4, "output_tokens": 9}}', False,
     TokenCounts(4, 9)),
    ("only a total", b'{"usage": {"total_tokens": 11}}', False, TokenCounts(11, 0)),
    ("pretty-printed", b'{\n  "usage": {\n    "prompt_tokens": 2,\n    "completion_tokens": 1\n  }\n}', False,
     TokenCounts(2, 1)),
    ("the word usage in the content is not usage",
     b'{"text": "\\"usage\\": none", "usage": {"prompt_tokens": 1, "completion_tokens": 2}}', False, TokenCounts(1, 2)),
    ("event stream: the last event's usage",
     b'data: {"usage": null}\n\ndata: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 6}}\n\n'
     b"data: [DONE]\n\n", True, TokenCounts(3, 6)),
    ("no usage", b'{"predictions": [1, 2]}', False, None),
    ("a usage that is not an object", b'{"usage": 12}', False, None),
    ("negative counts are not counts", b'{"usage": {"prompt_tokens": -4}}', False, None),
    ("not JSON", b"usage: lots", False, None),
]


@pytest.mark.parametrize(("name", "body", "stream", "counts"), USAGES, ids=[u[0] for u in USAGES])
def test_usage_is_read_from_openai_style_responses(name: str, body: bytes, stream: bool,
                                                   counts: TokenCounts | None) -> None:
    assert parse_usage(body, stream=stream) == counts
    keeper = ResponseTokens.for_content_type(b"text/event-stream" if stream else b"application/json; charset=utf-8")
    assert keeper is not None
    for i in range(0, len(body), 7):  # as chunks
        keeper.feed(body[i:i + 7])
    assert keeper.usage() == counts


def test_only_json_and_event_streams_are_kept() -> None:
    assert ResponseTokens.for_content_type(b"text/plain") is None
    assert ResponseTokens.for_content_type(b"image/png") is None


def test_ledger_adds_what_it_counted_to_the_daemons_sums() -> None:
    now = [time.time()]
    ledger = TokenLedger(GatewayMetrics(), clock=lambda: now[0])
    assert ledger.verdict(KEY, LIMITS) is None
    ledger.answered({KEY: {"minute": WindowUsage(window=window_start("minute", now[0]), input=9, output=0)}})
    assert ledger.verdict(KEY, LIMITS) is None  # 9 of 10
    ledger.count(KEY, "m", "production", None, TokenCounts(1, 0))
    assert ledger.verdict(KEY, LIMITS) is not None  # 9 (other gateways) + 1 (here)
    # The report carries it to the daemon; until it answers, it still counts here.
    assert ledger.report()[KEY].input == 1
    assert ledger.verdict(KEY, LIMITS) is not None
    ledger.not_answered()  # lost: counted here until a report gets through
    assert ledger.verdict(KEY, LIMITS) is not None
    ledger.report()
    ledger.answered({KEY: {"minute": WindowUsage(window=window_start("minute", now[0]), input=10, output=0)}})
    verdict = ledger.verdict(KEY, LIMITS)
    assert verdict is not None and 1 <= verdict.retry_after <= 60
    now[0] += 60  # the next minute: the daemon's sums were of the last one
    assert ledger.verdict(KEY, LIMITS) is None
    assert ledger.report()[KEY].input == 1  # cumulative since the start


def test_requests_over_the_limit_get_429_in_openai_shape(backends: Any, make_gateway: Any) -> None:
    _, a = backends("a")
    gw = make_gateway({KEY: (route(a),), FREE: (route(a),)})
    gw.wait_version(gw.publish({KEY: (route(a),), FREE: (route(a),)}, tokens={KEY: LIMITS}))
    assert who(gw.client.get("/models/m/usage", params={"in": 4, "out": 2})) == "a"  # 6 of 10
    assert gw.client.get("/models/m/usage-stream", params={"in": 3, "out": 1}).status_code == 200  # 10 of 10
    refused = gw.client.get("/models/m/usage", params={"in": 1})
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "tokens"
    assert "10 of 10 total tokens this minute (policy ten-a-minute)" in error["message"]
    # Another deployment is not limited, whatever it uses.
    for _ in range(3):
        assert gw.client.get("/models/free/usage", params={"in": 50}).status_code == 200
    metrics = gw.client.get("/metrics").text
    assert 'modelfleet_gateway_token_limited_requests_total{environment="production",model="m"} 1.0' in metrics
    assert 'kind="input",location="",model="m",version=""} 7.0' in metrics
    assert 'kind="output",location="",model="m",version=""} 3.0' in metrics
    assert 'kind="input",location="",model="free",version=""} 150.0' in metrics


def test_a_limited_deployment_without_usage_counts_estimates(backends: Any, make_gateway: Any) -> None:
    _, a = backends("a")
    gw = make_gateway({KEY: (route(a),)})
    gw.wait_version(gw.publish({KEY: (route(a),)}, tokens={KEY: LIMITS}))
    body = json.dumps({"input": "x" * 30}).encode()  # 43 bytes: 11 tokens estimated
    assert who(gw.client.post("/models/m/predict", content=body)) == "a"
    assert gw.client.post("/models/m/predict", content=body).status_code == 429


def test_the_daemons_sums_of_every_gateway_are_enforced(backends: Any, make_gateway: Any,
                                                        demand_server: Any) -> None:
    _, a = backends("a")
    daemon, api = demand_server()
    now = time.time()
    daemon.reply_tokens = {KEY: {"minute": WindowUsage(window=window_start("minute", now), input=8, output=2)}}
    gw = make_gateway({KEY: (route(a),)}, control_plane=api.url, report_interval=0.05)
    gw.wait_version(gw.publish({KEY: (route(a),)}, tokens={KEY: LIMITS}))
    wait_for(lambda: gw.client.get("/models/m/usage").status_code == 429, "the other gateways' tokens to count")
    # What this gateway counted reaches the daemon with its reports, cumulative.
    daemon.reply_tokens = {}  # e.g. a new minute began
    wait_for(lambda: gw.app.tokens.verdict(KEY, LIMITS) is None, "the daemon's new sums")
    assert who(gw.client.get("/models/m/usage", params={"in": 2, "out": 1})) == "a"
    wait_for(lambda: any(r.tokens.get(KEY) and r.tokens[KEY].input == 2 and r.tokens[KEY].output == 1
                         for r in daemon.reports), "a report with the tokens counted here")


def test_two_gateways_learn_of_each_others_tokens_within_a_fraction_of_a_second(
        backends: Any, make_gateway: Any, demand_server: Any) -> None:
    """Reports every 30 s: what makes them meet is the report sent soon after counting tokens of a
    limited deployment (TOKEN_SYNC_DELAY), answered with the daemon's sums."""
    _, a = backends("a")
    daemon, api = demand_server()
    daemon.token_book, daemon.limited = TokenBook(), [KEY]
    first = make_gateway({KEY: (route(a),)}, control_plane=api.url, report_interval=30, gateway_id="gw-1")
    second = make_gateway({KEY: (route(a),)}, control_plane=api.url, report_interval=30, gateway_id="gw-2")
    for gw in (first, second):
        gw.wait_version(gw.publish({KEY: (route(a),)}, tokens={KEY: LIMITS}))
    assert who(first.client.get("/models/m/usage", params={"in": 6})) == "a"  # 6 of 10, at gw-1
    wait_for(lambda: any(r.gateway == "gw-1" and KEY in r.tokens for r in daemon.reports), "gw-1's tokens reported",
             timeout=2)
    assert who(second.client.get("/models/m/usage", params={"in": 4})) == "a"  # 10 of 10: gw-2 learns it
    wait_for(lambda: second.client.get("/models/m/usage").status_code == 429, "gw-2 to refuse", timeout=2)
    # gw-1 learns what gw-2 used with its next report: the sums come back on any report's answer.
    first.app.reporter.kick()
    wait_for(lambda: first.client.get("/models/m/usage").status_code == 429, "gw-1 to refuse", timeout=2)
