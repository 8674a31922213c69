"""Token limits at the gateway: counting each response's tokens, refusing requests over a limit.

**Counting.** A response of a deployment whose ``Content-Type`` is JSON or an event stream, of at
most ``USAGE_BODY_LIMIT`` bytes, is kept (its chunks, not a copy) while it is relayed; once sent,
its OpenAI-style ``usage`` is read: ``prompt_tokens``/``completion_tokens`` (embeddings, chat and
text completions, the runtimes' generate), or ``input_tokens``/``output_tokens``; the last
``usage`` of an event stream (``stream_options: {include_usage: true}``). A successful response
without one counts its request body's estimated tokens as input (``state/token_limits``: a
quarter of its bytes), and an event stream's as much output, so a limit holds for backends that
do not report usage too.

**Enforcing.** Every gateway reports its counts to the daemon with its demand reports (every ~2 s,
and within ``TOKEN_SYNC_DELAY`` of counting tokens for a deployment with limits);
the daemon sums them over all gateways and answers with each limited deployment's usage in its
current windows. Before forwarding a request of a deployment with token limits the gateway adds
what it counted since its last report was answered, and asks the pure core
(``state/token_limits.token_verdict``) whether the budgets still have room; if not, the answer is
429 with ``Retry-After`` and an OpenAI-style error body. A request is refused once a budget is used
up, so one request may take a budget past its limit (tokens are known once the response is).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from modelfleet.reconciler.gateway.metrics import GatewayMetrics
from modelfleet.reconciler.gateway.routes import Backend
from modelfleet.state.demand import TokensCounted, WindowUsage
from modelfleet.state.token_limits import (
    GRANULARITIES,
    TokenCounts,
    TokenLimits,
    TokenVerdict,
    Usage,
    add_usage,
    estimated_tokens,
    merge_usage,
    token_verdict,
)

# Responses larger than this are not searched for their usage (an embeddings batch of 1k vectors of
# 384 floats is ~8 MiB of JSON; its usage is estimated instead).
USAGE_BODY_LIMIT = 16 << 20
_USAGE = b'"usage"'
_DECODER = json.JSONDecoder()


def _counted_content(content_type: bytes) -> str | None:
    lower = content_type.lower()
    if b"json" in lower:
        return "json"
    if b"text/event-stream" in lower:
        return "stream"
    return None


class ResponseTokens:
    """One response's body, kept while it is relayed, and the tokens it says it used."""

    __slots__ = ("chunks", "kind", "overflowed", "size")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.chunks: list[bytes] = []
        self.size = 0
        self.overflowed = False

    @staticmethod
    def for_content_type(content_type: bytes) -> ResponseTokens | None:
        """A keeper for a response of this ``Content-Type``, or None when its tokens are not counted."""
        kind = _counted_content(content_type)
        return ResponseTokens(kind) if kind is not None else None

    def feed(self, chunk: bytes) -> None:
        if self.overflowed or not chunk:
            return
        self.size += len(chunk)
        if self.size > USAGE_BODY_LIMIT:
            self.overflowed, self.chunks = True, []
            return
        self.chunks.append(chunk)

    def usage(self) -> TokenCounts | None:
        """The usage the response reports, or None when it reports none."""
        if self.overflowed or not self.chunks:
            return None
        body = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        return parse_usage(body, stream=self.kind == "stream")


def parse_usage(body: bytes, *, stream: bool = False) -> TokenCounts | None:
    """The last ``"usage": {...}`` object of a JSON body, or of an event stream's events (one
    ``data:`` line each), as token counts."""
    at = body.rfind(_USAGE)
    while at >= 0:
        start = body.find(b"{", at + len(_USAGE))
        between = body[at + len(_USAGE):start] if start >= 0 else b""
        if start >= 0 and between.strip() == b":":
            end = body.find(b"\n", start) if stream else -1
            text = body[start:end if end >= 0 else len(body)].decode("utf-8", "replace")
            try:
                value, _ = _DECODER.raw_decode(text)
            except ValueError:
                value = None
            counts = _counts(value)
            if counts is not None:
                return counts
        at = body.rfind(_USAGE, 0, at)
    return None


