"""The environment of the containers the daemon creates: the runtime contract, the manifest's
runtime.env on top, and what a runtime server reads back from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelfleet.reconciler.artifacts.shipping import ArtifactShipper
from modelfleet.reconciler.artifacts.store import ArtifactStore
from modelfleet.reconciler.config import RolloutSettings
from modelfleet.reconciler.daemon.store import Store
from modelfleet.reconciler.pool.adapter import ContainerSpec
from modelfleet.reconciler.rollout.apply import Applier
from modelfleet.runtimes.contract import ContractError, RuntimeEnvironment
from modelfleet.state.desired import OriginFacts, compute_desired
from modelfleet.state.loader import load_tree
from tests.state.helpers import fixture_pool

COMMIT = "6" * 40
ENV = b"apiVersion: modelfleet.dev/v1alpha1\nkind: Environment\nmetadata: {name: staging}\n"


def manifest(runtime: str, extra: str = "", origin: bool = True) -> bytes:
    origin_block = "      origin:\n        huggingface: {model: org/m, revision: main}\n" if origin else ""
    image = "" if origin else "        image: example/echo:1\n"
    return (f"apiVersion: modelfleet.dev/v1alpha1\nkind: Model\nmetadata: {{name: m}}\nspec:\n  deployments:\n"
            f"    - environment: staging\n{origin_block}      runtime:\n        type: {runtime}\n"
            f"{image}{extra}").encode()


class _Client:
    name = "h"


def spec(tmp_path: Path, model: bytes, origin_env: object = None) -> ContainerSpec:
    catalog = load_tree({"env.yaml": ENV, "m.yaml": model})
    desired = compute_desired(catalog, fixture_pool(), "rev",
                              origin_facts=OriginFacts(commits={("org/m", "main"): COMMIT}))
    shipper = ArtifactShipper(ArtifactStore(tmp_path / "artifacts"), None)
    applier = Applier({}, {}, Store(tmp_path), RolloutSettings(), lambda: None,
                      origin_env=origin_env or shipper.container_env)  # type: ignore[arg-type]
    return applier._container_spec(_Client(), desired.replicas[0], "mf-staging-m-0-x")  # type: ignore[arg-type]


def test_our_runtime_is_told_its_model_deployment_and_port(tmp_path: Path) -> None:
    env = spec(tmp_path, manifest("transformers", "        port: 9000\n")).environment
    assert env == {"MODELFLEET_MODEL_DIR": "/model", "MODELFLEET_ARTIFACT": f"hf:org/m@{COMMIT}",
                   "MODELFLEET_MODEL_ID": "org/m", "MODELFLEET_HF_COMMIT": COMMIT, "HF_HUB_OFFLINE": "1",
                   "TRANSFORMERS_OFFLINE": "1", "MODELFLEET_MODEL": "m", "MODELFLEET_ENVIRONMENT": "staging",
                   "PORT": "9000"}
    # Exactly what the server reads (it reads nothing else of the daemon's).
    assert RuntimeEnvironment.from_env(env) == RuntimeEnvironment(
        model_dir="/model", artifact=f"hf:org/m@{COMMIT}", model_id="org/m", hf_commit=COMMIT,
        deployment_model="m", deployment_environment="staging", port=9000, offline=True)


def test_official_images_get_no_port_variable(tmp_path: Path) -> None:
    env = spec(tmp_path, manifest("tei")).environment
    assert "PORT" not in env and env["MODELFLEET_MODEL_ID"] == "org/m" and env["MODELFLEET_MODEL"] == "m"


def test_a_custom_image_without_origin_is_told_its_deployment_only(tmp_path: Path) -> None:
    env = spec(tmp_path, manifest("custom", "        env: {VERSION: v1}\n", origin=False)).environment
    assert env == {"VERSION": "v1", "MODELFLEET_MODEL": "m", "MODELFLEET_ENVIRONMENT": "staging"}


def test_the_manifest_env_goes_on_top_and_older_names_still_win(tmp_path: Path) -> None:
    extra = "        env: {MODEL_ID: my-alias, PORT: '9100', MODELFLEET_ENVIRONMENT: custom-env}\n"
    env = spec(tmp_path, manifest("transformers", extra)).environment
    assert env["MODEL_ID"] == env["MODELFLEET_MODEL_ID"] == "my-alias"
    assert env["PORT"] == "9100" and env["MODELFLEET_ENVIRONMENT"] == "custom-env"
    told = RuntimeEnvironment.from_env(env)
    assert (told.model_id, told.port, told.hf_commit) == ("my-alias", 9100, COMMIT)


def test_an_origin_hook_outside_the_contract_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ContractError, match="MODELFLEET_HF_MODEL"):
        spec(tmp_path, manifest("transformers"), origin_env=lambda origin: {"MODELFLEET_HF_MODEL": "org/m"})


def test_the_torch_runtime_is_told_its_batch_settings_only_when_the_manifest_sets_them(tmp_path: Path) -> None:
    env = spec(tmp_path, manifest("torch", "        batchSize: 8\n        maxBatchDelay: 5ms\n")).environment
    assert (env["MODELFLEET_BATCH_SIZE"], env["MODELFLEET_MAX_BATCH_DELAY"]) == ("8", "5")
    told = RuntimeEnvironment.from_env(env)
    assert (told.batch_size, told.max_batch_delay) == (8, 5)
    unset = spec(tmp_path / "unset", manifest("torch")).environment
    assert "MODELFLEET_BATCH_SIZE" not in unset and "MODELFLEET_MAX_BATCH_DELAY" not in unset
