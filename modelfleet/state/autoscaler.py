"""The serverless autoscaler: how many replicas a serverless deployment should run (Knative KPA's shape).

Pure: the load samples (``state/demand.py``), the clock, what runs now and what the autoscaler
remembered last time go in; a ``ScaleDecision`` (with the memory for next time) comes out. The
daemon keeps the memory in its own memory and calls ``decide`` once per deployment and pass.

The rules, for a spec ``s`` (``manifests.Serverless``):

- wanted = ceil(average of the metric over ``s.stable_window`` / ``s.target``) (0 without samples);
- *panic*: when the average over ``s.panic_window`` wants at least ``s.panic_threshold`` x the running
  replicas (any load when none runs), the count follows the panic window at once and never goes
  down; the panic ends once ``s.stable_window`` has passed without that condition;
- requests queued while nothing runs: at least 1, at once (activation);
- a lower non-zero count is applied only once the wanted count has stayed below the running one
  for ``s.scale_down_delay``, and then to the highest count wanted during that delay (a sliding
  maximum, as KPA's scale-down delay); while that is not so, what runs is held;
- 0 only with ``s.min_replicas`` 0, once what remains is at most one replica and there was no
  traffic at all for ``s.scale_to_zero_grace`` (no request arrived, none in flight, none queued; a
  silence of every gateway counts as no traffic). Idleness ends a panic;
- after a daemon restart (``watching_since``: when load reports started coming in) nothing scales
  down before ``s.stable_window``, nor to zero before ``s.scale_to_zero_grace``, has been watched;
  a ``memory`` of None also restarts the scale-down delay. Scaling up is never held back;
- the result is clamped to ``[min_replicas, min(max_replicas, limit)]``, minReplicas included in the
  limit: what capacity and policies allow wins at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from modelfleet.state.demand import REPORT_STALE_AFTER, LoadSample
from modelfleet.state.manifests import Serverless

# ceil() of a ratio that is an integer up to float noise (30.000000001 / 10) stays that integer.
_SLACK = 1e-9


@dataclass(frozen=True)
class ScalerMemory:
    """What the autoscaler remembers of one deployment between passes."""

    since: float  # when this memory began (the first decide without memory): the scale-down delay counts from here
    desired: int = 0  # the last decision
    last_change_at: float | None = None  # when desired last changed (the first decision counts)
    # (at, wanted) over the last scaleDownDelay as a sliding maximum: wanted strictly decreasing, each
    # entry the last time a count at least that high was wanted. wanted[0][1] is the window's maximum.
    wanted: tuple[tuple[float, int], ...] = ()
    panic_since: float | None = None  # when the current panic began (None: not panicking)
    panic_until: float | None = None  # the panic ends then unless its condition holds again
    panic_peak: int = 0  # the highest count wanted during the current panic (0: not panicking)
    below_since: float | None = None  # since when the wanted count is below what runs (None: it is not)


@dataclass(frozen=True)
class ScaleDecision:
    desired: int  # replicas that should run (0..maxReplicas)
    reason: str  # a short human sentence
    metric: str  # "concurrency" | "rps"
    value: float  # the metric value the decision used (the stable or the panic average)
    panicking: bool
    memory: ScalerMemory


def decide(spec: Serverless, samples: Sequence[LoadSample], memory: ScalerMemory | None, now: float, *,
           current: int, watching_since: float, limit: int | None = None) -> ScaleDecision:
    """How many replicas should run now. ``samples``: this deployment's, oldest first (older than the
    stable window ignored); ``current``: replicas running (ready or starting); ``limit``: the most
    capacity and policies allow (None: no limit)."""
    if not samples and current <= 0 and memory is not None:
        resting = _still_at_zero(spec, memory, now, limit)
        if resting is not None:
            return resting
    return _decide(spec, samples, memory, now, current=current, watching_since=watching_since, limit=limit)


def _still_at_zero(spec: Serverless, memory: ScalerMemory, now: float, limit: int | None) -> ScaleDecision | None:
    """The decision of ``_decide`` for a deployment at zero that stays there (no samples at all,
    nothing runs, it was 0 already, no panic, nothing wanted within the delay), without its
    arithmetic and sentences: most serverless deployments of a pass are such, and a pass of a
    large fleet decides each of them. None: not that case."""
    top = spec.max_replicas if limit is None else min(spec.max_replicas, limit)
    if (spec.min_replicas != 0 or top < 1 or memory.desired != 0 or memory.panic_since is not None
            or memory.panic_until is not None or memory.panic_peak or any(count for _, count in memory.wanted)):
        return None
    return ScaleDecision(
        desired=0, reason="idle: scaled to zero", metric=spec.metric, value=0.0, panicking=False,
        memory=ScalerMemory(since=memory.since, desired=0, last_change_at=memory.last_change_at,
                            wanted=((now, 0),)))


def _decide(spec: Serverless, samples: Sequence[LoadSample], memory: ScalerMemory | None, now: float, *,
            current: int, watching_since: float, limit: int | None = None) -> ScaleDecision:
    current = max(0, current)
    since = memory.since if memory is not None else now
    previous = memory.desired if memory is not None else current
    top = spec.max_replicas if limit is None else max(0, min(spec.max_replicas, limit))
    bottom = min(spec.min_replicas, top)
    watched = now - watching_since

    stable_value, panic_value = _averages(samples, now, spec.stable_window, spec.panic_window, spec.metric)
    want_stable = _replicas(stable_value, spec.target)
    want_panic = _replicas(panic_value, spec.target)
    latest = samples[-1] if samples else None
    fresh = latest is not None and now - latest.at <= REPORT_STALE_AFTER
    queued = latest.queued if latest is not None and fresh else 0

    # Panic: the short window says the running replicas are far too few.
    # (Any load at all when nothing runs.)
    over = want_panic >= spec.panic_threshold * current if current >= 1 else (want_panic >= 1 or queued > 0)
    panic_since = memory.panic_since if memory is not None else None
    panic_until = memory.panic_until if memory is not None else None
    peak = memory.panic_peak if memory is not None else 0
    if over:
        if panic_since is None:
            panic_since, peak = now, max(previous, current)
        panic_until = now + spec.stable_window
    elif panic_since is not None and (panic_until is None or now >= panic_until):
        panic_since, panic_until, peak = None, None, 0
    panicking = panic_since is not None

    if panicking:
        peak = min(max(peak, want_panic, want_stable), spec.max_replicas)
        wanted, value = peak, panic_value
        why = (f"panic: {spec.metric} {panic_value:.1f} over {_secs(spec.panic_window)} / target "
               f"{spec.target:g} -> {want_panic}")
        if over:
            why += f" (>= {spec.panic_threshold:g} x {current} running)"
        if peak > want_panic:
            why += f"; not below {peak} until the panic ends"
        if not over and panic_until is not None:
            why += f"; the panic ends in {panic_until - now:.0f}s without a burst"
    else:
        wanted, value = min(want_stable, spec.max_replicas), stable_value
        why = (f"{spec.metric} {stable_value:.1f} over {_secs(spec.stable_window)} / target "
               f"{spec.target:g} -> {want_stable}")
        if want_stable > spec.max_replicas:
            why += f"; limited to {spec.max_replicas} by maxReplicas"
    if current == 0 and queued > 0 and wanted < 1:
        wanted = 1
        why = f"{queued} request{'s' if queued != 1 else ''} queued -> 1 (activation)"

    step = ""  # what the delay, the bounds and the grace did to the count wanted
    # Scale-down delay: the highest count wanted over the last scaleDownDelay.
    history = _slide(memory.wanted if memory is not None else (), now, wanted, spec.scale_down_delay)
    window_max = history[0][1]
    last_high = next((at for at, count in reversed(history) if count >= current), None)
    if wanted >= current:
        below_since = None
    elif last_high is not None:
        below_since = last_high
    elif memory is not None and memory.below_since is not None:
        below_since = memory.below_since
    else:
        below_since = since
    # Scaling down needs the whole delay remembered, and the stable window watched since a restart.
    ready_at = max(since + spec.scale_down_delay, watching_since + spec.stable_window)
    if window_max >= current:
        target = window_max
        if wanted < current and target == current:
            left = max(ready_at, (last_high or now) + spec.scale_down_delay) - now
            step = f"holding {current} until scaleDownDelay ({left:.0f}s left)"
        elif target > max(current, wanted):
            step = f"{target} wanted within scaleDownDelay {_secs(spec.scale_down_delay)}"
    else:
        if now >= ready_at:
            target = window_max
            if target >= 1:
                step = f"below {current} for scaleDownDelay {_secs(spec.scale_down_delay)} -> {target}"
        else:
            target = current
            step = f"holding {current} until scaleDownDelay ({ready_at - now:.0f}s left)"

    bounded = ""
    if target < bottom:
        target = bottom
        bounded = f"minReplicas {spec.min_replicas}"
    if target > top:
        target = top
        bounded = f"limited to {top} by {'maxReplicas' if top == spec.max_replicas else 'capacity and policies'}"

    # Zero: only the last replica, only after scaleToZeroGrace without traffic.
    if spec.min_replicas == 0:
        idle, silent = _idle_for(latest, now)
        quiet = idle >= spec.scale_to_zero_grace and watched >= spec.scale_to_zero_grace
        if target <= 1 and quiet:
            if current == 0 and previous == 0:
                why = "idle: scaled to zero"
            elif silent:
                why = (f"no traffic reported for {_secs(min(idle, watched))} >= scaleToZeroGrace "
                       f"{_secs(spec.scale_to_zero_grace)} -> 0")
            else:
                why = (f"idle {_secs(min(idle, watched))} >= scaleToZeroGrace "
                       f"{_secs(spec.scale_to_zero_grace)} -> 0")
            target, panicking = 0, False
            panic_since, panic_until, peak = None, None, 0
            history, below_since, step, bounded = ((now, 0),), None, "", ""
        elif target <= 1 and wanted == 0 and top >= 1 and max(current, previous) >= 1:
            # The last replica goes by scaleToZeroGrace alone (not by scaleDownDelay).
            target = 1
            left = max(spec.scale_to_zero_grace - idle, watching_since + spec.scale_to_zero_grace - now)
            step = f"keeping 1 until scaleToZeroGrace ({left:.0f}s left)"
        elif target == 0 and top >= 1:
            why = "idle: scaled to zero"
    why = "; ".join(part for part in (why, step, bounded) if part)

    changed = memory is None or target != memory.desired
    last_change_at = now if changed else memory.last_change_at if memory is not None else None
    return ScaleDecision(
        desired=target, reason=why, metric=spec.metric, value=value, panicking=panicking,
        memory=ScalerMemory(since=since, desired=target, last_change_at=last_change_at, wanted=history,
                            panic_since=panic_since, panic_until=panic_until, panic_peak=peak,
                            below_since=below_since))


def _averages(samples: Sequence[LoadSample], now: float, stable: float, panic: float,
              metric: str) -> tuple[float, float]:
    """The metric's mean over the stable and the panic window, in one walk over the samples
    (most deployments of a pass have none: a serverless fleet is mostly idle)."""
    if not samples:
        return 0.0, 0.0
    rps = metric == "rps"
    stable_sum = panic_sum = 0.0
    stable_n = panic_n = 0
    stable_from, panic_from = now - stable, now - panic
    for sample in samples:
        if sample.at > stable_from or sample.at > panic_from:
            value = sample.rps if rps else sample.concurrency
            if sample.at > stable_from:
                stable_sum += value
                stable_n += 1
            if sample.at > panic_from:
                panic_sum += value
                panic_n += 1
    return (stable_sum / stable_n if stable_n else 0.0), (panic_sum / panic_n if panic_n else 0.0)


def _replicas(value: float, target: float) -> int:
    return max(0, math.ceil(value / target - _SLACK))


def _slide(history: tuple[tuple[float, int], ...], now: float, wanted: int,
           window: float) -> tuple[tuple[float, int], ...]:
    """Add ``wanted`` at ``now`` to a sliding maximum over ``window`` seconds."""
    kept = [(at, count) for at, count in history if at > now - window and count > wanted]
    return (*kept, (now, wanted))


def _idle_for(latest: LoadSample | None, now: float) -> tuple[float, bool]:
    """Seconds without any traffic as the samples tell, and whether the gateways have gone silent.
    A gateway silent for REPORT_STALE_AFTER is gone: its last load no longer counts."""
    if latest is None:
        return math.inf, True
    age = max(0.0, now - latest.at)
    silent = age > REPORT_STALE_AFTER
    if latest.in_flight > 0 or latest.queued > 0:
        return (age if silent else 0.0), silent
    if latest.idle_seconds is None:
        return math.inf, silent
    return latest.idle_seconds + age, silent


def _secs(seconds: float) -> str:
    return "never" if math.isinf(seconds) else f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:g}s"
