"""Readiness of the replicas that run (state/readiness.py): the readiness monitor's verdicts
(failureThreshold), and the plan of a pass after a dockerd restart (a port that changed)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from modelfleet.state.actual import ObservedReplica
from modelfleet.state.inventory import InventoryRow
from modelfleet.state.loader import Catalog, load_tree
from modelfleet.state.outcome import deployment_statuses
from modelfleet.state.planning import Plan, PlanInputs, plan
from modelfleet.state.readiness import (
    ReadinessCheck,
    failure_key,
    failures_after,
    judge,
    refreshed,
    with_verdict,
)
from tests.state.helpers import custom_model, environment, host, tree

# --- the verdict on one answer: a table ------------------------------------------------------------

# (ready now, failures so far, failureThreshold, URLs moved, answered) ->
#     (written ready, out of the routes, failures to remember, unanswered)
VERDICTS: dict[str, tuple[tuple[bool, int, int, bool, bool], tuple[bool, bool, int | None, bool]]] = {
    "ready-answers-stays-as-is": ((True, 0, 3, False, True), (False, False, None, False)),
    "ready-answers-after-failures-resets-them": ((True, 2, 3, False, True), (False, False, None, False)),
    "ready-first-failure-counts-one-stays-routed": ((True, 0, 3, False, False), (False, False, 1, False)),
    "ready-second-failure-of-three-stays-routed": ((True, 1, 3, False, False), (False, False, 2, False)),
    "ready-third-failure-of-three-leaves": ((True, 2, 3, False, False), (False, True, None, True)),
    "threshold-one-leaves-at-once": ((True, 0, 1, False, False), (False, True, None, True)),
    "count-above-threshold-leaves": ((True, 7, 3, False, False), (False, True, None, True)),
    "not-ready-answers-comes-back": ((False, 0, 3, False, True), (True, False, None, False)),
    "not-ready-fails-stays-out-uncounted": ((False, 0, 3, False, False), (False, False, None, True)),
    "moved-ready-answers-at-new-port-is-rewritten": ((True, 0, 3, True, True), (True, False, None, False)),
    "moved-ready-fails-leaves-at-once": ((True, 0, 3, True, False), (False, True, None, True)),
    "moved-not-ready-answers-gets-urls": ((False, 0, 3, True, True), (True, False, None, False)),
}


def _check(ready: bool = True, failures: int = 0, threshold: int = 3, moved: bool = False,
           name: str = "c0", container_id: str = "id0") -> ReadinessCheck:
    return ReadinessCheck("h0", name, container_id, "http://10.0.0.2:32768", "http://10.0.0.2:32768/ping", moved,
                          ready=ready, failures=failures, failure_threshold=threshold, model="m",
                          environment="production", replica=0)


@pytest.mark.parametrize("case", list(VERDICTS))
def test_verdict_on_one_answer(case: str) -> None:
    (ready, failures, threshold, moved, answered), (written, out, remembered, unanswered) = VERDICTS[case]
    check = _check(ready, failures, threshold, moved)
    verdict = judge([check], {("h0", "c0"): answered})
    assert bool(verdict.ready) == written
    if written:
        assert verdict.ready[0].fill_urls == moved and verdict.ready[0].url == check.url
    assert (("h0", "c0") in verdict.unready) == out
    assert verdict.failures.get(check.key) == remembered
    assert bool(verdict.unanswered) == unanswered
    assert verdict.changed == (written or out)
    if out:
        assert "out of the routes" in verdict.why[check.key] or "another port" in verdict.why[check.key]


def test_a_missing_answer_is_a_failed_probe() -> None:
    verdict = judge([_check(failures=2)], {})
    assert verdict.unready == (("h0", "c0"),)


# --- consecutive failures over passes ----------------------------------------------------------------

# Answers of one replica, pass after pass (True: 2xx) -> whether it is routed after each.
SEQUENCES: dict[str, tuple[int, list[bool], list[bool]]] = {
    "three-failures-in-a-row-unroute": (3, [True, False, False, False], [True, True, True, False]),
    "an-answer-between-resets-the-count": (3, [False, False, True, False, False], [True, True, True, True, True]),
    "back-after-one-answer": (2, [False, False, False, True, True], [True, False, False, True, True]),
    "flapping-under-the-threshold-never-unroutes": (2, [False, True] * 3, [True] * 6),
    "threshold-one": (1, [False, True, False], [False, True, False]),
}


@pytest.mark.parametrize("case", list(SEQUENCES))
def test_consecutive_failures_over_passes(case: str) -> None:
    threshold, answers, routed = SEQUENCES[case]
    row = InventoryRow("h0", "c0", "id0", "m", "production", 0, "s", "r", "active", True,
                       "http://10.0.0.2:32768", "http://10.0.0.2:32768/ping")
    rows, failures = [row], dict[str, int]()
    seen = []
    plan_check = _check(ready=True, threshold=threshold)
    for answer in answers:
        checks = refreshed([plan_check], rows, failures)
        verdict = judge(checks, {("h0", "c0"): answer})
        rows, failures = with_verdict(rows, verdict), failures_after(failures, checks, verdict, rows)
        seen.append(rows[0].ready)
    assert seen == routed


def test_failures_are_kept_for_replicas_not_checked_and_forgotten_with_their_container() -> None:
    rows = [InventoryRow("h0", "a", "id-a", "m", "production", 0, "s", "r", "active", True, "u", "p"),
            InventoryRow("h1", "b", "id-b", "m", "production", 1, "s", "r", "active", True, "u", "p")]
    previous = {failure_key("h0", "id-a"): 1, failure_key("h1", "id-b"): 2, failure_key("h9", "gone"): 2}
    checked = [_check(name="a", container_id="id-a", failures=1)]
    verdict = judge(checked, {("h0", "a"): True})
    # a answered (reset), b was not checked (its host unreachable): kept, the gone container: dropped.
    assert failures_after(previous, checked, verdict, rows) == {failure_key("h1", "id-b"): 2}


def test_refreshed_checks_follow_the_store() -> None:
    check = _check(ready=True, moved=True)
    row = InventoryRow("h0", "c0", "id0", "m", "production", 0, "s", "r", "active", False,
                       check.url, check.probe_url)
    (fresh,) = refreshed([check], [row], {check.key: 2})
    assert not fresh.ready and not fresh.fill_urls and fresh.failures == 0  # written since: same URLs
    (fresh,) = refreshed([check], [replace(row, ready=True)], {check.key: 2})
    assert fresh.ready and fresh.failures == 2
    assert refreshed([check], [replace(row, container_id="other")], {}) == []  # replaced container
    assert refreshed([check], [replace(row, phase="removing")], {}) == []  # being taken down
    assert refreshed([check], [], {}) == []


# --- the plan of a pass ---------------------------------------------------------------------------

PORT_BEFORE, PORT_AFTER = 32768, 32771


def _catalog(threshold: int | None = None) -> Catalog:
    probe = "{path: /ping, period: 1s" + (f", failureThreshold: {threshold}" if threshold else "") + "}"
    return load_tree(tree(**{
        "environments.yaml": environment("production"),
        "models/m.yaml": custom_model("m", "environment: production\nreplicas: 1\nruntime: {type: custom, "
                                      f"image: x:1, port: 8080, readinessProbe: {probe}}}")}))


HOSTS = [host("h0").model_copy(update={"address": "10.0.0.2"})]


def _pass(*, ready: bool = True, running: bool = True, port: int = PORT_BEFORE, answered: bool | None = None,
          failures: int = 0, threshold: int | None = None, unreachable: bool = False) -> Plan:
    """One pass over a single replica created at PORT_BEFORE, now published at ``port``."""
    catalog = _catalog(threshold)
    base = plan(PlanInputs(catalog=catalog, hosts=HOSTS, revision="r", inventory=[]))
    want = base.desired.replicas[0]
    name = f"mf-production-m-0-{want.spec_hash[:8]}"
    url = f"http://10.0.0.2:{PORT_BEFORE}"
    row = InventoryRow("h0", name, "id0", "m", "production", 0, want.spec_hash, "r", "active", ready, url,
                       url + "/ping")
    seen = ObservedReplica("h0", "id0", name, "m", "production", 0, want.spec_hash, "r", running)
    inputs = PlanInputs(catalog=catalog, hosts=HOSTS, revision="r", observed=[] if unreachable else [seen],
                        ports={} if unreachable else {("h0", "id0"): {8080: port}}, inventory=[row],
                        unreachable={"h0": 0.0} if unreachable else {},
                        probe_failures={failure_key("h0", "id0"): failures} if failures else {})
    first = plan(inputs)
    if answered is None:
        return first
    return plan(replace(inputs, probe_results={(c.host, c.name): answered for c in first.probes}))


def test_every_running_replica_is_probed_ready_ones_too() -> None:
    result = _pass(ready=True)
    assert [(c.ready, c.fill_urls, c.failure_threshold) for c in result.probes] == [(True, False, 3)]
    assert result.probes[0].probe_url == f"http://10.0.0.2:{PORT_BEFORE}/ping"


@pytest.mark.parametrize(("case", "kwargs"), [
    ("stopped", {"running": False}),
    ("host-unreachable", {"unreachable": True}),
])
def test_nothing_to_probe(case: str, kwargs: dict[str, bool]) -> None:
    assert _pass(**kwargs).probes == []


def test_the_threshold_comes_from_the_manifest() -> None:
    assert _pass(threshold=5).probes[0].failure_threshold == 5
    result = _pass(threshold=5, answered=False, failures=3)
    assert result.inventory.unready == () and result.probe_failures == {failure_key("h0", "id0"): 4}
    result = _pass(threshold=5, answered=False, failures=4)
    assert [n for _, n in result.inventory.unready] == [result.monitored[0].name]
    assert result.probe_failures == {}
    assert result.inventory_rows is not None and not result.inventory_rows[0].ready


def test_after_a_dockerd_restart_on_the_same_port_a_replica_not_ready_comes_back() -> None:
    # Seen stopped while dockerd restarted (ready cleared), running again on its old port.
    assert _pass(ready=True, running=False).inventory.unready != ()
    result = _pass(ready=False, answered=True)
    assert [u.name for u in result.inventory.ready] == [result.monitored[0].name]
    assert result.inventory.ready[0].fill_urls is False


def test_after_a_dockerd_restart_on_another_port_the_route_follows_the_new_port() -> None:
    # Ready at the old port (the pass never saw it stopped): probed where it listens now.
    first = _pass(ready=True, port=PORT_AFTER)
    assert [(c.fill_urls, c.url) for c in first.probes] == [(True, f"http://10.0.0.2:{PORT_AFTER}")]
    answered = _pass(ready=True, port=PORT_AFTER, answered=True)
    (update,) = answered.inventory.ready
    assert update.fill_urls and update.probe_url == f"http://10.0.0.2:{PORT_AFTER}/ping"
    assert answered.inventory_rows is not None and answered.inventory_rows[0].url == f"http://10.0.0.2:{PORT_AFTER}"
    # Not answering there yet: the route to the old port goes at once, whatever the threshold.
    silent = _pass(ready=True, port=PORT_AFTER, answered=False)
    assert len(silent.inventory.unready) == 1
    assert "another port" in next(iter(silent.not_ready[("m", "production")].values()))


def test_the_status_says_why_a_running_replica_is_out_of_the_routes() -> None:
    result = _pass(ready=True, answered=False, failures=2)
    assert result.inventory_rows is not None
    status = deployment_statuses(result, result.inventory_rows, [], {}, {}, 0.0)[("m", "production")]
    assert status.state == "error" and status.ready_replicas == 0
    assert "failed 3 readiness probes in a row (failureThreshold 3)" in status.message
    # Once it answers again, it is ready and the message is the usual one.
    back = _pass(ready=False, answered=True)
    assert back.inventory_rows is not None
    status = deployment_statuses(back, back.inventory_rows, [], {}, {}, 0.0)[("m", "production")]
    assert status.state == "success" and "readiness" not in status.message


def test_failure_threshold_has_no_not_active_note() -> None:
    result = _pass(threshold=5)
    assert result.notes == {}


def test_the_monitor_leaves_alone_a_replica_the_pass_takes_down() -> None:
    # The deployment is disabled: its replica is removed by this pass; until then it still answers,
    # and the monitor must not route it again (only the pass's own check sees it).
    result = _pass(ready=True)
    assert [c.name for c in result.monitored] == [c.name for c in result.probes]
    catalog = load_tree(tree(**{
        "environments.yaml": environment("production"),
        "models/m.yaml": custom_model("m", "environment: production\nreplicas: 0\nruntime: {type: custom, "
                                      "image: x:1, port: 8080, readinessProbe: {path: /ping}}")}))
    check = result.probes[0]
    row = InventoryRow("h0", check.name, "id0", "m", "production", 0, "oldspec", "r", "active", True, check.url,
                       check.probe_url)
    seen = ObservedReplica("h0", "id0", check.name, "m", "production", 0, "oldspec", "r", True)
    inputs = PlanInputs(catalog=catalog, hosts=HOSTS, revision="r", observed=[seen],
                        ports={("h0", "id0"): {8080: PORT_BEFORE}}, inventory=[row])
    first = plan(inputs)
    assert [a.op for a in first.actions] == ["remove"] and len(first.probes) == 1
    answered = plan(replace(inputs, probe_results={(check.host, check.name): True}))
    assert answered.monitored == []


def test_ready_replicas_are_pending_until_every_gateway_serves_their_routes() -> None:
    from modelfleet.state.routes import gateways_behind
    from modelfleet.state.status import GATEWAYS_SWITCHING

    assert gateways_behind(7, {"gw-a": 7, "gw-b": 6, "gw-c": 9}) == ["gw-b"]
    assert gateways_behind(7, {}) == []
    back = _pass(ready=False, answered=True)
    assert back.inventory_rows is not None
    key = ("m", "production")
    waiting = deployment_statuses(back, back.inventory_rows, [], {}, {}, 0.0, {"m/production": 7},
                                  {"gw-a": 7, "gw-b": 6})[key]
    assert (waiting.state, waiting.reason) == ("pending", GATEWAYS_SWITCHING)
    assert "waiting for gateway(s) gw-b to serve route table v7" in waiting.message
    served = deployment_statuses(back, back.inventory_rows, [], {}, {}, 0.0, {"m/production": 7},
                                 {"gw-a": 7, "gw-b": 7})[key]
    assert served.state == "success"
    other = deployment_statuses(back, back.inventory_rows, [], {}, {}, 0.0, {"other/production": 9},
                                {"gw-b": 6})[key]
    assert other.state == "success"  # a gateway behind on another deployment's routes holds up only that one
