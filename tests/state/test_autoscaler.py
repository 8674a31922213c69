"""The serverless autoscaler (pure): load samples every 2 s in, replicas out, time driven explicitly.

Each scenario runs ``decide`` once per sample, the way the daemon would, with the running replicas
following the previous decision at once (as if every action applied instantly), and checks the
decision at chosen times. Defaults: stableWindow 60s, panicWindow 6s, panicThreshold 2,
scaleDownDelay 300s, scaleToZeroGrace 30s, target 10.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from modelfleet.state.autoscaler import ScaleDecision, ScalerMemory, _decide, decide
from modelfleet.state.demand import LoadSample
from modelfleet.state.loader import load_tree
from modelfleet.state.manifests import Serverless
from tests.state.helpers import custom_model, environment, examples, tree

EVERY = 2.0  # seconds between samples (demand.REPORT_INTERVAL)

# A load: t -> (concurrency, rps), or None for "no report at that time" (gateways silent).
Load = Callable[[float], tuple[float, float] | None]


def serverless(**fields: Any) -> Serverless:
    return Serverless.model_validate(fields)


def conc(f: Callable[[float], float]) -> Load:
    return lambda t: (f(t), f(t) / 2)


def steps(*points: tuple[float, float]) -> Load:
    """Concurrency by steps: [(from_t, value), ...] (sorted)."""
    def load(t: float) -> tuple[float, float]:
        value = 0.0
        for start, v in points:
            if t >= start:
                value = v
        return value, value / 2
    return load


def alternating(high: float, low: float) -> Load:
    return lambda t: (high, high / 2) if int(t // EVERY) % 2 == 0 else (low, low / 2)


def until(t_end: float, load: Load) -> Load:
    """``load`` until t_end, then the gateways stop reporting."""
    return lambda t: load(t) if t < t_end else None


@dataclass
class Run:
    decisions: dict[float, ScaleDecision] = field(default_factory=dict)

    def at(self, t: float) -> ScaleDecision:
        return self.decisions[t]

    def desired(self, start: float = -math.inf, end: float = math.inf) -> list[int]:
        return [d.desired for t, d in sorted(self.decisions.items()) if start <= t <= end]


def simulate(spec: Serverless, load: Load, *, end: float, current: int, warmup: float = 0.0,
             watching_since: float | None = None, limit: Callable[[float], int | None] = lambda t: None,
             memory: ScalerMemory | None = None) -> Run:
    """Samples every 2 s from -warmup (only recorded before 0), a decision every 2 s from 0 to end."""
    samples: list[LoadSample] = []
    last_arrival: float | None = None
    run = Run()
    t = -warmup
    while t <= end:
        figures = load(t)
        if figures is not None:
            concurrency, rps = figures
            if concurrency > 0 or rps > 0:
                last_arrival = t
            samples.append(LoadSample(
                at=t, concurrency=concurrency, rps=rps, queued=0, in_flight=math.ceil(concurrency),
                idle_seconds=None if last_arrival is None else t - last_arrival))
        if t >= 0:
            decision = decide(spec, samples, memory, t, current=current,
                              watching_since=-warmup if watching_since is None else watching_since,
                              limit=limit(t))
            run.decisions[t] = decision
            memory, current = decision.memory, decision.desired
        t += EVERY
    return run


@dataclass(frozen=True)
class Scenario:
    spec: dict[str, Any]
    load: Load
    current: int
    end: float
    expect: list[tuple[float, int]]  # (t, desired) checkpoints
    warmup: float = 120.0
    watching_since: float | None = None  # None: since the warm-up began
    limit: Callable[[float], int | None] = lambda t: None
    panicking: list[tuple[float, bool]] = field(default_factory=list)
    reasons: list[tuple[float, str]] = field(default_factory=list)
    bounds: tuple[int, int] | None = None  # every decision from t=0 within [lo, hi]


SCENARIOS = {
    "steady-load-keeps-its-count": Scenario(
        {"maxReplicas": 10}, steps((-1000, 25)), current=3, end=600,
        expect=[(0, 3), (300, 3), (600, 3)], bounds=(3, 3),
        reasons=[(100, "concurrency 25.0 over 60s / target 10 -> 3")]),
    "ramp-10-to-50-reaches-5": Scenario(
        {"maxReplicas": 8}, conc(lambda t: 10 + 40 * min(max(t, 0), 120) / 120), current=1, end=300,
        expect=[(0, 1), (240, 5), (300, 5)], bounds=(1, 5)),
    "ramp-10-to-50-stops-at-maxReplicas": Scenario(
        {"maxReplicas": 4}, conc(lambda t: 10 + 40 * min(max(t, 0), 120) / 120), current=1, end=300,
        expect=[(240, 4), (300, 4)], bounds=(1, 4),
        reasons=[(300, "limited to 4 by maxReplicas")]),
    # 5 in flight for 2 minutes, then 60: the 6 s window sees it within one sample.
    "burst-panics-and-scales-up-at-once": Scenario(
        {"maxReplicas": 10}, steps((-1000, 5), (120, 60)), current=1, end=200,
        expect=[(118, 1), (120, 3), (122, 5), (124, 6), (200, 6)],
        panicking=[(118, False), (120, True), (124, True)],
        reasons=[(120, "panic: concurrency 23.3 over 6s / target 10 -> 3 (>= 2 x 1 running)")]),
    # A 10 s burst: the panic holds 6 until the stable window passed without the panic condition
    # (last met at 120), then the delay holds it until the highest count wanted after the panic.
    "no-scale-down-while-panicking": Scenario(
        {"maxReplicas": 10}, steps((-1000, 5), (120, 60), (130, 5)), current=1, end=700,
        expect=[(124, 6), (140, 6), (178, 6), (180, 6), (476, 6), (478, 2), (482, 1), (700, 1)],
        panicking=[(178, True), (180, False)],
        reasons=[(400, "holding 6 until scaleDownDelay (78s left)")]),
    "flapping-input-high-low-every-2s": Scenario(
        {"maxReplicas": 10}, alternating(40, 0), current=2, end=600, expect=[(600, 2)], bounds=(2, 2)),
    "flapping-around-a-replica-boundary": Scenario(
        {"maxReplicas": 10}, alternating(25, 15), current=2, end=600, expect=[(600, 2)], bounds=(2, 2)),
    # 45 in flight (5 replicas), then 15 from t=100: the stable average falls below 50 at t=108,
    # below 40 at t=128 and below 30 at t=148: each step down comes scaleDownDelay after the last
    # time the higher count was wanted.
    "scale-down-only-after-scaleDownDelay": Scenario(
        {"maxReplicas": 10}, steps((-1000, 45), (100, 15)), current=5, end=700,
        expect=[(300, 5), (404, 5), (406, 4), (424, 4), (426, 3), (444, 3), (446, 2), (700, 2)],
        bounds=(2, 5), reasons=[(300, "holding 5 until scaleDownDelay (106s left)"),
                                (406, "below 5 for scaleDownDelay 300s -> 4")]),
    "shorter-scaleDownDelay-steps-down-sooner": Scenario(
        {"maxReplicas": 10, "scaleDownDelay": "30s"}, steps((-1000, 45), (100, 15)), current=5, end=300,
        expect=[(134, 5), (136, 4), (300, 2)]),
    # Last request at t=98: idle 30 s at t=128.
    "to-zero-after-scaleToZeroGrace": Scenario(
        {"minReplicas": 0, "maxReplicas": 3}, steps((-1000, 5), (100, 0)), current=1, end=400,
        expect=[(126, 1), (128, 0), (400, 0)],
        reasons=[(128, "idle 30s >= scaleToZeroGrace 30s -> 0"),
                 (200, "idle: scaled to zero")]),
    "longer-scaleToZeroGrace": Scenario(
        {"minReplicas": 0, "maxReplicas": 3, "scaleToZeroGrace": "2m"}, steps((-1000, 5), (100, 0)),
        current=1, end=400, expect=[(216, 1), (218, 0)]),
    "minReplicas-1-never-goes-to-zero": Scenario(
        {"minReplicas": 1, "maxReplicas": 3}, steps((-1000, 5), (100, 0)), current=1, end=1000,
        expect=[(1000, 1)], bounds=(1, 1)),
    "minReplicas-2-is-the-floor-of-a-scale-down": Scenario(
        {"minReplicas": 2, "maxReplicas": 5}, steps((-1000, 35), (100, 0)), current=4, end=1000,
        expect=[(300, 4), (1000, 2)], bounds=(2, 4), reasons=[(1000, "minReplicas 2")]),
    # Several replicas idle: they come down through scaleDownDelay (3 was last wanted at t=108, 2 at
    # t=132, as the stable average fell); the last one goes at once since it has been idle for
    # longer than scaleToZeroGrace by then.
    "idle-from-three-goes-to-zero-after-the-delay": Scenario(
        {"minReplicas": 0, "maxReplicas": 5}, steps((-1000, 25), (100, 0)), current=3, end=600,
        expect=[(128, 3), (406, 3), (408, 2), (430, 2), (432, 0), (600, 0)], bounds=(0, 3)),
    "host-down-mid-scale-limit-4-to-2": Scenario(
        {"maxReplicas": 8}, steps((-1000, 5), (10, 40)), current=1, end=400,
        limit=lambda t: 4 if t < 200 else 2 if t < 300 else 6,
        expect=[(198, 4), (200, 2), (298, 2), (300, 4)],
        reasons=[(200, "limited to 2 by capacity and policies")]),
    "limit-below-minReplicas-wins": Scenario(
        {"minReplicas": 3, "maxReplicas": 8}, steps((-1000, 5)), current=3, end=20,
        limit=lambda t: 2, expect=[(0, 2), (20, 2)]),
    # Daemon restart: no memory, reports only since t=0. Scaling down waits the whole delay.
    "daemon-restart-holds-scale-down": Scenario(
        {"maxReplicas": 8}, steps((-1000, 5)), current=5, end=400, warmup=0, watching_since=0,
        expect=[(0, 5), (58, 5), (298, 5), (300, 1)],
        reasons=[(58, "holding 5 until scaleDownDelay (242s left)")]),
    "daemon-restart-watches-the-stable-window-even-without-delay": Scenario(
        {"maxReplicas": 8, "scaleDownDelay": "0s"}, steps((-1000, 5)), current=5, end=100, warmup=0,
        watching_since=0, expect=[(0, 5), (58, 5), (60, 1)]),
    "daemon-restart-scales-up-at-once": Scenario(
        {"maxReplicas": 8}, steps((-1000, 70)), current=1, end=20, warmup=0, watching_since=0,
        expect=[(0, 7)]),
    "daemon-restart-silent-gateways-to-zero-after-grace": Scenario(
        {"minReplicas": 0, "maxReplicas": 3}, lambda t: None, current=1, end=100, warmup=0, watching_since=0,
        expect=[(0, 1), (28, 1), (30, 0), (100, 0)],
        reasons=[(30, "no traffic reported for 30s >= scaleToZeroGrace 30s -> 0")]),
    # The gateway reports 5 in flight until t=48, then nothing: its load stops counting after
    # REPORT_STALE_AFTER (t=60), and the grace runs from its last report.
    "gateways-gone-silent-count-as-no-traffic": Scenario(
        {"minReplicas": 0, "maxReplicas": 3}, until(50, steps((-1000, 5))), current=1, end=200,
        expect=[(58, 1), (76, 1), (78, 0)]),
    "rps-metric-scales-on-rps": Scenario(
        {"maxReplicas": 10, "metric": "rps", "target": 5}, lambda t: (1.0, 22.0), current=5, end=100,
        expect=[(0, 5), (100, 5)], bounds=(5, 5), reasons=[(100, "rps 22.0 over 60s / target 5 -> 5")]),
    "rps-metric-ignores-concurrency": Scenario(
        {"maxReplicas": 10, "metric": "rps", "target": 5}, lambda t: (80.0, 4.0), current=1, end=100,
        expect=[(100, 1)], bounds=(1, 1)),
}


@pytest.mark.parametrize("name", list(SCENARIOS), ids=list(SCENARIOS))
def test_scenario(name: str) -> None:
    case = SCENARIOS[name]
    run = simulate(serverless(**case.spec), case.load, end=case.end, current=case.current,
                   warmup=case.warmup, watching_since=case.watching_since, limit=case.limit)
    got = [(t, run.at(t).desired) for t, _ in case.expect]
    assert got == case.expect, [(t, run.at(t).reason) for t, _ in case.expect]
    for t, panicking in case.panicking:
        assert run.at(t).panicking is panicking, (t, run.at(t).reason)
    for t, text in case.reasons:
        assert text in run.at(t).reason, (t, run.at(t).reason)
    if case.bounds is not None:
        values = run.desired()
        assert case.bounds[0] <= min(values) and max(values) <= case.bounds[1], values


def changes(values: list[int]) -> list[tuple[int, int]]:
    return [(a, b) for a, b in itertools.pairwise(values) if a != b]


def test_flapping_input_from_a_cold_start_goes_up_once_and_down_once() -> None:
    # Without warm-up the first samples panic; the count goes up once, then comes down once to
    # the stable figure, and never alternates.
    run = simulate(serverless(maxReplicas=10), alternating(40, 0), end=900, current=2, warmup=0)
    values = run.desired()
    assert len(changes(values)) <= 2 and values[-1] == 2, changes(values)


def test_slowly_flapping_input_does_not_make_desired_flap() -> None:
    # 30 in flight for 20 s, 10 for 20 s: the stable average swings between 16.7 and 23.3, so the
    # wanted count alternates 2 <-> 3 every 20 s; the scale-down delay keeps 3.
    load = conc(lambda t: 30.0 if int(t // 20) % 2 == 0 else 10.0)
    run = simulate(serverless(maxReplicas=10), load, end=1200, current=2)
    wanted = {d.reason.split("-> ")[1].split(";")[0] for d in run.decisions.values()}
    assert wanted == {"2", "3"}  # the input does flap
    assert len(changes(run.desired())) <= 1 and run.desired()[-1] == 3, changes(run.desired())


def test_the_panic_window_during_a_panic_never_lowers_the_count() -> None:
    # A burst that rises and falls inside the panic: the count only goes up while panicking.
    load = conc(lambda t: 5 if t < 100 else 80 if t < 110 else 30 if t < 150 else 5)
    run = simulate(serverless(maxReplicas=10), load, end=300, current=1)
    during = [d.desired for t, d in sorted(run.decisions.items()) if d.panicking]
    assert during and during == sorted(during) and max(during) == 8


def sample(at: float, concurrency: float = 0.0, *, rps: float = 0.0, queued: int = 0, in_flight: int = 0,
           idle: float | None = None) -> LoadSample:
    return LoadSample(at=at, concurrency=concurrency, rps=rps, queued=queued, in_flight=in_flight,
                      idle_seconds=idle)


def scaled_to_zero(spec: Serverless, now: float) -> ScalerMemory:
    """The memory of a deployment that went to zero long ago."""
    decision = decide(spec, [sample(now - 4, idle=500)], None, now - 2, current=0, watching_since=now - 1000)
    assert decision.desired == 0 and decision.reason == "idle: scaled to zero"
    return decision.memory


def test_activation_from_zero_on_a_queued_request() -> None:
    spec = serverless(minReplicas=0, maxReplicas=4)
    memory = scaled_to_zero(spec, 1000)
    decision = decide(spec, [sample(996, idle=500), sample(1000, queued=2, in_flight=2, idle=0)], memory, 1000,
                      current=0, watching_since=0)
    assert decision.desired == 1
    assert decision.reason == "2 requests queued -> 1 (activation)"


def test_activation_under_load_scales_to_the_load_at_once() -> None:
    spec = serverless(minReplicas=0, maxReplicas=4)
    memory = scaled_to_zero(spec, 1000)
    decision = decide(spec, [sample(1000, 25.0, queued=25, in_flight=25, idle=0)], memory, 1000,
                      current=0, watching_since=0)
    assert (decision.desired, decision.panicking) == (3, True)


def test_a_stale_queued_report_does_not_activate() -> None:
    # The gateway that held those requests has not reported for longer than REPORT_STALE_AFTER.
    spec = serverless(minReplicas=0, maxReplicas=4)
    memory = scaled_to_zero(spec, 1000)
    decision = decide(spec, [sample(980, queued=2, in_flight=2, idle=0)], memory, 1000, current=0,
                      watching_since=0)
    assert decision.desired == 0


def test_scaled_to_zero_without_traffic_stays_zero() -> None:
    spec = serverless(minReplicas=0, maxReplicas=4)
    memory = scaled_to_zero(spec, 1000)
    for now in (1000.0, 1002.0, 5000.0):
        decision = decide(spec, [sample(now - 1, idle=900)], memory, now, current=0, watching_since=0)
        assert (decision.desired, decision.reason) == (0, "idle: scaled to zero")
        memory = decision.memory


def test_samples_older_than_the_stable_window_are_ignored() -> None:
    spec = serverless(minReplicas=1, maxReplicas=10)
    old = [sample(t, 500.0, in_flight=500, idle=0) for t in (0.0, 2.0, 4.0)]
    recent = [sample(100.0, 15.0, in_flight=15, idle=0)]
    decision = decide(spec, old + recent, None, 100.0, current=2, watching_since=0)
    assert (decision.desired, decision.value) == (2, 15.0)
    only_old = decide(spec, old, None, 100.0, current=0, watching_since=0)
    assert (only_old.desired, only_old.value) == (1, 0.0)


def test_scale_down_with_minReplicas_0_keeps_one_while_there_is_traffic() -> None:
    # Wanted 0 (nothing in flight on average) but a request arrived 5 s ago: not idle for the grace.
    spec = serverless(minReplicas=0, maxReplicas=4, scaleDownDelay="0s")
    decision = decide(spec, [sample(1000, 0.0, idle=5)], None, 1000, current=2, watching_since=0)
    assert decision.desired == 1
    assert "keeping 1 until scaleToZeroGrace (25s left)" in decision.reason


def test_in_flight_requests_block_scale_to_zero() -> None:
    # A long request: no arrival for 10 minutes, but one is still in flight.
    spec = serverless(minReplicas=0, maxReplicas=4)
    decision = decide(spec, [sample(1000, 1.0, in_flight=1, idle=600)], None, 1000, current=1, watching_since=0)
    assert decision.desired == 1


def test_memory_records_what_the_next_pass_needs() -> None:
    spec = serverless(maxReplicas=10)
    first = decide(spec, [sample(10, 30.0, in_flight=30, idle=0)], None, 10, current=3, watching_since=0)
    assert first.memory == ScalerMemory(since=10, desired=3, last_change_at=10, wanted=((10, 3),),
                                        panic_since=None, panic_until=None, panic_peak=0, below_since=None)
    second = decide(spec, [sample(10, 30.0, in_flight=30, idle=0), sample(12, 5.0, in_flight=5, idle=0)],
                    first.memory, 12, current=3, watching_since=0)
    # The stable average (17.5) wants 2 < 3 since t=12: held by the delay, remembered as such.
    assert second.desired == 3 and second.memory.last_change_at == 10
    assert second.memory.wanted == ((10, 3), (12, 2)) and second.memory.below_since == 10


@settings(max_examples=examples(200), deadline=None)
@given(min_replicas=st.integers(0, 4), extra=st.integers(0, 6), current=st.integers(0, 12),
       limit=st.one_of(st.none(), st.integers(0, 12)),
       loads=st.lists(st.tuples(st.floats(0, 500), st.integers(0, 20)), max_size=40))
def test_desired_stays_within_min_max_and_limit(min_replicas: int, extra: int, current: int, limit: int | None,
                                                loads: list[tuple[float, int]]) -> None:
    spec = serverless(minReplicas=min_replicas, maxReplicas=max(1, min_replicas + extra))
    top = spec.max_replicas if limit is None else min(spec.max_replicas, limit)
    samples: list[LoadSample] = []
    memory: ScalerMemory | None = None
    for i, (concurrency, queued) in enumerate(loads):
        now = 2.0 * i
        samples.append(sample(now, concurrency, queued=queued, in_flight=queued, idle=0 if concurrency else 40))
        decision = decide(spec, samples, memory, now, current=current, watching_since=0, limit=limit)
        assert min(spec.min_replicas, top) <= decision.desired <= top
        memory, current = decision.memory, decision.desired


@settings(max_examples=examples(300), deadline=None)
@given(min_replicas=st.integers(0, 2), desired=st.integers(0, 3), now=st.floats(0, 500),
       watching_since=st.floats(0, 500), since=st.floats(0, 500),
       wanted=st.lists(st.tuples(st.floats(0, 500), st.integers(0, 3)), max_size=3),
       panic_since=st.one_of(st.none(), st.floats(0, 500)), panic_until=st.one_of(st.none(), st.floats(0, 500)),
       panic_peak=st.integers(0, 2), limit=st.one_of(st.none(), st.integers(0, 4)),
       last_change_at=st.one_of(st.none(), st.floats(0, 500)), below_since=st.one_of(st.none(), st.floats(0, 500)))
def test_the_shortcut_for_a_deployment_resting_at_zero_decides_as_the_full_rules(
        min_replicas: int, desired: int, now: float, watching_since: float, since: float,
        wanted: list[tuple[float, int]], panic_since: float | None, panic_until: float | None, panic_peak: int,
        limit: int | None, last_change_at: float | None, below_since: float | None) -> None:
    spec = serverless(minReplicas=min_replicas, maxReplicas=4)
    memory = ScalerMemory(since=since, desired=desired, last_change_at=last_change_at,
                          wanted=tuple(sorted(wanted)), panic_since=panic_since, panic_until=panic_until,
                          panic_peak=panic_peak, below_since=below_since)
    assert decide(spec, [], memory, now, current=0, watching_since=watching_since, limit=limit) == \
        _decide(spec, [], memory, now, current=0, watching_since=watching_since, limit=limit)


# --- the manifest fields ------------------------------------------------------------------------------


def test_defaults_are_documented_and_do_not_flap() -> None:
    spec = serverless()
    assert (spec.min_replicas, spec.max_replicas, spec.metric, spec.target) == (0, 1, "concurrency", 10)
    assert (spec.scale_down_delay, spec.scale_to_zero_grace, spec.stable_window, spec.panic_window) == (
        300.0, 30.0, 60.0, 6.0)
    assert (spec.panic_threshold, spec.queue, spec.activation_timeout) == (2.0, 100, 60.0)


def test_durations_accept_units() -> None:
    spec = serverless(scaleToZeroGrace="2m", stableWindow="90s", panicWindow="1500ms", activationTimeout="1m30s")
    assert (spec.scale_to_zero_grace, spec.stable_window, spec.panic_window, spec.activation_timeout) == (
        120.0, 90.0, 1.5, 90.0)


INVALID: dict[str, tuple[dict[str, Any], str]] = {
    "min-above-max": ({"minReplicas": 3, "maxReplicas": 2}, "minReplicas must not exceed serverless.maxReplicas"),
    "panic-window-not-shorter": ({"panicWindow": "60s", "stableWindow": "60s"},
                                 "panicWindow (60s) must be shorter than serverless.stableWindow (60s)"),
    "panic-window-below-1s": ({"panicWindow": "500ms"}, "panicWindow must be at least 1s"),
    "stable-window-above-1h": ({"stableWindow": "2h"}, "stableWindow must be at most 1h"),
    "panic-threshold-1": ({"panicThreshold": 1}, "panicThreshold must be more than 1"),
    "grace-0": ({"scaleToZeroGrace": 0}, "scaleToZeroGrace must be at least 1s"),
    "activation-timeout-0": ({"activationTimeout": "0s"}, "activationTimeout must be more than 0"),
    "queue-0": ({"queue": 0}, "greater than or equal to 1"),
    "queue-too-big": ({"queue": 100001}, "less than or equal to 100000"),
    "negative-duration": ({"scaleDownDelay": -1}, "must not be negative"),
    "unknown-field": ({"panicTreshold": 3}, "Extra inputs are not permitted"),
}


@pytest.mark.parametrize("name", list(INVALID), ids=list(INVALID))
def test_invalid_serverless_fields_say_the_fix(name: str) -> None:
    fields, message = INVALID[name]
    with pytest.raises(ValidationError) as raised:
        serverless(**fields)
    assert message in str(raised.value)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ValidationError) as raised:
        serverless(panicWindow="100s", panicThreshold=0.5)
    text = str(raised.value)
    assert "panicWindow (100s) must be shorter" in text and "panicThreshold must be more than 1" in text


def test_a_bad_serverless_field_in_a_manifest_names_file_line_and_field() -> None:
    files = tree(**{"environments.yaml": environment("production"), "m.yaml": custom_model("m", """
        environment: production
        runtime: {type: custom, image: x}
        serverless:
          maxReplicas: 3
          stableWindow: 5s""")})
    errors = load_tree(files).all_errors()
    assert [str(e) for e in errors] == [
        "m.yaml:8: spec.deployments[0].serverless: serverless.panicWindow (6s) must be shorter than "
        "serverless.stableWindow (5s): e.g. panicWindow 6s, stableWindow 60s"]
