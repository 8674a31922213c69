"""The runtime contract: the variables the daemon writes are the ones the servers read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from modelfleet.runtimes import contract
from modelfleet.runtimes.contract import ContractError, RuntimeEnvironment

FULL = RuntimeEnvironment(
    model_dir="/model", artifact="hf:org/m@" + "a" * 40, model_archive="/model/m.mar", model_name="m",
    model_id="org/m", hf_commit="a" * 40, deployment_model="m", deployment_environment="production",
    port=9000, offline=True, gateway_secret="s" * 64, open_path="/ping", batch_size=8, max_batch_delay=5,
)


def test_to_env_uses_the_canonical_names_and_omits_what_is_unset() -> None:
    assert FULL.to_env() == {
        "MODELFLEET_MODEL_DIR": "/model", "MODELFLEET_ARTIFACT": "hf:org/m@" + "a" * 40,
        "MODELFLEET_MODEL_ARCHIVE": "/model/m.mar", "MODELFLEET_MODEL_NAME": "m", "MODELFLEET_MODEL_ID": "org/m",
        "MODELFLEET_HF_COMMIT": "a" * 40, "MODELFLEET_MODEL": "m", "MODELFLEET_ENVIRONMENT": "production",
        "PORT": "9000", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "MODELFLEET_GATEWAY_SECRET": "s" * 64, "MODELFLEET_OPEN_PATH": "/ping",
        "MODELFLEET_BATCH_SIZE": "8", "MODELFLEET_MAX_BATCH_DELAY": "5",
    }
    assert RuntimeEnvironment().to_env() == {}
    assert RuntimeEnvironment(model_id="org/m").to_env() == {"MODELFLEET_MODEL_ID": "org/m"}


def test_what_the_daemon_writes_the_runtime_reads_back() -> None:
    assert RuntimeEnvironment.from_env(FULL.to_env()) == FULL
    assert RuntimeEnvironment.from_env(FULL.to_env(), strict=True) == FULL
    assert RuntimeEnvironment.from_env({}) == RuntimeEnvironment()
    assert set(FULL.to_env()) == contract.VARIABLES  # every field has its variable, and no more


@pytest.mark.parametrize(("environ", "message"), [
    ({"MODELFLEET_BATCH_SIZE": "0"}, "MODELFLEET_BATCH_SIZE=0: use 1-1024 (runtime.batchSize)"),
    ({"MODELFLEET_BATCH_SIZE": "2000"}, "MODELFLEET_BATCH_SIZE=2000: use 1-1024"),
    ({"MODELFLEET_BATCH_SIZE": "eight"}, "MODELFLEET_BATCH_SIZE='eight': not a whole number; use 1-1024 "
                                         "(the daemon sets it from runtime.batchSize)"),
    ({"MODELFLEET_MAX_BATCH_DELAY": "10001"}, "MODELFLEET_MAX_BATCH_DELAY=10001: use 0-10000 milliseconds"),
    ({"MODELFLEET_MAX_BATCH_DELAY": "5ms"}, "not a whole number; use 0-10000 milliseconds (the daemon sets it "
                                            "from runtime.maxBatchDelay)"),
])
def test_batch_settings_out_of_range_name_the_variable_and_the_manifest_field(environ: dict[str, str],
                                                                             message: str) -> None:
    with pytest.raises(ContractError) as caught:
        RuntimeEnvironment.from_env(environ)
    assert message in str(caught.value)


def test_batch_settings_are_given_to_a_deployment_and_default_to_unset() -> None:
    base = RuntimeEnvironment(model_dir="/model")
    assert "MODELFLEET_BATCH_SIZE" not in base.for_deployment("m", "prod", port=8080).to_env()
    env = base.for_deployment("m", "prod", port=8080, batch_size=4, max_batch_delay=0).to_env()
    assert (env["MODELFLEET_BATCH_SIZE"], env["MODELFLEET_MAX_BATCH_DELAY"]) == ("4", "0")
    assert RuntimeEnvironment.from_env(env).max_batch_delay == 0  # 0 is a value (no waiting), not unset


def test_defaults_when_nothing_is_set() -> None:
    empty = RuntimeEnvironment.from_env({"UNRELATED": "x", "MODELFLEET_MODEL_DIR": "  "})
    assert empty.model_path == "/model" == contract.DEFAULT_MODEL_DIR
    assert empty.listen_port == 8080 == contract.DEFAULT_PORT
    assert empty.model_dir is None  # blank counts as unset


def test_the_older_names_are_fallbacks() -> None:
    legacy = RuntimeEnvironment.from_env({"MODEL_DIR": "/srv/m", "MODEL_FILE": "x.mar", "MODEL_NAME": "renamed",
                                          "MODEL_ID": "org/legacy"})
    assert (legacy.model_dir, legacy.model_archive, legacy.model_name, legacy.model_id) == (
        "/srv/m", "x.mar", "renamed", "org/legacy")
    # The image sets MODEL_DIR=/model; what the daemon says comes first.
    both = RuntimeEnvironment.from_env({"MODEL_DIR": "/model", "MODELFLEET_MODEL_DIR": "/elsewhere"})
    assert both.model_dir == "/elsewhere"


def test_the_manifest_env_goes_on_top_and_an_old_name_there_wins_over_the_daemon() -> None:
    daemon = RuntimeEnvironment(model_dir="/model", model_id="org/m", deployment_model="m", port=8080)
    env = daemon.merged_with({"MODEL_ID": "my-alias", "PORT": "9001", "EXTRA": "1"})
    assert env["MODELFLEET_MODEL_ID"] == "my-alias" and env["MODEL_ID"] == "my-alias"
    assert env["PORT"] == "9001" and env["EXTRA"] == "1" and env["MODELFLEET_MODEL"] == "m"
    assert RuntimeEnvironment.from_env(env).model_id == "my-alias"  # what the server will serve as
    # The canonical name set by the manifest wins over its older name.
    env = daemon.merged_with({"MODEL_ID": "old", "MODELFLEET_MODEL_ID": "new"})
    assert RuntimeEnvironment.from_env(env).model_id == "new"
    assert daemon.merged_with({}) == daemon.to_env()


def test_for_deployment() -> None:
    origin = RuntimeEnvironment(model_dir="/model", model_id="org/m", offline=True)
    replica = origin.for_deployment("m", "staging", port=None)
    assert replica.to_env() == {**origin.to_env(), "MODELFLEET_MODEL": "m", "MODELFLEET_ENVIRONMENT": "staging"}
    assert origin.for_deployment("m", "staging", port=7000).to_env()["PORT"] == "7000"


@pytest.mark.parametrize(("environ", "message"), [
    ({"PORT": "eighty"}, r"PORT='eighty': not a port number; set it to 1-65535"),
    ({"PORT": "70000"}, r"PORT=70000: not a port number; use 1-65535"),
    ({"PORT": "0"}, r"PORT=0: not a port number"),
])
def test_bad_values_say_which_variable_and_the_fix(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ContractError, match=message):
        RuntimeEnvironment.from_env(environ)


def test_strict_reading_rejects_what_is_not_in_the_contract() -> None:
    with pytest.raises(ContractError, match="not variables of the runtime contract: MODEL_DIR, VERSION"):
        RuntimeEnvironment.from_env({"VERSION": "1", "MODEL_DIR": "/model"}, strict=True)


def test_values_are_checked() -> None:
    with pytest.raises(ContractError, match="MODELFLEET_MODEL_NAME=''"):
        RuntimeEnvironment(model_name="")
    with pytest.raises(ContractError, match="NUL"):
        RuntimeEnvironment(model_id="a\0b")


def test_provenance_reports_what_the_daemon_said() -> None:
    assert FULL.provenance() == {"model": "m", "environment": "production", "artifact": "hf:org/m@" + "a" * 40,
                                 "model_id": "org/m", "model_name": "m", "hf_commit": "a" * 40}


def test_the_contract_imports_the_standard_library_only() -> None:
    """It is copied into the images with the servers, and imported by the daemon."""
    tree = ast.parse(Path(contract.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__", "collections", "dataclasses", "typing"}
