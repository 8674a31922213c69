"""Plan (the pure diff): idempotence, ordering, ownership, and each kind of drift."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelfleet.reconciler.config import load_config
from modelfleet.state.actual import ObservedReplica, from_labels, labels_for
from modelfleet.state.plan import OP_ORDER, Action, diff
from modelfleet.state.planning import make_plan, previous_placement
from tests.state.helpers import (
    API,
    custom_model,
    desired_of,
    echo_deployment,
    environment,
    examples,
    fixture_pool,
    fixture_tree,
    host,
    mirror,
    observed,
    tree,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples-repo"

POLICIES = f"""\
{API}
kind: Policy
metadata: {{name: eu}}
spec: {{type: location, locations: [{{type: continent, name: EU}}]}}
---
{API}
kind: Policy
metadata: {{name: cpu-modern}}
spec: {{type: flavor, flavors: [{{type: cpu, name: amd-genoa}}, {{type: cpu, name: intel-sapphire-rapids}}]}}
"""
SENTIMENT = custom_model("sentiment", """
    environment: development
    origin: {file: {sha256: "sha256:9f2c4be35b7bb0d8a8b1c3b52f4b8e3b6f0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e"}}
    serverless: {minReplicas: 0, maxReplicas: 2}""")


def base_repo(**overrides: str | bytes) -> dict[str, bytes]:
    files: dict[str, str | bytes] = {
        "environments.yaml": environment("production", "eu") + "---\n" + environment("development"),
        "policies.yaml": POLICIES,
        "models/echo.yaml": custom_model("echo", echo_deployment("production", replicas=2),
                                         echo_deployment("development")),
        "models/sentiment.yaml": SENTIMENT,
    }
    files.update(overrides)
    return tree(**files)


def examples_tree() -> dict[str, bytes]:
    return {p.relative_to(EXAMPLES).as_posix(): p.read_bytes()
            for p in sorted(EXAMPLES.rglob("*")) if p.is_file()}


def ops(actions: list[Action]) -> list[tuple[str, str, str, int, str]]:
    return [(a.op, a.model, a.environment, a.replica, a.reason) for a in actions]


# --- idempotence and determinism ----------------------------------------------------------------


@pytest.mark.parametrize("repo", ["base", "examples-repo", "env-us-dep-na-eu-only-us",
                                  "dep-cannot-widen-env-narrowed-to-env", "two-location-policies-union"])
def test_plan_of_desired_against_itself_has_no_actions(repo: str) -> None:
    if repo == "examples-repo":
        files, hosts = examples_tree(), list(load_config(EXAMPLES / "modelfleet.yaml").pool.hosts)
    else:
        files, hosts = (base_repo() if repo == "base" else fixture_tree(repo)), fixture_pool()
    _, desired = desired_of(files, hosts)
    assert desired.replicas, "the repo should want something"
    first = diff(desired, [])
    assert {a.op for a in first} == {"create"} and len(first) == len(desired.replicas)
    assert diff(desired, mirror(desired)) == []
    # The whole loop: observe what the first plan created, plan again (placement fed back) → nothing.
    again = make_plan(files, hosts, "rev-2", actual=mirror(desired))
    assert again.actions == []
    assert again.desired.replicas == [replace(r, revision="rev-2") for r in desired.replicas]


def test_a_new_revision_alone_changes_nothing() -> None:
    _, desired = desired_of(base_repo(), fixture_pool(), revision="aaa")
    _, later = desired_of(base_repo(), fixture_pool(), revision="bbb")
    assert diff(later, mirror(desired)) == []


def test_ordering_is_deterministic_whatever_the_observation_order() -> None:
    _, old = desired_of(base_repo(), fixture_pool())
    changed = base_repo(**{"models/echo.yaml": custom_model(
        "echo", echo_deployment("production", replicas=1, image="example/echo:2"))})
    _, desired = desired_of(changed, fixture_pool())
    actual = [*mirror(old), observed(old.replicas[0], container_id="zz-duplicate")]
    expected = diff(desired, actual)
    assert len({a.op for a in expected}) >= 2
    for seed in range(5):
        shuffled = actual[:]
        random.Random(seed).shuffle(shuffled)
        assert diff(desired, shuffled) == expected
    # create/replace/start first, then stop, then remove; ties by environment, model, replica.
    assert expected == sorted(expected, key=Action.sort_key)
    assert [OP_ORDER[a.op] for a in expected] == sorted(OP_ORDER[a.op] for a in expected)


# --- drift: one table -----------------------------------------------------------------------------


def _drift_cases() -> dict[str, tuple]:
    return {
        "spec-change-replaces": ("spec", [("replace", "echo", "production", 0, "spec changed")]),
        "wrong-host-replaces-as-a-move": ("host", [("replace", "echo", "production", 0, "moves from nyc-1")]),
        "stopped-starts": ("stopped", [("start", "echo", "production", 0, "stopped")]),
        "missing-creates": ("missing", [("create", "echo", "production", 0, "missing")]),
        "duplicate-is-removed": ("duplicate", [("remove", "echo", "production", 0, "duplicate")]),
        "extra-index-is-scaled-down": ("extra", [("remove", "echo", "production", 7, "scaled down")]),
    }


@pytest.mark.parametrize("case", list(_drift_cases()))
def test_drift_of_one_replica(case: str) -> None:
    drift, expected = _drift_cases()[case]
    _, desired = desired_of(base_repo(), fixture_pool())
    target = next(r for r in desired.replicas if (r.model, r.environment, r.index) == ("echo", "production", 0))
    actual = [observed(r) for r in desired.replicas if r is not target]
    if drift == "spec":
        actual.append(observed(target, spec_hash="0" * 16))
    elif drift == "host":
        actual.append(observed(target, host="nyc-1"))
    elif drift == "stopped":
        actual.append(observed(target, running=False))
    elif drift == "duplicate":
        actual += [observed(target, container_id="a-first"), observed(target, container_id="b-second")]
    elif drift == "extra":
        actual += [observed(target), observed(replace(target, index=7))]
    actions = diff(desired, actual)
    assert ops(actions) == expected
    action = actions[0]
    if action.op == "replace":
        # Blue-green: the new one is described, and the old container is named for removal after.
        assert action.desired == target and action.current is not None
        assert action.host == target.host
        if drift == "host":
            assert action.current.host == "nyc-1" and action.to_json()["from_host"] == "nyc-1"
    if case == "duplicate-is-removed":
        assert action.current is not None and action.current.container_id == "b-second"


def test_serverless_standby_is_created_stopped_started_on_demand_and_stopped_when_idle() -> None:
    files = base_repo()
    _, idle = desired_of(files, fixture_pool())
    [standby] = [r for r in idle.replicas if r.model == "sentiment"]
    assert not standby.running
    assert ("create", "sentiment", "development", 0, "missing (standby, stopped)") in ops(diff(idle, []))
    _, busy = desired_of(files, fixture_pool(), demand={("sentiment", "development"): 5})
    busy_ops = ops(diff(busy, mirror(idle)))
    # Demand 5, maxReplicas 2: the standby starts and a second replica is created.
    assert busy_ops == [("start", "sentiment", "development", 0, "stopped"),
                        ("create", "sentiment", "development", 1, "missing")]
    # Idle again: back to one stopped standby.
    assert ops(diff(idle, mirror(busy))) == [("stop", "sentiment", "development", 0, "scaled to zero"),
                                             ("remove", "sentiment", "development", 1, "scaled down")]


PAUSED_SENTIMENT = SENTIMENT.replace("maxReplicas: 2}", "maxReplicas: 2, standby: paused}")


def test_a_paused_standby_is_created_paused_thawed_on_demand_and_paused_again_when_idle() -> None:
    files = base_repo(**{"models/sentiment.yaml": PAUSED_SENTIMENT})
    _, idle = desired_of(files, fixture_pool())
    [standby] = [r for r in idle.replicas if r.model == "sentiment"]
    assert not standby.running and standby.standby == "paused"
    assert ("create", "sentiment", "development", 0, "missing (standby, paused)") in ops(diff(idle, []))
    assert diff(idle, mirror(idle)) == []  # a paused standby is what is wanted: nothing to do
    _, busy = desired_of(files, fixture_pool(), demand={("sentiment", "development"): 5})
    assert ops(diff(busy, mirror(idle))) == [("start", "sentiment", "development", 0, "paused"),
                                             ("create", "sentiment", "development", 1, "missing")]
    # Idle again: the standby is paused (not stopped), the second replica removed.
    assert ops(diff(idle, mirror(busy))) == [("pause", "sentiment", "development", 0, "scaled to zero"),
                                             ("remove", "sentiment", "development", 1, "scaled down")]


def test_the_standby_mode_is_not_part_of_the_spec_hash() -> None:
    _, stopped = desired_of(base_repo(), fixture_pool())
    _, paused = desired_of(base_repo(**{"models/sentiment.yaml": PAUSED_SENTIMENT}), fixture_pool())
    [a] = [r for r in stopped.replicas if r.model == "sentiment"]
    [b] = [r for r in paused.replicas if r.model == "sentiment"]
    assert a.spec_hash == b.spec_hash and (a.standby, b.standby) == ("stopped", "paused")


# (standby mode wanted, the standby found: running, paused) -> the action on it
STANDBY_SWITCHES = {
    "paused-wanted-found-stopped-is-started-and-paused": ("paused", False, False,
                                                          [("pause", "standby is paused (found stopped)")]),
    "paused-wanted-found-paused-is-left": ("paused", False, True, []),
    "paused-wanted-found-running-is-paused": ("paused", True, False, [("pause", "scaled to zero")]),
    "stopped-wanted-found-paused-is-stopped": ("stopped", False, True, [("stop", "standby is stopped (found paused)")]),
    "stopped-wanted-found-stopped-is-left": ("stopped", False, False, []),
    "stopped-wanted-found-running-is-stopped": ("stopped", True, False, [("stop", "scaled to zero")]),
}


@pytest.mark.parametrize("case", list(STANDBY_SWITCHES))
def test_switching_the_standby_mode_stops_or_pauses_the_container_in_place(case: str) -> None:
    mode, running, paused, expected = STANDBY_SWITCHES[case]
    files = base_repo(**{"models/sentiment.yaml": PAUSED_SENTIMENT if mode == "paused" else SENTIMENT})
    _, desired = desired_of(files, fixture_pool())
    [standby] = [r for r in desired.replicas if r.model == "sentiment"]
    actual = [observed(r) for r in desired.replicas if r is not standby]
    actual.append(observed(standby, running=running, paused=paused))
    actions = diff(desired, actual)
    assert [(a.op, a.reason) for a in actions] == expected
    for action in actions:  # in place: the same container, never a replace
        assert action.current is not None and action.current.container_id == actual[-1].container_id


# --- what is never removed, and what is ---------------------------------------------------------


def test_a_container_outside_the_inventory_is_not_replaced_but_a_new_one_is_created() -> None:
    _, desired = desired_of(base_repo(), fixture_pool())
    target = next(r for r in desired.replicas if r.key == ("echo", "production") and r.index == 0)
    stale = observed(target, container_id="theirs", spec_hash="0" * 16)
    actual = [observed(r) for r in desired.replicas if r is not target] + [stale]
    owned = {r.container_id for r in actual} - {"theirs"}
    assert ops(diff(desired, actual, owned=owned)) == [("create", "echo", "production", 0, "missing")]
    # Once it is in the inventory, it is replaced (blue-green) as usual.
    assert ops(diff(desired, actual, owned=owned | {"theirs"})) == [
        ("replace", "echo", "production", 0, "spec changed")]


def test_removal_is_limited_to_owned_containers() -> None:
    _, before = desired_of(base_repo(), fixture_pool())
    _, after = desired_of(base_repo(**{"models/echo.yaml": b""}), fixture_pool())  # echo removed from Git
    actual = mirror(before)
    echo_ids = {r.container_id for r in actual if r.model == "echo"}
    assert len(echo_ids) == 3
    # Without an inventory every managed container is ours.
    assert {a.current.container_id for a in diff(after, actual) if a.current} == echo_ids
    assert {a.reason for a in diff(after, actual)} == {"removed from Git"}
    # With one, only what it lists is removed; the rest is someone else's.
    owned = {min(echo_ids)}
    actions = diff(after, actual, owned=owned)
    assert [(a.op, a.current.container_id if a.current else None) for a in actions] == [("remove", min(echo_ids))]
    assert diff(after, actual, owned=set()) == []


def test_disabled_deployment_plans_removal() -> None:
    _, before = desired_of(base_repo(), fixture_pool())
    disabled = custom_model("echo", echo_deployment("production", replicas=2, extra="enabled: false\n"),
                            echo_deployment("development"))
    _, after = desired_of(base_repo(**{"models/echo.yaml": disabled}), fixture_pool())
    state = after.deployments[("echo", "production")]
    assert not state.enabled and state.replicas == 0 and state.hosts == []
    assert ops(diff(after, mirror(before))) == [
        ("remove", "echo", "production", 0, "deployment disabled"),
        ("remove", "echo", "production", 1, "deployment disabled"),
    ]


FROZEN = {
    # A deployment that became invalid keeps every replica it has, even a stale or misplaced one.
    "deployment-invalid": custom_model("echo", echo_deployment("production", replicas=2, extra="replicas: x\n"),
                                       echo_deployment("development")),
    "flavor-not-allowed": custom_model(
        "echo", echo_deployment("production", replicas=2, extra="policies: [cpu-modern]\nflavors: [nvidia-a100]\n"),
        echo_deployment("development")),
    "unknown-policy": custom_model("echo", echo_deployment("production", replicas=2, extra="policies: [nope]\n"),
                                   echo_deployment("development")),
    "model-invalid": custom_model("echo", echo_deployment("production", replicas=2),
                                  echo_deployment("development")).replace("spec:", "spek:"),
    "model-name-only": f"{API}\nkind: Model\nmetadata: {{name: echo}}\nspec: {{deployments: 3}}\n",
}


@pytest.mark.parametrize("case", list(FROZEN))
def test_frozen_deployment_keeps_its_replicas(case: str) -> None:
    _, before = desired_of(base_repo(), fixture_pool())
    actual = mirror(before)
    # Drift the running echo/production replicas: on another version, one on a wrong host, one stopped.
    echo_prod = [r for r in actual if r.key == ("echo", "production")]
    actual = [r for r in actual if r.key != ("echo", "production")] + [
        replace(echo_prod[0], spec_hash="0" * 16), replace(echo_prod[1], host="nyc-1", running=False)]
    _, after = desired_of(base_repo(**{"models/echo.yaml": FROZEN[case]}), fixture_pool())
    assert ("echo", "production") in after.frozen or ("echo", "*") in after.frozen
    assert after.errors
    actions = diff(after, actual)
    assert [a for a in actions if (a.model, a.environment) == ("echo", "production")] == []
    # The rest of the repository still plans (echo/development too, unless the whole model is unreadable).
    if case in ("model-invalid", "model-name-only"):
        assert [a for a in actions if a.model == "echo"] == []
    else:
        assert diff(after, mirror(after)) == []


def test_incomplete_catalog_removes_nothing_as_removed_from_git() -> None:
    _, before = desired_of(base_repo(), fixture_pool())
    broken = b"apiVersion: modelfleet.dev/v1alpha1\nkind: Model\nmetadata: {name: echo\n"  # syntax error
    catalog, after = desired_of(base_repo(**{"models/echo.yaml": broken}), fixture_pool())
    assert not catalog.complete and not after.complete
    assert [(e.file, e.line) for e in after.errors] == [("models/echo.yaml", 4)]
    assert "echo" not in catalog.models
    assert diff(after, mirror(before)) == []
    # The same tree without the broken file is complete: then echo really was removed from Git.
    _, removed = desired_of({k: v for k, v in base_repo().items() if k != "models/echo.yaml"}, fixture_pool())
    assert {a.reason for a in diff(removed, mirror(before))} == {"removed from Git"}


def test_unschedulable_deployment_keeps_what_still_runs() -> None:
    _, before = desired_of(base_repo(), fixture_pool())
    eu_hosts = {"par-1", "par-2", "fra-1", "gpu-1"}
    running = mirror(before)
    # Every EU host is down: echo/production has nowhere to go; its replicas are not torn down.
    _, after = desired_of(base_repo(), fixture_pool(), down_hosts=frozenset(eu_hosts),
                          previous=previous_placement(running))
    state = after.deployments[("echo", "production")]
    assert state.eligible_hosts == [] and state.unschedulable
    assert [a for a in diff(after, running) if (a.model, a.environment) == ("echo", "production")] == []


def test_adding_an_unrelated_model_or_host_moves_nothing() -> None:
    files = base_repo()
    first = make_plan(files, fixture_pool(), "rev-1")
    actual = mirror(first.desired)
    more = base_repo(**{"models/other.yaml": custom_model("other", echo_deployment("production", replicas=4))})
    hosts = [*fixture_pool(), host("par-9", location="paris-9", cpus=64, memory="256Gi")]
    second = make_plan(more, hosts, "rev-2", actual=actual)
    assert {a.model for a in second.actions} == {"other"} and {a.op for a in second.actions} == {"create"}


# --- the whole loop, fuzzed -----------------------------------------------------------------------


@st.composite
def repos(draw: st.DrawFn) -> dict[str, bytes]:
    files: dict[str, str | bytes] = {
        "environments.yaml": environment("production", "eu") + "---\n" + environment("development"),
        "policies.yaml": POLICIES,
    }
    for i in range(draw(st.integers(0, 5))):
        deployments = []
        for env in draw(st.lists(st.sampled_from(["production", "development"]), unique=True, max_size=2)):
            kind = draw(st.sampled_from(["replicas", "serverless", "disabled"]))
            if kind == "serverless":
                extra = f"serverless: {{minReplicas: {draw(st.integers(0, 2))}, maxReplicas: 3}}\n"
                deployments.append(f"environment: {env}\n{extra}runtime: {{type: custom, image: x:{i}}}")
            else:
                deployments.append(echo_deployment(env, replicas=draw(st.integers(0, 4)),
                                                   extra="enabled: false\n" if kind == "disabled" else ""))
        files[f"models/m{i}.yaml"] = custom_model(f"m{i}", *deployments)
    return tree(**files)


@settings(max_examples=examples(100), deadline=None)
@given(before=repos(), after=repos(), owned_share=st.sampled_from([None, 0.5, 1.0]))
def test_property_applying_a_plan_converges(before: dict[str, bytes], after: dict[str, bytes],
                                           owned_share: float | None) -> None:
    hosts = fixture_pool()
    start = make_plan(before, hosts, "rev-1")
    actual = mirror(start.desired)
    owned = None if owned_share is None else {r.container_id for r in actual[: int(len(actual) * owned_share)]}
    plan = make_plan(after, hosts, "rev-2", actual=actual, owned=owned)
    # Never remove (nor replace, which removes the old one) a container outside the inventory.
    removed = {a.current.container_id for a in plan.actions if a.op in ("remove", "replace") and a.current}
    assert owned is None or removed <= owned
    # Apply the plan to the simulated pool, then plan again: nothing left to do.
    by_id: dict[str, ObservedReplica] = {r.container_id: r for r in actual}
    for action in plan.actions:
        if action.op in ("remove", "replace") and action.current:
            by_id.pop(action.current.container_id)
        if action.op in ("create", "replace", "start", "stop") and action.desired:
            if action.current and action.op in ("start", "stop"):
                by_id.pop(action.current.container_id)
            new = observed(action.desired, container_id=f"new-{action.desired.key}-{action.replica}")
            by_id[new.container_id] = new
            if owned is not None:
                owned = (owned - {action.current.container_id} if action.current else owned) | {new.container_id}
    again = make_plan(after, hosts, "rev-2", actual=list(by_id.values()), owned=owned)
    assert again.actions == []


def test_labels_round_trip_and_unmanaged_containers_are_invisible() -> None:
    labels = labels_for("echo", "production", 3, "abcd", "rev")
    replica = from_labels("h", "id", "name", labels, True)
    assert replica is not None and (replica.model, replica.environment, replica.index) == ("echo", "production", 3)
    assert from_labels("h", "id", "n", {**labels, "modelfleet.managed": "false"}, True) is None
    assert from_labels("h", "id", "n", {k: v for k, v in labels.items() if k != "modelfleet.model"}, True) is None
    assert from_labels("h", "id", "n", {**labels, "modelfleet.replica": "x"}, True) is None
