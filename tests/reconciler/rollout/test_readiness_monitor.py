"""The readiness monitor between passes: probes what the last plan checked, writes what
state/readiness.py judges (routes, failure counts) to the store, and waits for a pass that holds it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from modelfleet.reconciler.daemon.store import FACT_PROBE_FAILURES, Store
from modelfleet.reconciler.rollout.readiness import ReadinessMonitor
from modelfleet.state.readiness import ReadinessCheck, ReadinessVerdict, failure_key

URL = "http://10.0.0.2:32768"
CHECK = ReadinessCheck("h0", "c0", "id0", URL, URL + "/ping", False, ready=True, failure_threshold=3,
                       period=1.0, model="m", environment="production")


class Answers:
    def __init__(self) -> None:
        self.answer = True
        self.asked = 0

    def probe_all(self, checks: Sequence[ReadinessCheck]) -> dict[tuple[str, str], bool]:
        self.asked += len(checks)
        return {(c.host, c.name): self.answer for c in checks}


def _monitor(tmp_path: Path) -> tuple[ReadinessMonitor, Store, Answers, list[ReadinessVerdict], list[float]]:
    store = Store(tmp_path)
    store.record_intent("h0", "c0", "m", "production", 0, "s", "r")
    store.record_created("h0", "c0", "id0", URL, URL + "/ping")
    store.set_ready("h0", "c0", True)
    answers, changes, now = Answers(), list[ReadinessVerdict](), [100.0]
    monitor = ReadinessMonitor(store, lambda: [CHECK], changes.append, lambda: answers, clock=lambda: now[0])
    return monitor, store, answers, changes, now


def test_a_ready_replica_leaves_after_the_threshold_and_comes_back(tmp_path: Path) -> None:
    monitor, store, answers, changes, now = _monitor(tmp_path)
    answers.answer = False
    for expected in (1, 2):
        assert monitor.step() is not None
        assert store.fact(FACT_PROBE_FAILURES) == {failure_key("h0", "id0"): expected}
        assert store.inventory()[0].ready and not changes
        now[0] += 1.0
    monitor.step()
    assert not store.inventory()[0].ready and len(changes) == 1
    assert store.fact(FACT_PROBE_FAILURES) == {}
    now[0] += 1.0
    answers.answer = True
    monitor.step()
    assert store.inventory()[0].ready and len(changes) == 2
    store.close()


def test_each_replica_is_probed_once_per_period(tmp_path: Path) -> None:
    monitor, store, answers, _, now = _monitor(tmp_path)
    monitor.step()
    assert monitor.step() is None and answers.asked == 1  # not due yet
    now[0] += 1.0
    monitor.step()
    assert answers.asked == 2
    store.close()


def test_the_monitor_skips_while_a_pass_holds_its_lock(tmp_path: Path) -> None:
    monitor, store, answers, _, _ = _monitor(tmp_path)
    with monitor.lock:
        assert monitor.step() is None
    assert answers.asked == 0
    store.close()


def test_a_replaced_container_is_not_probed(tmp_path: Path) -> None:
    monitor, store, answers, _, _ = _monitor(tmp_path)
    store.record_created("h0", "c0", "other-id", URL, URL + "/ping")
    assert monitor.step() is None and answers.asked == 0
    store.close()
