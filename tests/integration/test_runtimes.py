"""The runtime images on a real Docker host: built (or loaded from the cache), then run the way the
reconciler runs them (docker_pool.HostClient: cap_drop ALL, no-new-privileges, init, CPU/memory
limits, the model mounted read-only at /model), answering real requests; and run by the daemon
itself, reporting the model and deployment the daemon told them (the runtime contract).

The image build is the expensive part: the rootfs, the wheelhouse and the built image (a
``docker save`` tarball) are cached in ``$MODELFLEET_CACHE_DIR`` (default /var/cache/modelfleet),
outside the repository, so later sessions only ``docker load`` it (~30 s) into their fresh host.
Only the first test host gets the images: every test here runs on it.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelfleet.reconciler.gateway.routes import RouteStore
from modelfleet.reconciler.images import build, content
from modelfleet.reconciler.pool.adapter import ContainerSpec, HostClient
from modelfleet.runtimes.contract import RuntimeEnvironment
from modelfleet.state.pool import Host
from tests.integration.conftest import remove_managed_containers
from tests.integration.fleet import API, make_fleet, running
from tests.reconciler.artifacts.hub_standin import FAKE_COMMIT, HubStandin, minilm_repos
from tests.runtimes import hf_builder, mar_builder

pytest.importorskip("torch", reason="runtime tests need the runtime extras (pip install -e '.[dev]')")

READY_TIMEOUT = 180.0


@pytest.fixture(scope="session")
def runtime_host(docker_hosts: list[Any]) -> Iterator[Any]:
    """The first test host, with the runtime images (built once, then loaded from the cache)."""
    host = docker_hosts[0]
    cache_dir = Path(os.environ.get("MODELFLEET_CACHE_DIR") or build.DEFAULT_CACHE_DIR)
    report = build.build_runtime_images([host.docker_url], base_image="local", cache_dir=cache_dir, progress=False)
    print("\n" + report.summary())
    yield host


@pytest.fixture
def pool_client(runtime_host: Any) -> Iterator[HostClient]:
    remove_managed_containers([runtime_host])
    host = Host(name=runtime_host.name, url=runtime_host.docker_url,
                location={"name": "test", "country": "FR", "continent": "EU"},
                flavors=[{"name": "cpu", "type": "cpu"}],
                capacity={"cpus": 2, "memory": "4Gi"})
    client = HostClient(host, timeout=60)
    yield client
    client.close()
    remove_managed_containers([runtime_host])


@pytest.fixture
def model_volume() -> Iterator[Path]:
    """A host directory for the model (the test hosts share the machine's filesystem)."""
    path = Path("/var/lib/modelfleet-test") / f"models-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def start(client: HostClient, image: str, model_dir: Path, env: dict[str, str] | None = None) -> tuple[str, int]:
    spec = ContainerSpec(
        name=f"mf-rt-{uuid.uuid4().hex[:8]}", image=image, command=None, environment=env or {},
        labels={"modelfleet.managed": "true", "modelfleet.model": "runtime-test"}, port=8080,
        cpus=1.0, memory=2 * 2**30, volumes={str(model_dir): {"bind": "/model", "mode": "ro"}},
    )
    info = client.create_and_start(spec)
    return info.id, info.ports[8080]


def wait_ready(url: str, client: HostClient, container_id: str, timeout: float = READY_TIMEOUT) -> float:
    t0 = time.monotonic()
    last: Any = None
    while time.monotonic() - t0 < timeout:
        try:
            response = httpx.get(url, timeout=2.0)
            if response.status_code == 200:
                return time.monotonic() - t0
            last = response.text
            if '"failed"' in last:  # the runtime says why it will never be ready
                break
        except httpx.TransportError as exc:
            last = exc
        time.sleep(0.1)
    logs = client.logs_tail(container_id, 30)
    raise AssertionError(f"{url} not ready (after {time.monotonic() - t0:.0f} s; last: {last}); logs: {logs}")


def inspect(runtime_host: Any, container_id: str) -> dict[str, Any]:
    docker_client = runtime_host.client()
    try:
        return dict(docker_client.api.inspect_container(container_id))
    finally:
        docker_client.close()


def exec_in(runtime_host: Any, container_id: str, cmd: list[str]) -> tuple[int, str]:
    docker_client = runtime_host.client()
    try:
        result = docker_client.containers.get(container_id).exec_run(cmd)
        return int(result.exit_code), result.output.decode(errors="replace")
    finally:
        docker_client.close()


def test_images_are_unprivileged_and_labelled(runtime_host: Any) -> None:
    docker_client = runtime_host.client()
    try:
        for kind, name in content.RUNTIME_IMAGES.items():
            config = docker_client.api.inspect_image(name)["Config"]
            assert config["User"] == content.RUNTIME_USER
            assert config["Labels"][content.LABEL_RUNTIME] == kind
            assert config["Labels"][content.LABEL_CONTENT_HASH]
            assert config["Entrypoint"][-1] == content.ENTRY_MODULES[kind]
            assert "8080/tcp" in config["ExposedPorts"]
    finally:
        docker_client.close()
    # A second build is a no-op: same content hash already on the host.
    report = build.build_runtime_images([runtime_host.docker_url], base_image="local", progress=False)
    assert [h.action for h in report.hosts] == ["present"]


def test_torch_runtime_serves_a_mar(runtime_host: Any, pool_client: HostClient, model_volume: Path) -> None:
    mar = mar_builder.build_eager_mar(model_volume / "build")
    shutil.copy(mar, model_volume / "tiny.mar")
    shutil.rmtree(model_volume / "build")
    container_id, port = start(pool_client, content.IMAGE_TORCH, model_volume)
    url = runtime_host.url(port)
    wait_ready(url + "ping", pool_client, container_id)
    assert httpx.get(url + "ping").json() == {"status": "Healthy"}

    x = [0.5, -1.0, 2.0, 0.25]
    response = httpx.post(url + "predictions/tiny", json={"inputs": x}, timeout=30)
    assert response.status_code == 200, response.text
    import torch

    with torch.no_grad():
        expected = mar_builder.tiny_net()(torch.tensor([x])).tolist()[0]
    assert response.json()["logits"] == pytest.approx(expected, abs=1e-5)
    failed = httpx.post(url + "predictions/tiny", json="boom", timeout=30)
    assert failed.status_code == 503 and failed.json()["type"] == "InternalServerException"
    assert httpx.post(url + "predictions/other", json={}, timeout=30).status_code == 404
    assert httpx.get(url + "ping").status_code == 200

    # The container runs as the reconciler starts it: unprivileged, no capabilities, read-only model.
    data = inspect(runtime_host, container_id)
    assert data["Config"]["User"] == content.RUNTIME_USER
    assert data["HostConfig"]["CapDrop"] == ["ALL"]
    assert "no-new-privileges" in data["HostConfig"]["SecurityOpt"]
    assert data["HostConfig"]["Memory"] == 2 * 2**30 and data["HostConfig"]["NanoCpus"] == 10**9
    assert [m["RW"] for m in data["Mounts"] if m["Destination"] == "/model"] == [False]
    code, out = exec_in(runtime_host, container_id, ["id", "-u"])
    assert (code, out.strip()) == (0, "65534")
    code, _ = exec_in(runtime_host, container_id, ["sh", "-c", "echo x > /model/written"])
    assert code != 0
    assert not (model_volume / "written").exists()


def test_transformers_runtime_serves_minilm(runtime_host: Any, pool_client: HostClient, model_volume: Path) -> None:
    model_dir = hf_builder.copy_minilm(model_volume / "minilm")
    t0 = time.monotonic()
    container_id, port = start(pool_client, content.IMAGE_TRANSFORMERS, model_dir,
                               env={"MODEL_ID": "sentence-transformers/all-MiniLM-L6-v2"})
    url = runtime_host.url(port)
    wait_ready(url + "health", pool_client, container_id)
    response = httpx.post(url + "v1/embeddings", json={"input": ["A man is eating food.", "hello"]}, timeout=60)
    cold_start = time.monotonic() - t0
    print(f"\nMiniLM cold start (create -> first embedding): {cold_start:.2f} s")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    from sentence_transformers import SentenceTransformer

    expected = SentenceTransformer(str(hf_builder.minilm_dir()), device="cpu").encode(
        ["A man is eating food.", "hello"], normalize_embeddings=True)
    for got, want in zip(body["data"], expected, strict=True):
        vector = got["embedding"]
        dot = sum(a * float(b) for a, b in zip(vector, want, strict=True))
        assert dot / math.sqrt(sum(a * a for a in vector)) == pytest.approx(1.0, abs=1e-5)
    embed = httpx.post(url + "embed", json={"inputs": "hello"}, timeout=60)
    assert embed.status_code == 200 and len(embed.json()[0]) == 384
    info = httpx.get(url + "info").json()
    assert info["task"] == "embeddings" and info["status"] == "ready"
    data = inspect(runtime_host, container_id)
    assert data["Config"]["User"] == content.RUNTIME_USER and data["HostConfig"]["CapDrop"] == ["ALL"]
    # Offline inside: HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE come with the image.
    assert {"HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1", "MODEL_DIR=/model"} <= set(data["Config"]["Env"])


def test_transformers_runtime_generates(runtime_host: Any, pool_client: HostClient, model_volume: Path) -> None:
    model_dir = hf_builder.build_tiny_causal_lm(model_volume / "lm")
    container_id, port = start(pool_client, content.IMAGE_TRANSFORMERS, model_dir)
    url = runtime_host.url(port)
    wait_ready(url + "health", pool_client, container_id)
    response = httpx.post(url + "v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["role"] == "assistant"
    assert httpx.post(url + "generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 3}},
                      timeout=60).status_code == 200


def test_a_broken_model_is_never_ready(runtime_host: Any, pool_client: HostClient, model_volume: Path) -> None:
    mar = mar_builder.build_failing_mar(model_volume / "build")
    shutil.copy(mar, model_volume / "broken.mar")
    shutil.rmtree(model_volume / "build")
    _container_id, port = start(pool_client, content.IMAGE_TORCH, model_volume)
    url = runtime_host.url(port)
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url + "ping", timeout=2.0)
            if response.json().get("phase") == "failed":
                break
            assert response.status_code != 200
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    assert response.status_code == 500
    assert "weights are corrupt" in response.json()["message"]


def test_unreadable_model_files_are_named(runtime_host: Any, pool_client: HostClient, model_volume: Path) -> None:
    """Weights written 0600 by root (save_pretrained does that) cannot be read by uid 65534: said clearly."""
    model_dir = hf_builder.build_tiny_causal_lm(model_volume / "lm")
    (model_dir / "model.safetensors").chmod(0o600)
    container_id, port = start(pool_client, content.IMAGE_TRANSFORMERS, model_dir)
    url = runtime_host.url(port)
    with pytest.raises(AssertionError, match=r"not readable by uid 65534.*model\.safetensors"):
        wait_ready(url + "health", pool_client, container_id, timeout=120)


MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def test_the_runtimes_report_what_the_daemon_told_them(runtime_host: Any, clean_hosts: list[Any],
                                                       tmp_path: Path) -> None:
    """End to end through the daemon: a .mar (torch) and a HuggingFace model (transformers) deployed
    on the host with the images; each running container says, through the gateway, which artifact,
    model id, commit and deployment it serves: exactly what the daemon passed in its environment."""
    repos, _ = minilm_repos()
    with HubStandin(repos) as hub:
        fleet = make_fleet(tmp_path, clean_hosts, rollout={"healthyDeadline": "180s"},
                           integrations={"huggingface": {"endpoint": hub.url}})
        # Only the first host has the runtime images: the environment runs on it alone.
        fleet.push({
            "environments.yaml": {"apiVersion": API, "kind": "Environment", "metadata": {"name": "production"},
                                  "spec": {"policies": ["first-host"]}},
            "policies.yaml": {"apiVersion": API, "kind": "Policy", "metadata": {"name": "first-host"},
                              "spec": {"type": "location", "locations": [{"type": "location", "name": "paris-1"}]}},
        }, "base")
        with running(fleet):
            mar = mar_builder.build_eager_mar(tmp_path / "mar", name="tiny", version="1.0")
            uploaded = httpx.put(f"http://127.0.0.1:{fleet.api_port}/api/v1/artifacts?name=tiny.mar",
                                 content=mar.read_bytes(), timeout=60, trust_env=False)
            assert uploaded.status_code == 201, uploaded.text
            digest = uploaded.json()["sha256"]
            resources = {"cpus": 0.5, "memory": "1Gi"}  # both fit the host's 2Gi

            def deployment(runtime: str, origin: dict[str, Any]) -> dict[str, Any]:
                return {"deployments": [{"environment": "production", "replicas": 1, "origin": origin,
                                         "runtime": {"type": runtime, "resources": resources}}]}

            revision = fleet.push({
                "models/tiny.yaml": {"apiVersion": API, "kind": "Model", "metadata": {"name": "tiny-model"},
                                     "spec": deployment("torch", {"file": {"sha256": digest}})},
                "models/minilm.yaml": {"apiVersion": API, "kind": "Model", "metadata": {"name": "minilm"},
                                       "spec": deployment("transformers", {"huggingface": {"model": MINILM,
                                                                                        "revision": "main"}})},
            })

            def both_ready() -> bool:
                for name in ("tiny-model", "minilm"):
                    d = fleet.deployment(name)
                    if d.get("reason") in ("RolloutFailed", "InvalidManifest"):
                        raise AssertionError(f"{name}: {d['message']}")
                    if not (d.get("revision") == revision and d.get("state") == "success"
                            and d.get("ready_replicas") == 1):
                        return False
                return fleet.routed()

            fleet.wait(both_ready, 300, "both models ready")
            gateway = f"http://127.0.0.1:{fleet.gateway_port}/models"

            # torch: TorchServe's describe, with the deployment and artifact the daemon passed.
            response = httpx.get(f"{gateway}/tiny-model/models/tiny", timeout=10, trust_env=False)
            assert response.status_code == 200, response.text
            [described] = response.json()
            assert (described["modelName"], described["modelVersion"]) == ("tiny", "1.0")
            assert described["modelfleet"] == {"model": "tiny-model", "environment": "production",
                                               "artifact": digest, "model_id": None, "model_name": "tiny",
                                               "hf_commit": None}
            assert httpx.post(f"{gateway}/tiny-model/predictions/tiny", json={"inputs": [1, 2, 3, 4]},
                              timeout=30, trust_env=False).status_code == 200

            # transformers: TEI's /info, with the model id and the commit the branch resolved to.
            info = httpx.get(f"{gateway}/minilm/info", timeout=10, trust_env=False).json()
            assert (info["model_id"], info["model_sha"], info["model_dir"]) == (MINILM, FAKE_COMMIT, "/model")
            assert info["modelfleet"] == {"model": "minilm", "environment": "production",
                                          "artifact": f"hf:{MINILM}@{FAKE_COMMIT}", "model_id": MINILM,
                                          "model_name": None, "hf_commit": FAKE_COMMIT}
            embedded = httpx.post(f"{gateway}/minilm/v1/embeddings", json={"input": "hello"}, timeout=60,
                                  trust_env=False)
            assert embedded.status_code == 200 and embedded.json()["model"] == MINILM

            # The gateway is the only way in: the replicas' ports are published on the host's pool
            # address (not 0.0.0.0), and a request sent to them directly, without the deployment's
            # secret the gateway adds, is refused; only the readiness probe answers.
            store = RouteStore(fleet.state_dir)
            try:
                table = store.latest()
            finally:
                store.close()
            assert table is not None
            direct = {key: backends[0].url for key, backends in table.routes.items() if backends}
            assert len(direct) == 2, table.routes
            for url in direct.values():
                refused = httpx.post(f"{url}/predictions/tiny", json={"inputs": [1, 2, 3, 4]}, timeout=10,
                                     trust_env=False)
                assert refused.status_code == 401, (url, refused.status_code, refused.text)
                spoofed = httpx.get(f"{url}/info", headers={"x-modelfleet-gateway-secret": "guess"}, timeout=10,
                                    trust_env=False)
                assert spoofed.status_code == 401
            for name, path in (("tiny-model", "/ping"), ("minilm", "/health")):
                assert httpx.get(f"{direct[f'{name}/production']}{path}", timeout=10,
                                 trust_env=False).status_code == 200

            # What they report is what their environment holds, in the contract's names.
            replicas = [c for c in fleet.containers() if "modelfleet.model" in c["labels"]]
            assert sorted(c["labels"]["modelfleet.model"] for c in replicas) == ["minilm", "tiny-model"]
            for container in replicas:
                env_list = inspect(runtime_host, container["id"])["Config"]["Env"]
                env = dict(item.split("=", 1) for item in env_list)
                told = RuntimeEnvironment.from_env(env)
                assert told.deployment_model == container["labels"]["modelfleet.model"]
                assert told.model_dir == "/model" and told.port == 8080
                assert told.artifact in (digest, f"hf:{MINILM}@{FAKE_COMMIT}")
                assert told.gateway_secret and told.open_path in ("/ping", "/health")
                bindings = inspect(runtime_host, container["id"])["HostConfig"]["PortBindings"]
                assert {b["HostIp"] for b in bindings["8080/tcp"]} == {runtime_host.address}, bindings


def test_torch_batch_settings_reach_the_container_and_a_change_rolls_it_out(runtime_host: Any,
                                                                            clean_hosts: list[Any],
                                                                            tmp_path: Path) -> None:
    """runtime.batchSize / maxBatchDelay through the daemon: the container on the host is told them,
    the runtime in it batches with them (TorchServe's describe through the gateway, the handler's
    context), and changing batchSize is a new spec: a new container replaces the old one."""
    fleet = make_fleet(tmp_path, clean_hosts, rollout={"healthyDeadline": "180s"})
    fleet.push({
        "environments.yaml": {"apiVersion": API, "kind": "Environment", "metadata": {"name": "production"},
                              "spec": {"policies": ["first-host"]}},
        "policies.yaml": {"apiVersion": API, "kind": "Policy", "metadata": {"name": "first-host"},
                          "spec": {"type": "location", "locations": [{"type": "location", "name": "paris-1"}]}},
    }, "base")
    with running(fleet):
        mar = mar_builder.build_eager_mar(tmp_path / "mar", name="tiny", version="1.0")
        uploaded = httpx.put(f"http://127.0.0.1:{fleet.api_port}/api/v1/artifacts?name=tiny.mar",
                             content=mar.read_bytes(), timeout=60, trust_env=False)
        assert uploaded.status_code == 201, uploaded.text
        digest = uploaded.json()["sha256"]

        def push(batch_size: int) -> str:
            runtime = {"type": "torch", "resources": {"cpus": 0.5, "memory": "1Gi"}, "batchSize": batch_size,
                       "maxBatchDelay": "50ms"}
            return fleet.push({"models/tiny.yaml": {
                "apiVersion": API, "kind": "Model", "metadata": {"name": "tiny-model"},
                "spec": {"deployments": [{"environment": "production", "replicas": 1,
                                          "origin": {"file": {"sha256": digest}}, "runtime": runtime}]}}},
                f"batchSize {batch_size}")

        def ready(revision: str) -> Any:
            d = fleet.deployment("tiny-model")
            if d.get("reason") in ("RolloutFailed", "InvalidManifest"):
                raise AssertionError(d["message"])
            replicas = [c for c in fleet.containers() if c["labels"].get("modelfleet.model") == "tiny-model"]
            return (d.get("revision") == revision and d.get("state") == "success" and d.get("ready_replicas") == 1
                    and len(replicas) == 1 and fleet.routed() and replicas[0])

        revision = push(4)
        first = fleet.wait(lambda: ready(revision), 300, "tiny-model ready with batchSize 4")
        gateway = f"http://127.0.0.1:{fleet.gateway_port}/models/tiny-model"
        [described] = httpx.get(f"{gateway}/models/tiny", timeout=10, trust_env=False).json()
        assert (described["batchSize"], described["maxBatchDelay"]) == (4, 50)
        env = dict(item.split("=", 1) for item in inspect(runtime_host, first["id"])["Config"]["Env"])
        assert (env["MODELFLEET_BATCH_SIZE"], env["MODELFLEET_MAX_BATCH_DELAY"]) == ("4", "50")
        answer = httpx.post(f"{gateway}/predictions/tiny", json={"inputs": [1, 2, 3, 4]}, timeout=30, trust_env=False)
        assert answer.status_code == 200 and answer.json()["batch_size"] == 4  # the handler's context

        revision = push(2)
        second = fleet.wait(lambda: (c := ready(revision)) and c["name"] != first["name"] and c, 300,
                            "tiny-model rolled out with batchSize 2")
        assert second["labels"]["modelfleet.spec-hash"] != first["labels"]["modelfleet.spec-hash"]
        [described] = httpx.get(f"{gateway}/models/tiny", timeout=10, trust_env=False).json()
        assert described["batchSize"] == 2
