"""Runtime suggestion from the origin and the Hub's metadata, and HF resolution errors."""

from __future__ import annotations

import pytest

from modelfleet.state.desired import OriginFacts, compute_desired
from modelfleet.state.loader import load_tree
from modelfleet.state.manifests import Origin
from modelfleet.state.runtimes import suggest_runtime
from tests.state.helpers import fixture_pool

HF = Origin.model_validate({"huggingface": {"model": "org/m"}})
MAR = Origin.model_validate({"file": {"sha256": "a" * 64}})


@pytest.mark.parametrize(
    ("origin", "metadata", "official", "expected", "why"),
    [
        (MAR, None, False, "torch", ".mar"),
        (HF, None, False, "transformers", "HuggingFace"),
        (HF, {"library_name": "sentence-transformers"}, False, "transformers", "embeddings"),
        (HF, {"library_name": "sentence-transformers"}, True, "tei", "text-embeddings-inference"),
        (HF, {"pipeline_tag": "feature-extraction"}, True, "tei", "pipeline_tag feature-extraction"),
        (HF, {"pipeline_tag": "text-generation"}, False, "transformers", "text-generation"),
        (HF, {"pipeline_tag": "text-generation"}, True, "tgi", "text-generation-inference"),
        (HF, {"library_name": "diffusers", "pipeline_tag": "text-to-image"}, True, "transformers", "diffusers"),
        (HF, {"pipeline_tag": "text-classification"}, False, "transformers", "text-classification"),
        (None, None, False, "custom", "no origin"),
    ],
)
def test_suggested_runtime_and_reason(origin: Origin | None, metadata: dict[str, str] | None, official: bool,
                                      expected: str, why: str) -> None:
    kind, reason = suggest_runtime(origin, metadata, official)
    assert kind == expected
    assert why in reason


TREE = {
    "env.yaml": b"apiVersion: modelfleet.dev/v1alpha1\nkind: Environment\nmetadata: {name: production}\n",
    "m.yaml": b"""apiVersion: modelfleet.dev/v1alpha1
kind: Model
metadata: {name: emb}
spec:
  deployments:
    - environment: production
      origin:
        huggingface: {model: org/emb, revision: main}
""",
}


def test_metadata_reaches_the_plan_and_commit_pins_the_spec() -> None:
    sample_hosts = fixture_pool()
    catalog = load_tree(TREE)
    facts = OriginFacts(commits={("org/emb", "main"): "1" * 40},
                        metadata={("org/emb", "main"): {"pipeline_tag": "feature-extraction"}})
    desired = compute_desired(catalog, sample_hosts, "r1", origin_facts=facts)
    state = desired.deployments[("emb", "production")]
    assert state.runtime is not None and "embeddings" in state.runtime.reason
    moved = compute_desired(catalog, sample_hosts, "r2",
                            origin_facts=OriginFacts(commits={("org/emb", "main"): "2" * 40}))
    # The branch moved: a new commit is a new spec (a visible replace), never a silent change.
    assert moved.deployments[("emb", "production")].spec_hash != state.spec_hash
    assert desired.replicas[0].origin == {"huggingface": {"model": "org/emb", "revision": "main", "commit": "1" * 40}}


def test_unresolvable_revision_freezes_the_deployment_with_a_located_error() -> None:
    sample_hosts = fixture_pool()
    facts = OriginFacts(errors={("org/emb", "main"): "revision 'main' of 'org/emb' not found (404)"})
    desired = compute_desired(load_tree(TREE), sample_hosts, "r1", origin_facts=facts)
    state = desired.deployments[("emb", "production")]
    assert state.frozen and not desired.replicas
    assert str(state.errors[0]).startswith("m.yaml:8: spec.deployments[0].origin.huggingface: revision 'main'")