def _counts(usage: Any) -> TokenCounts | None:
    if not isinstance(usage, dict):
        return None

    def number(*names: str) -> int | None:
        for name in names:
            value = usage.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
        return None

    prompt = number("prompt_tokens", "input_tokens")
    completion = number("completion_tokens", "output_tokens")
    total = number("total_tokens")
    if prompt is None and completion is None:
        if total is None:
            return None
        return TokenCounts(total, 0)
    return TokenCounts(prompt or 0, completion or 0)


def estimate(request_bytes: int, response: ResponseTokens | None, response_bytes: int) -> TokenCounts:
    """A successful response's tokens when it reported no usage (see the module's doc)."""
    output = estimated_tokens(response_bytes) if response is not None and response.kind == "stream" else 0
    return TokenCounts(estimated_tokens(request_bytes), output)


class TokenLedger:
    """This gateway's token counts, the daemon's sums, and the verdicts (one per gateway worker)."""

    def __init__(self, metrics: GatewayMetrics, clock: Callable[[], float] = time.time) -> None:
        self.metrics = metrics
        self.clock = clock
        self.counted: dict[str, TokenCounts] = {}  # route key -> since this gateway started (reported)
        self._from_daemon: dict[str, Usage] = {}  # route key -> every gateway's usage, as the daemon last said
        self._unreported: dict[str, dict[str, tuple[float, TokenCounts]]] = {}  # since the last report was built
        self._in_report: dict[str, dict[str, tuple[float, TokenCounts]]] = {}  # in the report on its way
        # Called when a deployment with token limits counted tokens: the demand reporter sends them
        # (and learns every gateway's sums) soon, not at its next 2 s tick.
        self.on_limited_count: Callable[[], None] | None = None

    def count(self, key: str, model: str, environment: str, backend: Backend | None, counts: TokenCounts,
              limited: bool = False) -> None:
        if not counts.total:
            return
        if limited and self.on_limited_count is not None:
            self.on_limited_count()
        now = self.clock()
        before = self.counted.get(key, TokenCounts())
        self.counted[key] = before + counts
        self._unreported[key] = add_usage(self._unreported.get(key, {}), counts, now)
        self.metrics.count_tokens(model, environment, backend.spec_hash if backend is not None else "",
                                  backend.location if backend is not None else "", counts.input, counts.output)

    def verdict(self, key: str, limits: TokenLimits) -> TokenVerdict | None:
        now = self.clock()
        usage = merge_usage(self._from_daemon.get(key, {}), self._in_report.get(key, {}),
                            self._unreported.get(key, {}), now=now)
        return token_verdict(limits, usage, now)

    # --- the demand reports (gateway/demand_client.py) ---------------------------------------------

    def report(self) -> dict[str, TokensCounted]:
        """The cumulative counts for a report about to be sent; what was counted since is in it."""
        for key, usage in self._unreported.items():
            self._in_report[key] = merge_usage(self._in_report.get(key, {}), usage, now=self.clock())
        self._unreported = {}
        return {key: TokensCounted(input=c.input, output=c.output) for key, c in self.counted.items()}

    def answered(self, usage: Mapping[str, Mapping[str, WindowUsage]]) -> None:
        """The daemon counted the report: its sums replace what this gateway kept on the side."""
        self._in_report = {}
        self._from_daemon = {
            key: {g: (w.window, TokenCounts(w.input, w.output)) for g, w in windows.items() if g in GRANULARITIES}
            for key, windows in usage.items()}

    def not_answered(self) -> None:
        """The report did not get through: what it carried counts here until the next one does."""
        for key, usage in self._in_report.items():
            self._unreported[key] = merge_usage(self._unreported.get(key, {}), usage, now=self.clock())
        self._in_report = {}


def refusal_body(verdict: TokenVerdict) -> dict[str, Any]:
    """OpenAI's error shape for a rate limit (the official clients raise RateLimitError on it)."""
    return {"error": {"message": verdict.message, "type": "tokens", "param": None, "code": "rate_limit_exceeded"}}
