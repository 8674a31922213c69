"""Loading manifests: every kind of bad input is reported with file, line and field, all at once."""

from __future__ import annotations

import hashlib

import pytest

from modelfleet.state.errors import ManifestError
from modelfleet.state.loader import is_manifest_path, load_tree
from tests.state.helpers import API, custom_model, desired_of, echo_deployment, environment, fixture_pool, tree

POLICY_EU = f"""\
{API}
kind: Policy
metadata: {{name: eu}}
spec:
  type: location
  locations: [{{type: continent, name: EU}}]
"""
ENVS = environment("production", "eu") + "---\n" + environment("development")
BASE = {"environments.yaml": ENVS, "policies.yaml": POLICY_EU}


def with_base(**files: str | bytes) -> dict[str, bytes]:
    return tree(**BASE, **files)


MODEL_OK = custom_model("ok", echo_deployment("production"))

# name → (files, [(file, line, field, words in the message, words in the hint)])
BAD_INPUT: dict[str, tuple[dict[str, bytes], list[tuple[str, int, str, str, str]]]] = {
    "unknown-top-level-key": (with_base(**{"m.yaml": f"""
        {API}
        kind: Model
        metadata: {{name: m}}
        specs: {{}}
        """}), [
        ("m.yaml", 4, "specs", "unknown field 'specs'", "did you mean 'spec'?"),
        ("m.yaml", 1, "spec", "required field is missing", ""),
    ]),
    "unknown-nested-key-in-deployment": (with_base(**{"m.yaml": f"""
        {API}
        kind: Model
        metadata: {{name: m}}
        spec:
          deployments:
            - environment: production
              runtime:
                type: custom
                imagee: example/echo:1
        """}), [
        ("m.yaml", 9, "spec.deployments[0].runtime.imagee", "unknown field 'imagee'", "did you mean 'image'?"),
    ]),
    "unknown-key-lists-allowed-fields": (with_base(**{"m.yaml": f"""
        {API}
        kind: Model
        metadata: {{name: m}}
        spec:
          deployments:
            - environment: production
              runtime: {{type: custom, image: x}}
              zzz: 1
        """}), [
        ("m.yaml", 8, "spec.deployments[0].zzz", "unknown field 'zzz'", "allowed: environment, enabled, policies"),
    ]),
    "wrong-type-replicas": (with_base(**{"m.yaml": f"""
        {API}
        kind: Model
        metadata: {{name: m}}
        spec:
          deployments:
            - environment: production
              replicas: two
              runtime: {{type: custom, image: x}}
        """}), [
        ("m.yaml", 7, "spec.deployments[0].replicas", "valid integer", ""),
    ]),
    "wrong-type-policies-not-a-list": (with_base(**{"env.yaml": f"""
        {API}
        kind: Environment
        metadata: {{name: staging}}
        spec:
          policies: eu
        """}), [
        ("env.yaml", 5, "spec.policies", "valid list", ""),
    ]),
    "wrong-type-memory": (with_base(**{"m.yaml": f"""
        {API}
        kind: Model
        metadata: {{name: m}}
        spec:
          deployments:
            - environment: production
              runtime:
                type: custom
                image: x
                resources: {{cpus: 1, memory: lots}}
        """}), [
        ("m.yaml", 10, "spec.deployments[0].runtime.resources.memory", "'lots' is not a memory quantity", ""),
    ]),
    "memory-too-large-to-be-a-number": (with_base(**{"m.yaml": f"""
        {API}
        kind: Model
        metadata: {{name: m}}
        spec:
          deployments:
            - environment: production
              runtime:
                type: custom
                image: x
                resources:
                  memory: {"9" * 400}Gi
        """}), [
        ("m.yaml", 11, "spec.deployments[0].runtime.resources.memory", "is not a memory quantity", ""),
    ]),
    "memory-infinite": (with_base(**{"m.yaml": f"""
        {API}
        kind: Model
        metadata: {{name: m}}
        spec:
          deployments:
            - environment: production
              runtime:
                type: custom
                image: x
                resources:
                  memory: .inf
        """}), [
        ("m.yaml", 11, "spec.deployments[0].runtime.resources.memory", "memory", ""),
    ]),
    "wrong-literal-location-type": (with_base(**{"p.yaml": f"""
        {API}
        kind: Policy
        metadata: {{name: city}}
        spec:
          type: location
          locations:
            - {{type: city, name: paris}}
        """}), [
        ("p.yaml", 7, "spec.locations[0].type", "'city' is not allowed", "use one of 'country', 'continent'"),
    ]),
    "policy-type-and-body-disagree": (with_base(**{"p.yaml": f"""
        {API}
        kind: Policy
        metadata: {{name: odd}}
        spec:
          type: location
          flavors: [{{type: cpu, name: amd-genoa}}]
        """}), [
        ("p.yaml", 4, "spec", "a policy of type location needs spec.locations", ""),
    ]),
    "bad-name-uppercase-underscore": (with_base(**{"m.yaml": f"""
        {API}
        kind: Environment
        metadata:
          name: Staging_EU
        """}), [
        ("m.yaml", 4, "metadata.name", "'Staging_EU' is not a valid name", ""),
    ]),
    "bad-name-too-long": (with_base(**{"m.yaml": f"""
        {API}
        kind: Policy
        metadata:
          name: {"a" * 64}
        spec: {{type: location, locations: [{{type: country, name: FR}}]}}
        """}), [
        ("m.yaml", 4, "metadata.name", "is not a valid name", ""),
    ]),
    "bad-name-trailing-dash-environment-reference": (with_base(**{"m.yaml": f"""
        {API}
        kind: Model
        metadata: {{name: m}}
        spec:
          deployments:
            - environment: prod-
              runtime: {{type: custom, image: x}}
        """}), [
        ("m.yaml", 6, "spec.deployments[0].environment", "'prod-' is not a valid name", ""),
    ]),
    "bad-name-in-policy-list": (with_base(**{"env.yaml": f"""
        {API}
        kind: Environment
        metadata: {{name: staging}}
        spec:
          policies:
            - eu
            - EU Only
        """}), [
        ("env.yaml", 7, "spec.policies[1]", "'EU Only' is not a valid name", ""),
    ]),
    "duplicate-model-across-files": (with_base(**{"a.yaml": MODEL_OK, "b.yaml": "# copy\n" + MODEL_OK}), [
        ("b.yaml", 4, "metadata.name", "duplicate Model 'ok'", "first defined at a.yaml:1"),
    ]),
    "duplicate-environment": (tree(**BASE, **{"more.yaml": environment("production")}), [
        ("more.yaml", 3, "metadata.name", "duplicate Environment 'production'",
         "first defined at environments.yaml:1"),
    ]),
    "duplicate-policy-in-one-file": (with_base(**{"p.yaml": POLICY_EU + "---\n" + POLICY_EU}), [
        ("p.yaml", 10, "metadata.name", "duplicate Policy 'eu'", "first defined at p.yaml:1"),
        ("policies.yaml", 3, "metadata.name", "duplicate Policy 'eu'", "first defined at p.yaml:1"),
    ]),
    "two-deployments-of-one-model-on-one-environment": (with_base(**{"m.yaml": custom_model(
        "m", echo_deployment("production"), echo_deployment("development"), echo_deployment("production"))}), [
        ("m.yaml", 12, "spec.deployments[2].environment",
         "model 'm' already has a deployment on environment 'production'", "first at m.yaml:6"),
    ]),
    "duplicate-yaml-key": (with_base(**{"m.yaml": f"""
        {API}
        kind: Model
        metadata: {{name: m}}
        spec:
          deployments:
            - environment: production
              replicas: 1
              runtime: {{type: custom, image: x}}
              replicas: 3
        """}), [
        ("m.yaml", 9, "spec.deployments[0].replicas", "key appears twice", "keep one"),
    ]),
    "dangling-environment": (with_base(**{"m.yaml": custom_model("m", echo_deployment("prodution"))}), [
        ("m.yaml", 6, "spec.deployments[0].environment", "unknown environment 'prodution'",
         "did you mean 'production'?"),
    ]),
    "dangling-policy-of-environment": (with_base(**{"env.yaml": environment("staging", "eu", "gpu")}), [
        ("env.yaml", 5, "spec.policies[1]", "unknown policy 'gpu'", "known: eu"),
    ]),
    "dangling-policy-of-deployment": (with_base(**{"m.yaml": custom_model(
        "m", echo_deployment("production", extra="policies: [euu]\n"))}), [
        ("m.yaml", 8, "spec.deployments[0].policies[0]", "unknown policy 'euu'", "did you mean 'eu'?"),
    ]),
    "environment-that-failed-validation-is-not-unknown": (tree(**{
        "policies.yaml": POLICY_EU,
        "env.yaml": f"{API}\nkind: Environment\nmetadata: {{name: production}}\nspec: {{policy: [eu]}}\n",
        "m.yaml": custom_model("m", echo_deployment("production"))}), [
        ("env.yaml", 4, "spec.policy", "unknown field 'policy'", "did you mean 'policies'?"),
        ("m.yaml", 6, "spec.deployments[0].environment", "environment 'production' is invalid",
         "fix the Environment manifest first"),
    ]),
    "yaml-syntax-error": (with_base(**{"m.yaml": f"""
        {API}
        kind: Model
        metadata: {{name: m}}
        spec:
          deployments:
            - environment: production
              runtime: {{type: custom, image: x
        """}), [
        ("m.yaml", 8, "", "invalid YAML", "fix the YAML syntax"),
    ]),
    "yaml-bad-indentation": (with_base(**{"m.yaml": f"""
        {API}
        kind: Model
        metadata:
          name: m
         labels: {{}}
        """}), [
        ("m.yaml", 5, "", "invalid YAML", "fix the YAML syntax"),
    ]),
    "multi-document-error-in-third-document-has-absolute-line": (with_base(**{"all.yaml": (
        environment("staging") + "---\n" + POLICY_EU.replace("name: eu", "name: eu2") + "---\n"
        + custom_model("m", "environment: staging\nreplicas: -1\nruntime: {type: custom, image: x}"))}), [
        ("all.yaml", 20, "spec.deployments[0].replicas", "greater than or equal to 0", ""),
    ]),
    "non-utf8": (with_base(**{"m.yaml": f"{API}\nkind: Model\nmetadata: {{name: caf\xe9}}\n".encode("latin-1")}), [
        ("m.yaml", 3, "", "not UTF-8 text", "save the file as UTF-8"),
    ]),
    "unsupported-api-version": (with_base(**{"m.yaml": "apiVersion: modelfleet.dev/v9\nkind: Model\n"}), [
        ("m.yaml", 1, "apiVersion", "unsupported apiVersion 'modelfleet.dev/v9'", "use modelfleet.dev/v1alpha1"),
    ]),
    "unknown-kind": (with_base(**{"m.yaml": f"{API}\nkind: Modle\nmetadata: {{name: m}}\n"}), [
        ("m.yaml", 2, "kind", "unknown kind 'Modle'", "did you mean 'Model'?"),
    ]),
    "wrong-type-metadata": (with_base(**{"m.yaml": f"{API}\nkind: Environment\nmetadata: [production]\n"}), [
        ("m.yaml", 3, "metadata", "valid dictionary", ""),
    ]),
    "replicas-and-serverless": (with_base(**{"m.yaml": custom_model("m", echo_deployment(
        "production", extra="serverless: {maxReplicas: 2}\n"))}), [
        ("m.yaml", 6, "spec.deployments[0]", "either replicas or serverless, not both", ""),
    ]),
    "serverless-min-above-max": (with_base(**{"m.yaml": custom_model("m", """
        environment: production
        serverless: {minReplicas: 3, maxReplicas: 2}
        runtime: {type: custom, image: x}""")}), [
        ("m.yaml", 7, "spec.deployments[0].serverless", "minReplicas must not exceed", ""),
    ]),
    "serverless-standby-unknown-mode": (with_base(**{"m.yaml": custom_model("m", """
        environment: production
        serverless: {minReplicas: 0, standby: frozen}
        runtime: {type: custom, image: x}""")}), [
        ("m.yaml", 7, "spec.deployments[0].serverless.standby", "'frozen' is not allowed",
         "use one of 'stopped' or 'paused'"),
    ]),
    "origin-missing-for-huggingface-runtime": (with_base(**{"m.yaml": custom_model("m", """
        environment: production
        runtime: {type: transformers}""")}), [
        ("m.yaml", 6, "spec.deployments[0]", "origin may be omitted only for runtime.type custom", ""),
    ]),
    "origin-with-two-sources": (with_base(**{"m.yaml": custom_model("m", """
        environment: production
        origin:
          huggingface: {model: org/name}
          file: {path: models/a.mar}""")}), [
        ("m.yaml", 7, "spec.deployments[0].origin", "exactly one of huggingface or file", ""),
    ]),
    "origin-file-path-escapes-repo": (with_base(**{"m.yaml": custom_model("m", """
        environment: production
        origin: {file: {path: ../secrets.mar}}""")}), [
        ("m.yaml", 7, "spec.deployments[0].origin.file", "without '..'", ""),
    ]),
    "bad-huggingface-id": (with_base(**{"m.yaml": custom_model("m", """
        environment: production
        origin: {huggingface: {model: "a/b/c"}}""")}), [
        ("m.yaml", 7, "spec.deployments[0].origin.huggingface.model", "is not a HuggingFace model id", ""),
    ]),
    "bad-env-var-name": (with_base(**{"m.yaml": custom_model("m", """
        environment: production
        runtime:
          type: custom
          image: x
          env: {"BAD-NAME": "1"}""")}), [
        ("m.yaml", 10, "spec.deployments[0].runtime.env", "'BAD-NAME' is not a valid environment variable", ""),
    ]),
    "environment-with-unknown-policy-freezes-its-deployments": (tree(**{
        "policies.yaml": POLICY_EU,
        "env.yaml": environment("production", "eu", "gpu"),
        "m.yaml": custom_model("m", echo_deployment("production"))}), [
        ("env.yaml", 5, "spec.policies[1]", "unknown policy 'gpu'", "known: eu"),
        ("m.yaml", 6, "spec.deployments[0].environment",
         "environment 'production' refers to unknown policy 'gpu'", "fix the Environment or Policy manifest first"),
    ]),
    "environment-with-invalid-policy-freezes-its-deployments": (tree(**{
        "policies.yaml": POLICY_EU.replace("continent, name: EU", "planet, name: Earth"),
        "env.yaml": environment("production", "eu"),
        "m.yaml": custom_model("m", echo_deployment("production"))}), [
        ("m.yaml", 6, "spec.deployments[0].environment",
         "environment 'production' refers to invalid policy 'eu'", "fix the Environment or Policy manifest first"),
        ("policies.yaml", 6, "spec.locations[0].type", "'planet' is not allowed", ""),
    ]),
    "kind-not-a-string": (with_base(**{"m.yaml": f"{API}\nkind: [Model]\nmetadata: {{name: m}}\n"}), [
        ("m.yaml", 2, "kind", "unknown kind ['Model']", "did you mean 'Model'?"),
    ]),
    "yaml-tag-with-impossible-value": (with_base(**{"m.yaml": f"""
        {API}
        kind: Model
        metadata: {{name: m}}
        spec:
          deployments:
            - environment: production
              enabled: !!bool maybe
              replicas: !!int ""
        """}), [
        ("m.yaml", 7, "", "invalid YAML: 'maybe' is not a valid tag:yaml.org,2002:bool", "fix the YAML syntax"),
    ]),
    "deployment-without-environment": (with_base(**{"m.yaml": custom_model("m", """
        replicas: 1
        runtime: {type: custom, image: x}""")}), [
        ("m.yaml", 6, "spec.deployments[0].environment", "required field is missing", ""),
    ]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT), ids=list(BAD_INPUT))
