"""What the shipper tells a replica about the artifact it mounts: the runtime contract's fields."""

from __future__ import annotations

from pathlib import Path

from modelfleet.reconciler.artifacts.shipping import ArtifactShipper
from modelfleet.reconciler.artifacts.store import ArtifactStore
from modelfleet.runtimes.contract import RuntimeEnvironment

COMMIT = "5" * 40


def test_an_archive_names_its_file_and_model(tmp_path: Path, good_mar: Path) -> None:
    store = ArtifactStore(tmp_path)
    stored = store.ingest_file(good_mar)
    shipper = ArtifactShipper(store, None)
    origin = {"file": {"sha256": stored.ref, "path": "models/tiny.mar"}}
    told = shipper.runtime_environment(origin)
    assert told == RuntimeEnvironment(model_dir="/model", artifact=stored.ref, model_archive="/model/tiny.mar",
                                      model_name="tiny")
    assert shipper.container_env(origin) == {
        "MODELFLEET_MODEL_DIR": "/model", "MODELFLEET_ARTIFACT": stored.ref,
        "MODELFLEET_MODEL_ARCHIVE": "/model/tiny.mar", "MODELFLEET_MODEL_NAME": "tiny"}


def test_a_huggingface_snapshot_names_its_repository_and_commit_and_stays_offline(tmp_path: Path) -> None:
    shipper = ArtifactShipper(ArtifactStore(tmp_path), None)
    origin = {"huggingface": {"model": "org/m", "revision": "main", "commit": COMMIT}}
    env = shipper.container_env(origin)
    assert env == {"MODELFLEET_MODEL_DIR": "/model", "MODELFLEET_ARTIFACT": f"hf:org/m@{COMMIT}",
                   "MODELFLEET_MODEL_ID": "org/m", "MODELFLEET_HF_COMMIT": COMMIT,
                   "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # What the runtime reads back is exactly what the shipper meant.
    assert RuntimeEnvironment.from_env(env) == shipper.runtime_environment(origin)


def test_no_origin_no_variables(tmp_path: Path) -> None:
    shipper = ArtifactShipper(ArtifactStore(tmp_path), None)
    assert shipper.container_env(None) == {} and shipper.runtime_environment({}) == RuntimeEnvironment()
