"""The pass's plan: settings accepted but not in effect yet are said in the plan, never ignored silently."""

from __future__ import annotations

from dataclasses import replace

from modelfleet.state.loader import load_tree
from modelfleet.state.planning import DesiredMemo, PlanInputs, plan
from tests.state.helpers import custom_model, echo_deployment, environment, host, tree


def _plan(*deployments: str) -> dict[str, object]:
    files = tree(**{"environments.yaml": environment("production") + "---\n" + environment("development"),
                    "models/m.yaml": custom_model("m", *deployments)})
    return plan(PlanInputs(catalog=load_tree(files), hosts=[host("h0")], revision="r", inventory=[])).to_json()


def test_failure_threshold_and_serverless_are_in_effect_no_note() -> None:
    data = _plan(
        "environment: production\nserverless: {minReplicas: 0, maxReplicas: 3, target: 5}\n"
        "runtime: {type: custom, image: x:1, readinessProbe: {path: /ping, failureThreshold: 5}}",
        echo_deployment("development"))
    deployments = {d["environment"]: d for d in data["deployments"]}  # type: ignore[attr-defined]
    assert "notes" not in deployments["production"]
    assert "notes" not in deployments["development"]  # nothing set that is not in effect


def test_the_status_mentions_autoscaling_only_for_serverless_deployments() -> None:
    from modelfleet.state.inventory import InventoryRow
    from modelfleet.state.outcome import deployment_statuses

    files = tree(**{"environments.yaml": environment("production"),
                    "models/m.yaml": custom_model("m", "environment: production\nreplicas: 1\n"
                                                  "runtime: {type: custom, image: x:1, readinessProbe: "
                                                  "{path: /ping, failureThreshold: 5}}")})
    result = plan(PlanInputs(catalog=load_tree(files), hosts=[host("h0")], revision="r", inventory=[]))
    replica = result.desired.replicas[0]
    row = InventoryRow("h0", "c", "id", "m", "production", 0, replica.spec_hash, "r", "active", True, "u", "p")
    status = deployment_statuses(result, [row], [], {}, {}, 0.0)[("m", "production")]
    assert status.state == "success" and status.notes == []
    assert "autoscaling" not in status.message


# --- a paused standby that never got ready (serverless.standby: paused) -------------------------

PAUSED = ("environment: production\nserverless: {minReplicas: 0, standby: paused}\n"
          "runtime: {type: custom, image: x:1, readinessProbe: {path: /ping}}")


def _paused_plan(*, failed: bool, paused: bool) -> tuple[list[tuple[str, str]], list[str]]:
    """(actions, held actions' ops) for the standby found stopped (or paused)."""
    from modelfleet.state.actual import ObservedReplica
    from modelfleet.state.inventory import InventoryRow
    from modelfleet.state.outcome import failed_rollout_marker

    files = tree(**{"environments.yaml": environment("production"), "models/m.yaml": custom_model("m", PAUSED)})
    catalog = load_tree(files)
    first = plan(PlanInputs(catalog=catalog, hosts=[host("h0")], revision="r", inventory=[]))
    [replica] = first.desired.replicas
    seen = ObservedReplica("h0", "id", "mf-m", "m", "production", 0, replica.spec_hash, "r", False, paused)
    row = InventoryRow("h0", "mf-m", "id", "m", "production", 0, replica.spec_hash, "r", "active", False, "u", "p")
    marker = {failed_rollout_marker("m", "production", replica.spec_hash): "not ready"} if failed else {}
    result = plan(PlanInputs(catalog=catalog, hosts=[host("h0")], revision="r", observed=[seen], inventory=[row],
                             failed_rollouts=marker))
    return [(a.op, a.reason) for a in result.actions], [h.action.op for h in result.held]


def test_a_stopped_standby_that_should_be_paused_is_paused_unless_that_version_failed_to_get_ready() -> None:
    # (found paused, its version failed) -> (actions, held)
    table = {
        (False, False): ([("pause", "standby is paused (found stopped)")], []),
        (False, True): ([], ["pause"]),  # left stopped: a stopped standby still serves
        (True, False): ([], []),
    }
    for (paused, failed), expected in table.items():
        assert _paused_plan(failed=failed, paused=paused) == expected, (paused, failed)


def test_a_pause_that_did_not_get_ready_holds_its_version() -> None:
    from modelfleet.state.actual import ObservedReplica
    from modelfleet.state.outcome import failed_rollout_marker, failed_rollouts_after
    from modelfleet.state.plan import Action, ActionOutcome

    files = tree(**{"environments.yaml": environment("production"), "models/m.yaml": custom_model("m", PAUSED)})
    [replica] = plan(PlanInputs(catalog=load_tree(files), hosts=[host("h0")], revision="r")).desired.replicas
    seen = ObservedReplica("h0", "id", "mf-m", "m", "production", 0, replica.spec_hash, "r", False)
    marker = failed_rollout_marker("m", "production", replica.spec_hash)
    pause = Action("pause", "m", "production", "h0", 0, "standby is paused (found stopped)", replica, seen)
    assert failed_rollouts_after({}, [ActionOutcome(pause, False, "not ready", failed_version=True)]) == {
        marker: "not ready"}
    # A Docker error is not the version's fault: retried.
    assert failed_rollouts_after({}, [ActionOutcome(pause, False, "docker down")]) == {}
    stop = Action("stop", "m", "production", "h0", 0, "scaled to zero", replica, seen)
    assert failed_rollouts_after({}, [ActionOutcome(stop, False, "x", failed_version=True)]) == {}


def test_the_plan_places_by_the_artifacts_it_is_given_even_with_a_remembered_desired_state() -> None:
    digest = "ef" * 32
    dep = (f"environment: production\norigin: {{file: {{sha256: '{digest}'}}}}\n"
           "serverless: {minReplicas: 0, maxReplicas: 2}\nruntime: {type: torch}")
    catalog = load_tree({"env.yaml": environment("production").encode(), "m.yaml": custom_model("m", dep).encode()})
    hosts = [host("a-1", location="paris-1"), host("b-1", location="lyon-1")]
    memo = DesiredMemo()
    inputs = PlanInputs(catalog=catalog, hosts=hosts, revision="r", inventory=[])
    [cold] = plan(inputs, memo).desired.replicas
    other = ({"a-1", "b-1"} - {cold.host}).pop()
    [warm] = plan(replace(inputs, artifacts={other: frozenset({f"sha256:{digest}"})}), memo).desired.replicas
    assert warm.host == other  # a change of artifacts is a new input, not the memo's last answer