def test_bad_input_is_reported_with_file_line_and_field(case: str) -> None:
    files, expected = BAD_INPUT[case]
    expected = sorted(expected)  # errors come sorted by file, line, field
    errors = load_tree(files).all_errors()
    got = [(e.file, e.line, e.field) for e in errors]
    assert got == [(f, line, field) for f, line, field, _, _ in expected], [str(e) for e in errors]
    for error, (file, line, field, message, hint) in zip(errors, expected, strict=True):
        assert message in error.message
        assert hint in error.hint
        assert isinstance(error, ManifestError)
        # The rendered form is what CI logs and editors jump to: file:line: field: message (hint)
        text = str(error)
        assert text.startswith(f"{file}:{line}: {field}: " if field else f"{file}:{line}: ")
        assert error.message in text and error.hint in text


def test_all_errors_of_a_repo_are_reported_at_once() -> None:
    files = {}
    for case in ("unknown-nested-key-in-deployment", "wrong-type-policies-not-a-list", "bad-name-uppercase-underscore",
                 "yaml-syntax-error", "non-utf8", "dangling-policy-of-deployment"):
        case_files, _ = BAD_INPUT[case]
        # Each case's extra file gets its own name so that they all sit in one repository.
        for path, body in case_files.items():
            files[path if path in ("environments.yaml", "policies.yaml") else f"{case}/{path}"] = body
    errors = load_tree(files).all_errors()
    assert {e.file.split("/")[0] for e in errors} == {
        "unknown-nested-key-in-deployment", "wrong-type-policies-not-a-list", "bad-name-uppercase-underscore",
        "yaml-syntax-error", "non-utf8", "dangling-policy-of-deployment"}
    assert len(errors) == 6
    assert errors == sorted(errors)  # stable order: by file, then line


