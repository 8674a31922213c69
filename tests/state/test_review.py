"""state/review.py: what a review branch changes relative to the base, and its commit status."""

from __future__ import annotations

import pytest

from modelfleet.state.plan import Action
from modelfleet.state.planning import PlanInputs, plan
from modelfleet.state.review import compare, describe_actions, plan_status, policies_of, review_document
from tests.state.helpers import custom_model, desired_of, echo_deployment, environment, host, tree

HOSTS = [host("par-1"), host("fra-1", location="frankfurt-1", country="DE"),
         host("vir-1", location="virginia-1", country="US", continent="NA")]
POLICIES = """
apiVersion: modelfleet.dev/v1alpha1
kind: Policy
metadata: {name: eu-only}
spec: {type: location, locations: [{type: continent, name: EU}]}
---
apiVersion: modelfleet.dev/v1alpha1
kind: Policy
metadata: {name: fr-only}
spec: {type: location, locations: [{type: country, name: FR}]}
"""


def files(*models: str) -> dict[str, bytes]:
    return tree(**{"environments.yaml": environment("production", "eu-only") + "---\n" + environment("development"),
                   "policies.yaml": POLICIES},
                **{f"models/m{i}.yaml": m for i, m in enumerate(models)})


BASE = files(custom_model("echo", echo_deployment("production", replicas=2)))


@pytest.mark.parametrize(("head", "added", "removed", "changed"), [
    pytest.param(BASE, [], [], {}, id="same-tree-no-changes"),
    pytest.param(files(custom_model("echo", echo_deployment("production", replicas=2)),
                       custom_model("new", echo_deployment("development"))),
                 [("new", "development")], [], {}, id="new-model-is-added"),
    pytest.param(files(custom_model("echo", echo_deployment("production", replicas=2),
                                    echo_deployment("development"))),
                 [("echo", "development")], [], {}, id="new-environment-of-a-model-is-added"),
    pytest.param(files(), [], [("echo", "production")], {}, id="model-gone-is-removed"),
    pytest.param(files(custom_model("echo", echo_deployment("production", replicas=1))),
                 [], [], {("echo", "production"): {"replicas": (2, 1), "hosts": (["fra-1", "par-1"], ["par-1"])}},
                 id="replica-count-changed"),
    pytest.param(files(custom_model("echo", echo_deployment("production", replicas=2, image="example/echo:2"))),
                 [], [], {("echo", "production"): {"image": ("example/echo:1", "example/echo:2")}},
                 id="image-changed"),
    pytest.param(files(custom_model("echo", echo_deployment("production", replicas=1, extra="policies: [fr-only]\n"))),
                 [], [], {("echo", "production"): {"replicas": (2, 1),
                                                   "policies": (["eu-only"], ["eu-only", "fr-only"]),
                                                   "hosts": (["fra-1", "par-1"], ["par-1"])}},
                 id="policies-changed"),
    pytest.param(files(custom_model("echo", echo_deployment("production", replicas=2, extra="enabled: false\n"))),
                 [], [], {("echo", "production"): {"enabled": (True, False), "replicas": (2, 0),
                                                   "hosts": (["fra-1", "par-1"], [])}},
                 id="disabled"),
])
def test_compare_reports_added_changed_and_removed_deployments(
        head: dict[str, bytes], added: list[tuple[str, str]], removed: list[tuple[str, str]],
        changed: dict[tuple[str, str], dict[str, tuple[object, object]]]) -> None:
    base_catalog, base = desired_of(BASE, HOSTS)
    head_catalog, desired = desired_of(head, HOSTS, "rev-2")
    diff = compare(base, desired, base_catalog, head_catalog)
    assert list(diff.added) == added
    assert list(diff.removed) == removed
    got = {(c.model, c.environment): {f.field: (f.old, f.new) for f in c.changes if f.field != "spec_hash"}
           for c in diff.changed}
    assert {k: v for k, v in got.items() if v} == changed


def test_a_changed_image_also_shows_its_spec_hash_change() -> None:
    base_catalog, base = desired_of(BASE, HOSTS)
    head_catalog, head = desired_of(files(custom_model("echo", echo_deployment("production", replicas=2,
                                                                               image="example/echo:2"))), HOSTS)
    (change,) = compare(base, head, base_catalog, head_catalog).changed
    assert [f.field for f in change.changes] == ["image", "spec_hash"]


def test_without_a_base_everything_is_added() -> None:
    _, head = desired_of(BASE, HOSTS)
    diff = compare(None, head)
    assert diff.added == (("echo", "production"),) and not diff.changed and not diff.removed


def test_policies_of_lists_the_environment_s_then_the_deployment_s() -> None:
    catalog, _ = desired_of(files(custom_model("echo", echo_deployment("production", extra="policies: [fr-only]\n"))),
                            HOSTS)
    assert policies_of(catalog, ("echo", "production")) == ["eu-only", "fr-only"]
    assert policies_of(catalog, ("ghost", "production")) == ["eu-only"]
    assert policies_of(None, ("echo", "production")) == []


def _action(op: str) -> Action:
    return Action(op, "echo", "production", "par-1", 0, "test")


@pytest.mark.parametrize(("ops", "text"), [
    ([], "0 to create, 0 to replace, 0 to remove"),
    (["create", "create", "create", "replace"], "3 to create, 1 to replace, 0 to remove"),
    (["remove", "stop", "create"], "1 to create, 0 to replace, 1 to remove, 1 to stop"),
    (["start"], "0 to create, 0 to replace, 0 to remove, 1 to start"),
])
def test_describe_actions_counts_by_op(ops: list[str], text: str) -> None:
    assert describe_actions([_action(op) for op in ops]) == text


def test_plan_status_is_success_with_counts_for_a_valid_branch() -> None:
    _, head = desired_of(BASE, HOSTS)
    assert plan_status(head, [_action("create")]) == ("success", "1 to create, 0 to replace, 0 to remove")


def test_plan_status_is_failure_with_the_first_error_and_its_file_and_line() -> None:
    broken = files(custom_model("echo", echo_deployment("production", replicas=2, extra="replicass: 3\n")),
                   "apiVersion: modelfleet.dev/v1alpha1\nkind: Model\nmetadata: {name: [x\n")
    _, head = desired_of(broken, HOSTS)
    state, description = plan_status(head, [])
    assert state == "failure"
    first = head.errors[0]
    assert description.startswith(f"{first.file}:{first.line}: ")
    assert description.endswith(f"(+{len(head.errors) - 1} more)")


def test_review_document_holds_the_diff_the_errors_and_the_plan() -> None:
    base_catalog, base = desired_of(BASE, HOSTS)
    head_files = files(custom_model("echo", echo_deployment("production", replicas=1)),
                       custom_model("new", echo_deployment("development")))
    head_plan = plan(PlanInputs(catalog=desired_of(head_files, HOSTS)[0], hosts=HOSTS, revision="b" * 40))
    document = review_document("review/x", "b" * 40, "a" * 40, base, base_catalog, head_plan.catalog,
                               head_plan.to_json(), head_plan.desired, head_plan.actions, 1.0)
    assert document["state"] == "success"
    assert document["description"] == "2 to create, 0 to replace, 0 to remove"  # nothing runs yet
    assert document["diff"]["added"] == [{"model": "new", "environment": "development"}]  # type: ignore[index]
    assert [c["model"] for c in document["diff"]["changed"]] == ["echo"]  # type: ignore[index]
    assert document["errors"] == []
    assert document["plan"]["revision"] == "b" * 40  # type: ignore[index]
