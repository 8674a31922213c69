"""Desired state details: spec hashes (they label running containers) and runtime resolution."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from modelfleet.reconciler.config import load_config
from modelfleet.state.desired import compute_desired, reserved_capacity, spec_hash
from tests.state.helpers import custom_model, desired_of, environment, fixture_pool, host, tree

EXAMPLES = Path(__file__).resolve().parents[2] / "examples-repo"


def test_spec_hashes_of_the_examples_are_stable() -> None:
    """Changing how the hash is computed replaces every container in every pool: pin it."""
    files = {p.relative_to(EXAMPLES).as_posix(): p.read_bytes() for p in EXAMPLES.rglob("*") if p.is_file()}
    hosts = list(load_config(EXAMPLES / "modelfleet.yaml").pool.hosts)
    _, desired = desired_of(files, hosts)
    assert {k: s.spec_hash for k, s in desired.deployments.items()} == {
        ("echo", "development"): "604148e52e5825ca",
        ("echo", "production"): "afda659aa3d66703",
        ("minilm", "development"): "6e2f30746c5bded5",
        ("minilm", "production"): "f12f27527652124e",
        ("tiny-classifier", "development"): "c94cce493e8562b7",
        ("tiny-classifier", "production"): "16b3db9dc2f726c3",
    }


def _state(deployment: str, **kwargs: object):
    files = tree(**{"env.yaml": environment("production"), "m.yaml": custom_model("m", deployment)})
    _, desired = desired_of(files, fixture_pool(), **kwargs)  # type: ignore[arg-type]
    return desired.deployments[("m", "production")]


BASE = "environment: production\nreplicas: 2\nruntime: {type: custom, image: x:1, resources: {cpus: 1}}"


@pytest.mark.parametrize(("change", "same"), [
    ("replicas: 2", "replicas: 5"),                                   # scaling is not a spec change
    ("environment: production", "environment: production\npolicies: []"),
    ("environment: production", "environment: production\nenabled: true"),
])
def test_spec_hash_ignores_what_does_not_change_the_container(change: str, same: str) -> None:
    assert _state(BASE).spec_hash == _state(BASE.replace(change, same)).spec_hash


@pytest.mark.parametrize(("change", "different"), [
    ("image: x:1", "image: x:2"),
    ("cpus: 1", "cpus: 2"),
    ("image: x:1", "image: x:1, env: {A: b}"),
    ("image: x:1", "image: x:1, port: 9000"),
    ("image: x:1", "image: x:1, readinessProbe: {path: /ready}"),
])
def test_spec_hash_changes_with_the_container(change: str, different: str) -> None:
    assert _state(BASE).spec_hash != _state(BASE.replace(change, different)).spec_hash


def test_spec_hash_depends_on_the_resolved_huggingface_commit() -> None:
    dep = "environment: production\norigin: {huggingface: {model: org/m, revision: main}}"
    unresolved = _state(dep)
    resolved = _state(dep, hf_commits={("org/m", "main"): "abc123"})
    assert unresolved.spec_hash != resolved.spec_hash
    assert resolved.runtime is not None and resolved.runtime.type == "transformers"
    assert resolved.runtime.reason.startswith("origin is a HuggingFace model")


def test_spec_hash_excludes_the_reason_text() -> None:
    state = _state(BASE)
    assert state.runtime is not None
    assert spec_hash(replace(state.runtime, reason="other words"), None) == spec_hash(state.runtime, None)


def test_serverless_keeps_one_stopped_standby_and_runs_on_demand() -> None:
    dep = "environment: production\nserverless: {minReplicas: 0, maxReplicas: 3}\nruntime: {type: custom, image: x}"
    files = tree(**{"env.yaml": environment("production"), "m.yaml": custom_model("m", dep)})
    _, idle = desired_of(files, fixture_pool())
    assert [(r.index, r.running) for r in idle.replicas] == [(0, False)]
    _, busy = desired_of(files, fixture_pool(), demand={("m", "production"): 2})
    assert [(r.index, r.running) for r in busy.replicas] == [(0, True), (1, True)]
    _, burst = desired_of(files, fixture_pool(), demand={("m", "production"): 50})
    assert [(r.index, r.running) for r in burst.replicas] == [(0, True), (1, True), (2, True)]  # maxReplicas


def test_compute_desired_leaves_the_catalog_untouched_so_it_can_be_reused() -> None:
    """The daemon caches the catalog per commit and plans from it on every pass."""
    bad_flavor = ("environment: production\npolicies: [modern]\nflavors: [nvidia-a100]\n"
                  "runtime: {type: custom, image: x}")
    files = tree(**{
        "env.yaml": environment("production"),
        "p.yaml": "apiVersion: modelfleet.dev/v1alpha1\nkind: Policy\nmetadata: {name: modern}\n"
                  "spec: {type: flavor, flavors: [{type: cpu, name: amd-genoa}]}\n",
        "m.yaml": custom_model("m", bad_flavor),
        "ok.yaml": custom_model("ok", BASE),
    })
    catalog, first = desired_of(files, fixture_pool())
    before = catalog.all_errors()
    second = compute_desired(catalog, fixture_pool(), "rev-1")
    assert catalog.all_errors() == before == []
    assert [e.field for e in first.errors] == [e.field for e in second.errors] == ["spec.deployments[0].flavors[0]"]
    assert first.replicas == second.replicas


def test_reserved_capacity_sums_what_the_placement_reserves_per_host() -> None:
    """Running replicas and stopped standbys reserve their room; disabled deployments and hosts
    without replicas reserve nothing (every host is listed)."""
    hosts = [host("a", cpus=4, memory="4Gi"), host("b", cpus=4, memory="4Gi"), host("c", cpus=4, memory="4Gi")]
    files = tree(**{"env.yaml": environment("production"), "m.yaml": custom_model(
        "m", "environment: production\nreplicas: 2\nruntime: {type: custom, image: x:1, "
             "resources: {cpus: 1.5, memory: 512Mi}}"),
        "s.yaml": custom_model("s", "environment: production\nserverless: {minReplicas: 0, maxReplicas: 2}\n"
                                    "runtime: {type: custom, image: y:1, resources: {cpus: 0.25, memory: 128Mi}}"),
        "off.yaml": custom_model("off", "environment: production\nenabled: false\nreplicas: 3\n"
                                        "runtime: {type: custom, image: z:1, resources: {cpus: 2}}")})
    _, desired = desired_of(files, hosts)
    reserved = reserved_capacity(desired, hosts)
    assert set(reserved) == {"a", "b", "c"}
    assert sum(c for c, _ in reserved.values()) == pytest.approx(2 * 1.5 + 0.25)  # the standby counts
    assert sum(m for _, m in reserved.values()) == 2 * 512 * 2**20 + 128 * 2**20
    for name, (cpus, memory) in reserved.items():
        placed = [r for r in desired.replicas if r.host == name]
        assert cpus == pytest.approx(sum(r.runtime.cpus for r in placed))
        assert memory == sum(r.runtime.memory for r in placed)
    assert reserved_capacity(desired, [*hosts, host("empty")])["empty"] == (0.0, 0)


def test_a_serverless_standby_is_placed_on_a_host_that_holds_its_model_already() -> None:
    """The same .mar in two environments is one artifact per host: the new deployment's standby
    goes where the model is (a start, not a transfer, on its first request)."""
    digest = "ab" * 32
    dep = (f"environment: production\norigin: {{file: {{sha256: 'sha256:{digest}'}}}}\n"
           "serverless: {minReplicas: 0, maxReplicas: 2}\nruntime: {type: torch}")
    files = tree(**{"env.yaml": environment("production"), "m.yaml": custom_model("m", dep)})
    hosts = [host("a-1", location="paris-1"), host("b-1", location="lyon-1"), host("c-1", location="nice-1")]
    _, cold = desired_of(files, hosts)
    first = cold.replicas[0].host
    for holder in sorted({"a-1", "b-1", "c-1"} - {first}):
        _, warm = desired_of(files, hosts, artifacts={holder: frozenset({f"sha256:{digest}"}), first: frozenset()})
        assert [r.host for r in warm.replicas] == [holder]
    # Another artifact on a host is no reason to go there.
    _, other = desired_of(files, hosts, artifacts={h.name: frozenset({"sha256:" + "cd" * 32}) for h in hosts})
    assert [r.host for r in other.replicas] == [first]