def test_a_valid_repo_has_no_errors_and_loads_every_kind() -> None:
    catalog = load_tree(with_base(**{"models/ok.yaml": MODEL_OK}))
    assert catalog.all_errors() == []
    assert catalog.complete
    assert set(catalog.environments) == {"production", "development"}
    assert set(catalog.policies) == {"eu"}
    assert [(d.model, d.environment, d.valid) for d in catalog.deployments()] == [("ok", "production", True)]


def test_multi_document_file_loads_every_kind_with_absolute_lines() -> None:
    files = tree(**{"all.yaml": "# comment\n---\n" + ENVS + "---\n" + POLICY_EU + "---\n" + MODEL_OK + "---\n"})
    catalog = load_tree(files)
    assert catalog.all_errors() == []
    assert catalog.environments["production"][1].where == "all.yaml:3"
    assert catalog.environments["development"][1].where == "all.yaml:9"
    assert catalog.policies["eu"][1].where == "all.yaml:15"
    assert catalog.models["ok"].deployments[0].source.where == "all.yaml:27"


def test_documents_that_are_not_manifests_are_skipped() -> None:
    files = with_base(**{
        "models/ok.yaml": MODEL_OK,
        "ci.yaml": "stages: [test]\ntest: {script: make}\n",          # a CI file
        "modelfleet.yaml": "pool: {hosts: []}\n",                     # the daemon config
        "list.yml": "- a\n- b\n",
        ".github/workflows/broken.yaml": "on: [push\n",                # hidden dir: never read
        "notes.txt": "kind: Model\n",                                  # not a .yaml file
        "empty.yaml": "",
    })
    catalog = load_tree(files)
    assert catalog.all_errors() == []
    assert catalog.complete
    assert set(catalog.models) == {"ok"}


