"""The pass's plan: settings accepted but not in effect yet are said in the plan, never ignored silently."""

from __future__ import annotations

from modelfleet.state.loader import load_tree
from modelfleet.state.planning import PlanInputs, plan
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
