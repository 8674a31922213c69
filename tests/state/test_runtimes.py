"""Runtime suggestion from the origin and the Hub's metadata, and HF resolution errors."""

from __future__ import annotations

import pytest

from modelfleet.state.desired import OriginFacts, compute_desired
from modelfleet.state.loader import load_tree
from modelfleet.state.manifests import Origin
from modelfleet.state.runtimes import suggest_runtime
from tests.state.helpers import desired_of, fixture_pool, fixture_tree

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


# --- runtime.type omitted: suggested exactly as for an omitted runtime block ----------------------

TORCH_IMAGE, TRANSFORMERS_IMAGE = "modelfleet/runtime-torch:0.1.0", "modelfleet/runtime-transformers:0.1.0"
TEI_IMAGE = "ghcr.io/huggingface/text-embeddings-inference:cpu-1.5"

RESOLVED = [
    # fixture (named after the outcome), type, words of the reason, image, port, cpus, memory, env
    ("runtime-block-omitted-suggests-torch-from-mar", "torch", ".mar", TORCH_IMAGE, 8080, 1.0, 2 * 2**30, ()),
    ("runtime-type-omitted-resources-only-suggests-torch-from-mar", "torch", ".mar", TORCH_IMAGE, 8080,
     2.0, 3 * 2**30, ()),
    ("runtime-type-omitted-resources-only-suggests-transformers-from-huggingface", "transformers",
     "HuggingFace model", TRANSFORMERS_IMAGE, 8080, 1.0, 2**30, ()),
    ("runtime-type-omitted-image-overrides-the-suggested-runtime", "torch", ".mar",
     "registry.internal/runtime-torch:0.1.0", 9000, 1.0, 2 * 2**30, (("LOG_LEVEL", "debug"),)),
    ("runtime-type-named-is-kept", "tei", "named in the manifest", TEI_IMAGE, 80, 1.0, 2 * 2**30, ()),
]


@pytest.mark.parametrize(("fixture", "kind", "why", "image", "port", "cpus", "memory", "env"), RESOLVED,
                         ids=[row[0] for row in RESOLVED])
def test_runtime_is_resolved_from_what_the_manifest_names(fixture: str, kind: str, why: str, image: str,
                                                          port: int, cpus: float, memory: int,
                                                          env: tuple[tuple[str, str], ...]) -> None:
    catalog, desired = desired_of(fixture_tree(fixture), fixture_pool())
    assert catalog.all_errors() == [] and desired.errors == []
    runtime = desired.deployments[("m", "production")].runtime
    assert runtime is not None
    assert (runtime.type, runtime.image, runtime.port, runtime.cpus, runtime.memory, runtime.env) == (
        kind, image, port, cpus, memory, env)
    assert why in runtime.reason
    assert runtime.probe.port == port  # the probe follows the port unless it names its own


def test_runtime_block_without_type_is_the_same_container_as_no_runtime_block() -> None:
    _, desired = desired_of(fixture_tree("runtime-type-omitted-same-spec-as-runtime-block-omitted"), fixture_pool())
    omitted, typeless = desired.deployments[("omitted", "production")], desired.deployments[("typeless", "production")]
    assert omitted.runtime is not None and typeless.runtime is not None
    assert omitted.runtime == typeless.runtime
    assert omitted.runtime.reason == typeless.runtime.reason
    assert omitted.spec_hash == typeless.spec_hash


def test_suggestion_for_a_typeless_runtime_uses_the_hub_metadata() -> None:
    tree = fixture_tree("runtime-type-omitted-resources-only-suggests-transformers-from-huggingface")
    facts = OriginFacts(commits={("org/model", "main"): "1" * 40},
                        metadata={("org/model", "main"): {"pipeline_tag": "feature-extraction"}},
                        prefer_official=True)
    _, desired = desired_of(tree, fixture_pool(), origin_facts=facts)
    runtime = desired.deployments[("m", "production")].runtime
    assert runtime is not None and runtime.type == "tei" and "embeddings" in runtime.reason
    assert runtime.memory == 2**30  # what the manifest says still applies to the suggested runtime
    assert runtime.args == ("--model-id", "/model", "--revision", "1" * 40, "--port", "80")


REJECTED = [
    # fixture, the rendered error (file:line: field: message)
    ("custom-runtime-without-image-error",
     "model.yaml:7: spec.deployments[0].runtime: runtime.type custom needs runtime.image (the image to run)"),
    ("runtime-type-omitted-without-origin-error",
     "model.yaml:6: spec.deployments[0]: origin may be omitted only for runtime.type custom: set runtime.type "
     "custom (with runtime.image), or give an origin to suggest the runtime from"),
    ("runtime-type-unknown-error",
     "model.yaml:10: spec.deployments[0].runtime.type: 'onnx' is not allowed "
     "(use one of 'torch', 'transformers', 'tgi', 'tei' or 'custom')"),
    ("runtime-type-omitted-bad-resources-error",
     "model.yaml:10: spec.deployments[0].runtime.resources.memory: 'lots' is not a memory quantity "
     "(use e.g. 512Mi, 2Gi, 1G)"),
]


@pytest.mark.parametrize(("fixture", "error"), REJECTED, ids=[row[0] for row in REJECTED])
def test_runtime_mistakes_are_located_errors_that_freeze_the_deployment(fixture: str, error: str) -> None:
    catalog, desired = desired_of(fixture_tree(fixture), fixture_pool())
    assert [str(e) for e in catalog.all_errors()] == [error]
    state = desired.deployments[("m", "production")]
    assert state.frozen and state.runtime is None and not desired.replicas