@pytest.mark.parametrize(("path", "expected"), [
    ("models/a.yaml", True), ("a.yml", True), ("a.json", False), (".hidden/a.yaml", False),
    ("models/.git/a.yaml", False), (".modelfleet.yaml", True),
])
def test_is_manifest_path(path: str, expected: bool) -> None:
    assert is_manifest_path(path) is expected


# --- errors stay local --------------------------------------------------------------------------


INCOMPLETE = {
    "syntax-error": b"kind: Model\nmetadata: {name: [\n",
    "non-utf8": b"\xff\xfe\x00",
    "unknown-kind": f"{API}\nkind: Modle\nmetadata: {{name: x}}\n".encode(),
    "unsupported-api-version": b"apiVersion: modelfleet.dev/v2\nkind: Model\nmetadata: {name: x}\n",
    "nameless-model": f"{API}\nkind: Model\nmetadata: {{}}\nspec: {{}}\n".encode(),
}


@pytest.mark.parametrize("case", list(INCOMPLETE), ids=list(INCOMPLETE))
def test_unreadable_files_make_the_catalog_incomplete(case: str) -> None:
    files: dict[str, str | bytes] = {"models/ok.yaml": MODEL_OK, "models/broken.yaml": INCOMPLETE[case]}
    catalog = load_tree(with_base(**files))
    assert not catalog.complete
    assert catalog.all_errors() and all(e.file == "models/broken.yaml" for e in catalog.all_errors())
    assert set(catalog.models) == {"ok"}


