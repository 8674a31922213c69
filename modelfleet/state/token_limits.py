"""Token limits: the ``maxToken`` policies of a deployment, and whether its usage is within them.

The policy algebra of placement applies to token budgets too (README.md, "Token limits"):

* within one party (the environment, or the deployment), policies of type ``maxToken`` combine by
  UNION: a request may go when ANY of them still has room, i.e. the most permissive one wins;
* the environment's and the deployment's budgets are INTERSECTED: a request may go only when
  EACH party that set budgets still has room, so a deployment can narrow, never widen, what its
  environment allows.

One budget (one policy) has room while every limit it sets (``input``, ``output``, ``total`` =
input + output) is not used up in the current window of its ``granularity``. Windows are calendar
periods in UTC (the minute, hour, day or month ``now`` falls in), so every gateway and the daemon
agree on them without talking. A used-up window frees at its end: that is the ``Retry-After``.

Everything here is pure: the clock (``now``, seconds since the epoch) is an argument.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from modelfleet.state.policy import PolicyLayer

GRANULARITIES = ("minute", "hour", "day", "month")
_FIXED_SECONDS = {"minute": 60, "hour": 3600, "day": 86400}
# Bytes of a request body per estimated input token, when the response says nothing of its usage
# (OpenAI's rule of thumb: a token is about four characters of English text).
BYTES_PER_TOKEN = 4


@dataclass(frozen=True)
class TokenCounts:
    input: int = 0
    output: int = 0

    @property
    def total(self) -> int:
        return self.input + self.output

    def __add__(self, other: TokenCounts) -> TokenCounts:
        return TokenCounts(self.input + other.input, self.output + other.output)


@dataclass(frozen=True)
class TokenBudget:
    """One ``maxToken`` policy: tokens per window of its granularity (None: that kind is not limited)."""

    policy: str
    granularity: str
    input: int | None = None
    output: int | None = None
    total: int | None = None

    def used_up(self, counts: TokenCounts) -> str | None:
        """Which of its limits ``counts`` has reached (for messages), or None while it has room."""
        for kind, limit, used in (("input", self.input, counts.input), ("output", self.output, counts.output),
                                  ("total", self.total, counts.total)):
            if limit is not None and used >= limit:
                return f"{used} of {limit} {kind} tokens this {self.granularity}"
        return None

    def describe(self) -> str:
        parts = [f"{limit} {kind}" for kind, limit in
                 (("input", self.input), ("output", self.output), ("total", self.total)) if limit is not None]
        return f"{', '.join(parts) or 'unlimited'} tokens per {self.granularity} (policy {self.policy})"


@dataclass(frozen=True)
class TokenLayer:
    """The budgets one party sets; any one of them with room lets a request through (union)."""

    owner: str  # 'environment "production"' or 'the deployment'
    budgets: tuple[TokenBudget, ...]


@dataclass(frozen=True)
class TokenLimits:
    """Every party's budgets; each party must have room (intersection)."""

    layers: tuple[TokenLayer, ...]

    @property
    def granularities(self) -> frozenset[str]:
        return frozenset(b.granularity for layer in self.layers for b in layer.budgets)

    def describe(self) -> str:
        return "; ".join(f"{layer.owner}: " + " or ".join(b.describe() for b in layer.budgets)
                         for layer in self.layers)

    def to_dict(self) -> list[dict[str, object]]:
        """The wire form (route table, API): a list of layers."""
        return [{"owner": layer.owner, "budgets": [
            {"policy": b.policy, "granularity": b.granularity, "input": b.input, "output": b.output,
             "total": b.total} for b in layer.budgets]} for layer in self.layers]

    @staticmethod
    def from_dict(data: object) -> TokenLimits:
        """The inverse of :meth:`to_dict`; raises ValueError on a malformed one."""
        if not isinstance(data, list):
            raise ValueError("token limits must be a list of layers")
        layers = []
        for layer in data:
            if not isinstance(layer, dict) or not isinstance(layer.get("budgets"), list):
                raise ValueError("a token limit layer needs budgets")
            budgets = []
            for b in layer["budgets"]:
                if not isinstance(b, dict) or b.get("granularity") not in GRANULARITIES:
                    raise ValueError(f"a token budget needs a granularity among {', '.join(GRANULARITIES)}")
                limits = {kind: b.get(kind) for kind in ("input", "output", "total")}
                for kind, value in limits.items():
                    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                        raise ValueError(f"a token budget's {kind} must be an integer >= 0, got {value!r}")
                budgets.append(TokenBudget(str(b.get("policy", "")), str(b["granularity"]), limits["input"],
                                           limits["output"], limits["total"]))
            if budgets:
                layers.append(TokenLayer(str(layer.get("owner", "")), tuple(budgets)))
        return TokenLimits(tuple(layers))


