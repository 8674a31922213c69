"""The container specs the daemon creates, checked precisely for the runtimes whose official images
cannot run here (TEI, TGI: no registry) and for ours: image, args, port, probe, env, limits, mount."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from modelfleet.reconciler.config import RolloutSettings
from modelfleet.reconciler.daemon.store import Store
from modelfleet.reconciler.rollout.apply import Applier
from modelfleet.state.desired import OriginFacts, compute_desired
from modelfleet.state.loader import load_tree
from tests.state.helpers import fixture_pool

COMMIT = "4" * 40
ENV = b"apiVersion: modelfleet.dev/v1alpha1\nkind: Environment\nmetadata: {name: production}\n"


def model_yaml(runtime: str, extra: str = "") -> bytes:
    return f"""apiVersion: modelfleet.dev/v1alpha1
kind: Model
metadata: {{name: m}}
spec:
  deployments:
    - environment: production
      origin:
        huggingface: {{model: org/m, revision: main}}
      runtime:
        type: {runtime}
{extra}""".encode()


class _Client:
    name = "h"


def spec_for(tmp_path: Path, runtime: str, extra: str = "") -> tuple[Any, Any]:
    catalog = load_tree({"env.yaml": ENV, "m.yaml": model_yaml(runtime, extra)})
    desired = compute_desired(catalog, fixture_pool(), "rev",
                              origin_facts=OriginFacts(commits={("org/m", "main"): COMMIT}))
    replica = desired.replicas[0]
    applier = Applier({}, {}, Store(tmp_path), RolloutSettings(), lambda: None,
                      prepare_volumes=lambda client, r: {"mf-artifact-x": {"bind": "/model", "mode": "ro"}},
                      origin_env=lambda origin: {"HF_HUB_OFFLINE": "1", "MODELFLEET_MODEL_DIR": "/model"})
    return applier._container_spec(_Client(), replica, "mf-production-m-0-x"), replica  # type: ignore[arg-type]


@pytest.mark.parametrize(("runtime", "image"), [
    ("tei", "ghcr.io/huggingface/text-embeddings-inference:cpu-1.5"),
    ("tgi", "ghcr.io/huggingface/text-generation-inference:2.4.0"),
])
def test_official_images_get_the_shipped_snapshot_pinned_commit_and_offline_mode(
        tmp_path: Path, runtime: str, image: str) -> None:
    spec, replica = spec_for(tmp_path, runtime)
    assert spec.image == image
    # The model comes from the read-only volume, at exactly the resolved commit, never downloaded.
    assert spec.command == ["--model-id", "/model", "--revision", COMMIT, "--port", "80"]
    assert spec.volumes == {"mf-artifact-x": {"bind": "/model", "mode": "ro"}}
    assert spec.environment["HF_HUB_OFFLINE"] == "1"
    assert spec.port == 80
    assert replica.runtime.probe.path == "/health" and replica.runtime.probe.port == 80
    assert "PORT" not in spec.environment  # the official images take --port
    assert not any("token" in key.lower() for key in spec.environment)  # the HF token never goes in
    assert spec.labels["modelfleet.model"] == "m" and spec.labels["modelfleet.managed"] == "true"


def test_air_gapped_registry_override_and_resources(tmp_path: Path) -> None:
    extra = """        image: registry.internal/tei:cpu-1.5
        resources: {cpus: 2, memory: 3Gi}
        port: 8000
"""
    spec, _ = spec_for(tmp_path, "tei", extra)
    assert spec.image == "registry.internal/tei:cpu-1.5"
    assert spec.cpus == 2 and spec.memory == 3 * 2**30
    assert spec.port == 8000
    assert spec.command[-2:] == ["--port", "8000"]  # the server listens where we publish


def test_our_runtimes_listen_on_the_manifest_port(tmp_path: Path) -> None:
    spec, replica = spec_for(tmp_path, "transformers", "        port: 9000\n")
    assert spec.image == "modelfleet/runtime-transformers:0.1.0"
    assert spec.environment["PORT"] == "9000" and spec.port == 9000
    assert spec.command is None  # the image's entry point runs the server
    assert replica.runtime.probe.path == "/health" and replica.runtime.probe.port == 9000