def test_a_named_but_invalid_model_keeps_the_catalog_complete() -> None:
    # Its name is known, so its deployments are known to be invalid rather than removed.
    broken = custom_model("broken", echo_deployment("production", extra="replicas: lots\n"))
    catalog = load_tree(with_base(**{"ok.yaml": MODEL_OK, "broken.yaml": broken}))
    assert catalog.complete
    assert [d.valid for d in catalog.models["broken"].deployments] == [False]


def test_a_broken_model_is_invalid_and_the_others_still_plan() -> None:
    broken = custom_model("broken", echo_deployment("production"), echo_deployment("development")).replace(
        "metadata: {name: broken}", "metadata: {name: broken, labels: [x]}")
    files = with_base(**{"ok.yaml": MODEL_OK, "broken.yaml": broken,
                         "other.yaml": custom_model("other", echo_deployment("development", replicas=2))})
    catalog, desired = desired_of(files, fixture_pool())
    assert [(e.file, e.line, e.field) for e in catalog.all_errors()] == [("broken.yaml", 3, "metadata.labels")]
    # The broken model: every deployment frozen, invalid, with the model's error, no replica.
    for env in ("production", "development"):
        state = desired.deployments[("broken", env)]
        assert state.frozen and ("broken", env) in desired.frozen
        assert [e.field for e in state.errors] == ["metadata.labels"]
    # The others are planned as usual.
    assert sorted((r.model, r.environment, r.index) for r in desired.replicas) == [
        ("ok", "production", 0), ("other", "development", 0), ("other", "development", 1)]
    assert desired.deployments[("ok", "production")].errors == []