def token_limits(layers: Sequence[PolicyLayer]) -> TokenLimits | None:
    """The budgets of the ``maxToken`` policies of each layer; None when no layer sets any."""
    result = []
    for layer in layers:
        budgets = tuple(
            TokenBudget(p.metadata.name, p.spec.max_tokens.granularity, p.spec.max_tokens.input,
                        p.spec.max_tokens.output, p.spec.max_tokens.total)
            for p in layer.of_type("maxToken") if p.spec.max_tokens is not None)
        if budgets:
            result.append(TokenLayer(layer.owner, budgets))
    return TokenLimits(tuple(result)) if result else None


def window_start(granularity: str, now: float) -> float:
    """The start (epoch seconds) of the UTC calendar window of ``granularity`` that ``now`` is in."""
    seconds = _FIXED_SECONDS.get(granularity)
    if seconds is not None:
        return float(math.floor(now / seconds) * seconds)
    if granularity != "month":
        raise ValueError(f"unknown token granularity {granularity!r}")
    moment = datetime.fromtimestamp(now, UTC)
    return datetime(moment.year, moment.month, 1, tzinfo=UTC).timestamp()


def window_end(granularity: str, start: float) -> float:
    seconds = _FIXED_SECONDS.get(granularity)
    if seconds is not None:
        return start + seconds
    moment = datetime.fromtimestamp(start, UTC)
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return datetime(year, month, 1, tzinfo=UTC).timestamp()


# Per granularity: (the window's start, the tokens counted in it).
Usage = Mapping[str, tuple[float, TokenCounts]]


def current(usage: Usage, granularity: str, now: float) -> TokenCounts:
    """The tokens of ``usage`` in the window ``now`` is in (an older window counts nothing)."""
    counted = usage.get(granularity)
    if counted is None or counted[0] != window_start(granularity, now):
        return TokenCounts()
    return counted[1]


def add_usage(usage: Usage, counts: TokenCounts, now: float) -> dict[str, tuple[float, TokenCounts]]:
    """``usage`` with ``counts`` added to the current window of every granularity (older windows end)."""
    return {g: (window_start(g, now), current(usage, g, now) + counts) for g in GRANULARITIES}


def merge_usage(*usages: Usage, now: float) -> dict[str, tuple[float, TokenCounts]]:
    """The sum of several usages' current windows."""
    result: dict[str, tuple[float, TokenCounts]] = {}
    for g in GRANULARITIES:
        total = TokenCounts()
        for usage in usages:
            total = total + current(usage, g, now)
        result[g] = (window_start(g, now), total)
    return result


@dataclass(frozen=True)
class TokenVerdict:
    """A request refused: why, and in how many seconds a budget frees (``Retry-After``)."""

    retry_after: int
    message: str


def token_verdict(limits: TokenLimits, usage: Usage, now: float) -> TokenVerdict | None:
    """None while every layer has a budget with room; else the refusal.

    A refused request waits for each used-up layer to free one of its budgets: the soonest window
    end within a layer, the latest over the layers.
    """
    frees_at = now
    reasons = []
    for layer in limits.layers:
        ends = []
        why = []
        for budget in layer.budgets:
            used_up = budget.used_up(current(usage, budget.granularity, now))
            if used_up is None:
                break
            ends.append(window_end(budget.granularity, window_start(budget.granularity, now)))
            why.append(f"{used_up} (policy {budget.policy})")
        else:
            frees_at = max(frees_at, min(ends))
            reasons.append(f"{layer.owner}: " + " and ".join(why))
    if not reasons:
        return None
    retry_after = max(1, math.ceil(frees_at - now))
    return TokenVerdict(retry_after, "token limit reached for " + "; ".join(reasons) + f"; retry in {retry_after}s")


def estimated_tokens(body_bytes: int) -> int:
    """Tokens estimated from a body's size, when the response carries no ``usage``."""
    return math.ceil(body_bytes / BYTES_PER_TOKEN) if body_bytes > 0 else 0
