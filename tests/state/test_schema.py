"""The manifests' JSON Schema (editor support): checked in, generated, and in step with the models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import TypeAdapter, ValidationError

from modelfleet.state.schema import SCHEMA_PATH, ManifestDocument, manifest_schema, render_manifest_schema
from modelfleet.state.yaml_source import parse_documents
from tests.state.helpers import FIXTURES

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples-repo"
# examples-repo is copied into a repository of its own (dev/demo): it carries its own copy.
CHECKED_IN = [ROOT / SCHEMA_PATH, EXAMPLES / SCHEMA_PATH]
MODELINE = "# yaml-language-server: $schema="
VALIDATOR = jsonschema.Draft7Validator(manifest_schema())
DOCUMENTS: TypeAdapter[Any] = TypeAdapter(ManifestDocument)


def manifest_documents(root: Path) -> list[tuple[str, int, dict[str, Any]]]:
    """(file, line, data) of every manifest document under ``root``."""
    found = []
    for path in sorted(root.rglob("*.yaml")):
        for doc in parse_documents(path.read_text()):
            if isinstance(doc.data, dict) and str(doc.data.get("apiVersion", "")).startswith("modelfleet.dev/"):
                found.append((path.relative_to(ROOT).as_posix(), doc.start_line, doc.data))
    return found


def schema_errors(data: object) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATOR.iter_errors(data)]


def model_accepts(data: object) -> bool:
    try:
        DOCUMENTS.validate_python(data)
    except ValidationError:
        return False
    return True


@pytest.mark.parametrize("path", CHECKED_IN, ids=[p.relative_to(ROOT).as_posix() for p in CHECKED_IN])
def test_checked_in_schema_is_what_the_models_generate(path: Path) -> None:
    assert path.is_file(), f"{path} is missing: run `modelfleet schema --output {path.relative_to(ROOT)}`"
    assert path.read_text(encoding="utf-8") == render_manifest_schema(), (
        f"{path.relative_to(ROOT)} is stale: run `modelfleet schema --output {path.relative_to(ROOT)}`")


def test_schema_is_draft07_with_one_branch_per_kind() -> None:
    schema = manifest_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    kinds = [schema["definitions"][ref["$ref"].rsplit("/", 1)[1]]["properties"]["kind"]["const"]
             for ref in schema["oneOf"]]
    assert kinds == ["Environment", "Policy", "Model"]


def test_schema_uses_the_yaml_names_forbids_unknown_keys_and_has_descriptions() -> None:
    definitions = manifest_schema()["definitions"]
    runtime = definitions["Runtime"]
    assert {"readinessProbe", "resources", "image"} <= set(runtime["properties"])
    assert "readiness_probe" not in runtime["properties"]
    assert set(definitions["Serverless"]["properties"]) == {
        "minReplicas", "maxReplicas", "metric", "target", "scaleDownDelay", "scaleToZeroGrace", "stableWindow",
        "panicWindow", "panicThreshold", "queue", "activationTimeout", "standby"}
    assert set(definitions["Overflow"]["properties"]) == {
        "endpoint", "tokenFile", "healthCheck", "outlierDetection", "maxConcurrency", "percentage"}
    assert set(definitions["OverflowHealthCheck"]["properties"]) == {"path", "period", "timeout", "failureThreshold"}
    assert set(definitions["OutlierDetection"]["properties"]) == {"consecutiveFailures", "ejectionTime"}
    assert "overflow" in definitions["Deployment"]["properties"]
    assert all(d.get("additionalProperties") is False for d in definitions.values())
    assert "suggested from the origin" in runtime["properties"]["type"]["description"]
    assert definitions["Deployment"]["description"]


def test_every_example_manifest_is_valid_against_the_schema() -> None:
    documents = manifest_documents(EXAMPLES)
    assert len(documents) == 10  # 2 environments, 5 policies, 3 models
    for file, line, data in documents:
        assert schema_errors(data) == [], f"{file}:{line}"


MANIFEST_FILES = sorted(p for p in EXAMPLES.rglob("*.yaml") if p.name != "modelfleet.yaml")  # not the config


@pytest.mark.parametrize("path", MANIFEST_FILES, ids=lambda p: p.relative_to(EXAMPLES).as_posix())
def test_every_example_document_opens_with_a_modeline_that_resolves_to_the_schema(path: Path) -> None:
    text = path.read_text()
    # yaml-language-server reads the modeline of each document, not of the file: every one needs it.
    documents = text.split("\n---\n")
    assert len(documents) == len(list(parse_documents(text)))
    for document in documents:
        modeline = document.splitlines()[0]
        assert modeline.startswith(MODELINE), f"{path}: a document does not open with {MODELINE}..."
        # Relative to the manifest, as the language server resolves it; inside examples-repo, so it
        # also resolves in the standalone repository dev/demo makes of it.
        target = (path.parent / modeline.removeprefix(MODELINE)).resolve()
        assert target == (EXAMPLES / SCHEMA_PATH).resolve()


TYPOS = [
    # the YAML with a mistyped key, the key the schema must reject
    ("metdata", {"apiVersion": "modelfleet.dev/v1alpha1", "kind": "Environment", "metdata": {"name": "p"}}),
    ("polices", {"apiVersion": "modelfleet.dev/v1alpha1", "kind": "Environment", "metadata": {"name": "p"},
                 "spec": {"polices": []}}),
    ("replicass", {"apiVersion": "modelfleet.dev/v1alpha1", "kind": "Model", "metadata": {"name": "m"},
                   "spec": {"deployments": [{"environment": "production", "replicass": 2,
                                             "runtime": {"type": "custom", "image": "x"}}]}}),
    ("initalDelay", {"apiVersion": "modelfleet.dev/v1alpha1", "kind": "Model", "metadata": {"name": "m"},
                     "spec": {"deployments": [{"environment": "production", "runtime": {
                         "type": "custom", "image": "x", "readinessProbe": {"initalDelay": "1s"}}}]}}),
    ("min_replicas", {"apiVersion": "modelfleet.dev/v1alpha1", "kind": "Model", "metadata": {"name": "m"},
                      "spec": {"deployments": [{"environment": "production", "serverless": {"min_replicas": 0},
                                                "runtime": {"type": "custom", "image": "x"}}]}}),
    ("location", {"apiVersion": "modelfleet.dev/v1alpha1", "kind": "Policy", "metadata": {"name": "p"},
                  "spec": {"type": "location", "location": [{"type": "country", "name": "FR"}]}}),
]


@pytest.mark.parametrize(("key", "document"), TYPOS, ids=[key for key, _ in TYPOS])
def test_a_mistyped_key_fails_schema_validation(key: str, document: dict[str, Any]) -> None:
    best = jsonschema.exceptions.best_match(VALIDATOR.iter_errors(document))
    assert best is not None and repr(key) in best.message


AGREEMENT = [
    # what the case shows, the document's deployment (a Model on "production"), accepted?
    ("runtime without type, only resources", {"origin": {"file": {"path": "m.mar"}},
                                              "runtime": {"resources": {"cpus": "500m", "memory": "1Gi"}}}, True),
    ("quantities as plain numbers", {"runtime": {"type": "custom", "image": "x", "resources": {
        "cpus": 2, "memory": 1073741824}, "readinessProbe": {"period": 1.5}}}, True),
    ("durations with units", {"runtime": {"type": "custom", "image": "x"},
                              "serverless": {"scaleDownDelay": "1h30m"}}, True),
    ("custom without image", {"runtime": {"type": "custom"}}, False),
    ("no origin and no runtime type", {"runtime": {"image": "x"}}, False),
    ("origin omitted for a non-custom runtime", {"runtime": {"type": "transformers"}}, False),
    ("replicas and serverless", {"replicas": 1, "serverless": {}, "runtime": {"type": "custom", "image": "x"}},
     False),
    ("two origins", {"origin": {"huggingface": {"model": "o/m"}, "file": {"path": "m.mar"}}}, False),
    ("file origin with path and sha256", {"origin": {"file": {"path": "m.mar", "sha256": "a" * 64}}}, False),
    ("file origin with neither", {"origin": {"file": {}}}, False),
    ("memory that is no quantity", {"runtime": {"type": "custom", "image": "x", "resources": {"memory": "lots"}}},
     False),
    ("unknown runtime type", {"origin": {"file": {"path": "m.mar"}}, "runtime": {"type": "onnx"}}, False),
    ("environment name that is no DNS label", {"environment": "Prod_1", "runtime": {"type": "custom", "image": "x"}},
     False),
    ("invalid environment variable name", {"runtime": {"type": "custom", "image": "x", "env": {"BAD-NAME": "1"}}},
     False),
]


@pytest.mark.parametrize(("case", "deployment", "accepted"), AGREEMENT, ids=[c for c, _, _ in AGREEMENT])
def test_schema_and_models_agree_on_a_deployment(case: str, deployment: dict[str, Any], accepted: bool) -> None:
    document = {"apiVersion": "modelfleet.dev/v1alpha1", "kind": "Model", "metadata": {"name": "m"},
                "spec": {"deployments": [{"environment": "production", **deployment}]}}
    assert model_accepts(document) is accepted
    assert (schema_errors(document) == []) is accepted


POLICIES = [
    ({"type": "location", "locations": [{"type": "continent", "name": "EU"}]}, True),
    ({"type": "maxToken", "maxTokens": {"total": 10}}, True),
    ({"type": "location"}, False),                                           # needs spec.locations
    ({"type": "location", "locations": []}, False),                          # at least one
    ({"type": "flavor", "flavors": [{"type": "cpu", "name": "x"}], "maxTokens": {}}, False),  # only its own field
]


@pytest.mark.parametrize(("spec", "accepted"), POLICIES)
def test_schema_and_models_agree_on_a_policy(spec: dict[str, Any], accepted: bool) -> None:
    document = {"apiVersion": "modelfleet.dev/v1alpha1", "kind": "Policy", "metadata": {"name": "p"}, "spec": spec}
    assert model_accepts(document) is accepted
    assert (schema_errors(document) == []) is accepted


def test_schema_and_models_agree_on_every_fixture_document() -> None:
    documents = manifest_documents(FIXTURES)
    assert len(documents) > 40
    for file, line, data in documents:
        assert (schema_errors(data) == []) is model_accepts(data), f"{file}:{line}: {schema_errors(data)}"