def test_a_broken_deployment_freezes_only_that_deployment() -> None:
    model = custom_model("m", echo_deployment("production", extra="replicas: lots\n"),
                         echo_deployment("development"))
    catalog, desired = desired_of(with_base(**{"m.yaml": model}), fixture_pool())
    assert catalog.models["m"].errors == []
    assert ("m", "production") in desired.frozen and ("m", "development") not in desired.frozen
    assert [(r.environment, r.index) for r in desired.replicas] == [("development", 0)]


def test_a_model_level_error_freezes_its_valid_deployments_too() -> None:
    """Two deployments on one environment: the model is invalid, none of its deployments changes."""
    model = custom_model("m", echo_deployment("production"), echo_deployment("development"),
                         echo_deployment("production", image="example/echo:2"))
    _, desired = desired_of(with_base(**{"m.yaml": model}), fixture_pool())
    assert {("m", "production"), ("m", "development")} <= desired.frozen
    assert desired.replicas == []
    assert all(state.errors for state in desired.deployments.values())
    assert desired.errors and "already has a deployment" in desired.errors[0].message


def test_artifact_digests_are_computed_for_file_origins_in_the_tree() -> None:
    model = custom_model("m", """
        environment: production
        origin: {file: {path: artifacts/m.mar}}""")
    files: dict[str, str | bytes] = {"m.yaml": model, "artifacts/m.mar": b"PK\x03\x04 not really"}
    catalog = load_tree(with_base(**files))
    assert catalog.all_errors() == []
    assert catalog.artifact_digests == {"artifacts/m.mar": hashlib.sha256(b"PK\x03\x04 not really").hexdigest()}


def test_a_file_origin_missing_from_the_tree_is_an_error_of_the_deployment() -> None:
    model = custom_model("m", """
        environment: production
        origin: {file: {path: artifacts/missing.mar}}""")
    _, desired = desired_of(with_base(**{"m.yaml": model}), fixture_pool())
    [error] = desired.deployments[("m", "production")].errors
    assert (error.file, error.line, error.field) == ("m.yaml", 7, "spec.deployments[0].origin.file.path")
    assert "'artifacts/missing.mar' is not in the repository" in error.message
    assert error in desired.errors
