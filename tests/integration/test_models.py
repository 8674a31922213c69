"""Model deployments end to end: a .mar uploaded and a HuggingFace model (through a local stand-in
of the Hub), deployed by the daemon with the real runtime images, answering through the gateway."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from netns_hosts import TestHost

from modelfleet.reconciler.images import build
from modelfleet.state.placement import PlacementRequest, place
from tests.integration.fleet import API, BASE_MANIFESTS, Fleet, make_fleet, running
from tests.reconciler.artifacts.hub_standin import FAKE_COMMIT, HubStandin, minilm_repos
from tests.runtimes import mar_builder
from tests.state.helpers import host as pool_host

pytest.importorskip("torch", reason="model tests need the runtime extras (pip install -e '.[dev]')")

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="session")
def runtime_hosts(docker_hosts: list[TestHost]) -> list[TestHost]:
    """The two EU test hosts (where production may run) with the runtime images."""
    hosts = docker_hosts[:2]
    cache_dir = Path(os.environ.get("MODELFLEET_CACHE_DIR") or build.DEFAULT_CACHE_DIR)
    report = build.build_runtime_images([h.docker_url for h in hosts], base_image="local", cache_dir=cache_dir,
                                         progress=False)
    print("\n" + report.summary())
    return docker_hosts


@pytest.fixture(scope="session")
def hub() -> Iterator[HubStandin]:
    repos, _ = minilm_repos()
    with HubStandin(repos) as standin:
        yield standin


@pytest.fixture
def model_fleet(runtime_hosts: list[TestHost], clean_hosts: list[TestHost], hub: HubStandin,
                tmp_path: Path) -> Iterator[Fleet]:
    fleet = make_fleet(tmp_path, clean_hosts, rollout={"healthyDeadline": "180s"},
                       integrations={"huggingface": {"endpoint": hub.url}})
    for host in clean_hosts:  # models from earlier tests must not make a cache hit look right
        client = host.client()
        for volume in client.volumes.list(filters={"label": "modelfleet.artifact"}):
            volume.remove(force=True)
        client.close()
    fleet.push(BASE_MANIFESTS, "base")
    with running(fleet):
        yield fleet


def model(name: str, deployment: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "Model", "metadata": {"name": name},
            "spec": {"deployments": [{"environment": "production", **deployment}]}}


def upload(fleet: Fleet, path: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "modelfleet.reconciler.cli", "upload", str(path), "--api",
         f"http://127.0.0.1:{fleet.api_port}", "--json", "--no-progress"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return str(json.loads(result.stdout)["sha256"])


def wait_model(fleet: Fleet, name: str, replicas: int = 1, revision: str | None = None) -> dict[str, Any]:
    def ok() -> Any:
        d = fleet.deployment(name)
        if d.get("reason") in ("RolloutFailed", "InvalidManifest"):
            raise AssertionError(f"{name}: {d['message']}")
        good = d.get("state") == "success" and d.get("ready_replicas") == replicas
        good = good and (revision is None or d.get("revision") == revision) and fleet.routed()
        return d if good else None
    return dict(fleet.wait(ok, 240, f"{name} ready"))


def predict(fleet: Fleet, name: str, archive_model: str, inputs: list[float],
            client: httpx.Client | None = None) -> httpx.Response:
    url = f"http://127.0.0.1:{fleet.gateway_port}/models/{name}/predictions/{archive_model}"
    return (client or httpx).post(url, json={"inputs": inputs}, timeout=30)


def expected_logits(seed: int, inputs: list[float]) -> list[float]:
    import torch

    net = mar_builder.tiny_net(seed)
    with torch.no_grad():
        return [float(x) for x in net(torch.tensor([inputs]))[0]]


def test_uploaded_mar_deploys_and_answers_like_the_model(model_fleet: Fleet, tmp_path: Path) -> None:
    mar = mar_builder.build_eager_mar(tmp_path / "v1", name="tiny", version="1.0")
    digest = upload(model_fleet, mar)
    revision = model_fleet.push({"models/tiny.yaml": model("tiny", {"origin": {"file": {"sha256": digest}}})})
    status = wait_model(model_fleet, "tiny", revision=revision)
    inputs = [0.5, -1.0, 2.0, 0.25]
    response = predict(model_fleet, "tiny", "tiny", inputs)
    assert response.status_code == 200, response.text
    got = response.json()["logits"]
    want = expected_logits(0, inputs)
    assert all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6) for a, b in zip(got, want, strict=True))
    # The plan chose the torch runtime from the .mar origin, and said why.
    plan_runtime = [c for c in model_fleet.containers() if c["labels"]["modelfleet.model"] == "tiny"]
    assert len(plan_runtime) == 1 and status["hosts"]
    # Unknown model name inside the runtime: TorchServe's error shape, through the gateway.
    missing = predict(model_fleet, "tiny", "nope", inputs)
    assert missing.status_code == 404 and missing.json()["type"] == "ModelNotFoundException"


def test_a_serverless_standby_is_placed_where_its_model_is_already(model_fleet: Fleet, tmp_path: Path) -> None:
    """Placement's locality on the real pool: a new serverless deployment of a .mar that another
    deployment runs goes to that host (its volume is there: no transfer), not where the
    rendezvous hash alone would put it."""
    digest = upload(model_fleet, mar_builder.build_eager_mar(tmp_path / "v1", name="tiny", version="1.0"))
    origin = {"file": {"sha256": digest}}
    small = {"type": "torch", "resources": {"cpus": 0.5, "memory": "512Mi"}}  # both fit on one test host
    model_fleet.push({"models/tiny.yaml": model("tiny", {"origin": origin, "runtime": small})})
    [holder] = wait_model(model_fleet, "tiny")["hosts"]
    eu = tuple(model_fleet.host_names[:2])

    def cold_choice(name: str) -> str:
        return place([PlacementRequest((name, "production"), 1, 0.0, 0, eu)],
                     [pool_host(h) for h in eu]).assignments[(name, "production")][0]

    name = next(n for n in (f"tiny-sl{i}" for i in range(64)) if cold_choice(n) != holder)
    model_fleet.push({"models/sl.yaml": model(name, {"origin": origin, "runtime": small,
                                                      "serverless": {"minReplicas": 0, "maxReplicas": 2}})})
    model_fleet.wait(lambda: model_fleet.deployment(name).get("reason") == "ScaledToZero", 120, "standby")
    standbys = [c for c in model_fleet.containers() if c["labels"]["modelfleet.model"] == name]
    assert [c["host"] for c in standbys] == [holder], (standbys, model_fleet.log())
    assert [t["host"] for t in model_fleet.status()["transfers"]] == [holder]  # shipped once, for "tiny"


def test_bad_mar_is_rejected_and_nothing_running_changes(model_fleet: Fleet, tmp_path: Path) -> None:
    mar = mar_builder.build_eager_mar(tmp_path / "good", name="tiny")
    digest = upload(model_fleet, mar)
    model_fleet.push({"models/tiny.yaml": model("tiny", {"origin": {"file": {"sha256": digest}}})})
    wait_model(model_fleet, "tiny")
    before = {c["id"] for c in model_fleet.containers()}
    bad = tmp_path / "evil.mar"
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr("MAR-INF/MANIFEST.json", json.dumps({"model": {"modelName": "evil", "handler": "h.py"}}))
        archive.writestr("../../etc/cron.d/evil", "* * * * * root rm -rf /")
        archive.writestr("h.py", "")
    # The CLI refuses it before sending anything; the API refuses it too (422, nothing stored).
    cli = subprocess.run([sys.executable, "-m", "modelfleet.reconciler.cli", "upload", str(bad), "--api",
                          f"http://127.0.0.1:{model_fleet.api_port}"], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 1 and "evil.mar" in cli.stderr and ".." in cli.stderr
    api = httpx.put(f"http://127.0.0.1:{model_fleet.api_port}/api/v1/artifacts?name=evil.mar",
                    content=bad.read_bytes(), timeout=30)
    assert api.status_code == 422, api.text
    listed = httpx.get(f"http://127.0.0.1:{model_fleet.api_port}/api/v1/artifacts", timeout=10).json()
    assert all(item.get("name") != "evil.mar" for item in listed.get("artifacts", listed))
    # A manifest pointing at an artifact that was never uploaded: failure with file:line, old one stays.
    missing = "sha256:" + "0" * 64
    revision = model_fleet.push({"models/tiny.yaml": model("tiny", {"origin": {"file": {"sha256": missing}}})})
    model_fleet.wait(lambda: model_fleet.deployment("tiny").get("revision") == revision
                     and model_fleet.deployment("tiny").get("state") == "failure", 30, "failure")
    assert "models/tiny.yaml:" in model_fleet.deployment("tiny")["message"]
    assert {c["id"] for c in model_fleet.containers()} == before
    assert predict(model_fleet, "tiny", "tiny", [0, 0, 0, 0]).status_code == 200


def test_mar_blue_green_v1_to_v2_with_zero_failed_requests(model_fleet: Fleet, tmp_path: Path) -> None:
    v1 = upload(model_fleet, mar_builder.build_eager_mar(tmp_path / "v1", name="tiny", version="1.0"))
    model_fleet.push({"models/tiny.yaml": model("tiny", {"origin": {"file": {"sha256": v1}}})})
    wait_model(model_fleet, "tiny")
    v2 = upload(model_fleet, mar_builder.build_torchscript_mar(tmp_path / "v2", name="tiny", version="2.0"))
    assert v2 != v1
    failures: list[str] = []
    ok = 0
    with httpx.Client(trust_env=False) as client:
        revision = model_fleet.push({"models/tiny.yaml": model("tiny", {"origin": {"file": {"sha256": v2}}})})
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            response = predict(model_fleet, "tiny", "tiny", [1, 2, 3, 4], client)
            if response.status_code == 200:
                ok += 1
            else:
                failures.append(f"{response.status_code} {response.text[:200]}")
            d = model_fleet.deployment("tiny")
            if d.get("revision") == revision and d.get("state") == "success":
                break
            time.sleep(0.02)
    assert failures == []
    assert ok > 10
    labels = {c["labels"]["modelfleet.revision"] for c in model_fleet.containers()}
    assert labels == {revision}


def test_minilm_from_huggingface_embeds_like_the_model_and_ships_once_per_host(
        model_fleet: Fleet, hub: HubStandin) -> None:
    spec = {"origin": {"huggingface": {"model": MINILM, "revision": "main"}}, "replicas": 1}
    revision = model_fleet.push({"models/minilm.yaml": model("minilm", spec)})
    wait_model(model_fleet, "minilm", revision=revision)
    sentences = ["The cat sits on the mat.", "A quantum computer factors integers."]
    url = f"http://127.0.0.1:{model_fleet.gateway_port}/models/minilm/v1/embeddings"
    response = httpx.post(url, json={"input": sentences}, timeout=60)
    assert response.status_code == 200, response.text
    got = [item["embedding"] for item in response.json()["data"]]
    from sentence_transformers import SentenceTransformer

    from tests.reconciler.artifacts.hub_standin import minilm_dir

    want = SentenceTransformer(str(minilm_dir()), device="cpu").encode(sentences, normalize_embeddings=True)
    for a, b in zip(got, want, strict=True):
        cosine = sum(x * float(y) for x, y in zip(a, b, strict=True)) / (
            math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(float(y) ** 2 for y in b)))
        assert cosine > 0.9999
    # The commit the branch resolved to is what runs, and the status says which.
    assert model_fleet.deployment("minilm")["origin"]["huggingface"]["commit"] == FAKE_COMMIT
    first_host = model_fleet.deployment("minilm")["hosts"]
    transfers = model_fleet.status()["transfers"]
    assert [t["host"] for t in transfers] == first_host
    # A second replica lands on the other EU host: that host gets its own copy, the first none.
    revision = model_fleet.push({"models/minilm.yaml": model("minilm", {**spec, "replicas": 2})})
    status = wait_model(model_fleet, "minilm", replicas=2, revision=revision)
    assert sorted(status["hosts"]) == sorted(model_fleet.host_names[:2])
    hosts_shipped = sorted(t["host"] for t in model_fleet.status()["transfers"])
    assert hosts_shipped == sorted(model_fleet.host_names[:2])  # one transfer per host, not two to the first
    served_before = hub.bytes_served
    model_fleet.api("/api/v1/sync", method="POST")
    time.sleep(2)
    assert hub.bytes_served == served_before  # the daemon's cache: nothing downloaded again
    assert len(model_fleet.status()["transfers"]) == 2


def test_token_limit_answers_429_to_the_official_openai_client(model_fleet: Fleet) -> None:
    """A maxToken policy on the environment: MiniLM's embeddings count their usage at the gateway,
    the daemon sums it, and past the budget the official ``openai`` client gets its RateLimitError
    (429, Retry-After, OpenAI's error body) while another deployment is not limited."""
    openai = pytest.importorskip("openai")
    policy = {"apiVersion": API, "kind": "Policy", "metadata": {"name": "embedding-budget"},
              "spec": {"type": "maxToken", "maxTokens": {"granularity": "hour", "total": 40}}}
    environments = [dict(e) for e in BASE_MANIFESTS["environments.yaml"]]
    environments[0] = {**environments[0], "spec": {"policies": ["eu-only", "embedding-budget"]}}
    spec = {"origin": {"huggingface": {"model": MINILM, "revision": "main"}}, "replicas": 1}
    revision = model_fleet.push({"policies.yaml": [*BASE_MANIFESTS["policies.yaml"], policy],
                                 "environments.yaml": environments, "models/minilm.yaml": model("minilm", spec)})
    wait_model(model_fleet, "minilm", revision=revision)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{model_fleet.gateway_port}/models/minilm/v1",
                           api_key="not-needed", max_retries=0, timeout=60)
    used = 0
    sentence = "The quick brown fox jumps over the lazy dog."  # 12 tokens with BERT's [CLS] and [SEP]
    while used < 40:
        result = client.embeddings.create(model="minilm", input=[sentence])
        assert len(result.data[0].embedding) == 384
        used += result.usage.prompt_tokens
    with pytest.raises(openai.RateLimitError) as refused:
        client.embeddings.create(model="minilm", input=[sentence])
    assert refused.value.status_code == 429
    assert 1 <= int(refused.value.response.headers["retry-after"]) <= 3600
    assert refused.value.code == "rate_limit_exceeded"
    assert "token limit reached" in refused.value.message and "policy embedding-budget" in refused.value.message
    metrics = httpx.get(f"http://127.0.0.1:{model_fleet.gateway_port}/metrics", timeout=10).text
    assert 'modelfleet_gateway_token_limited_requests_total{environment="production",model="minilm"} 1.0' in metrics
    # The daemon holds the sum of what every gateway reported, and the status says why requests get 429.
    def summed() -> dict[str, Any] | None:
        tokens = model_fleet.deployment("minilm").get("tokens") or {}
        return tokens if tokens.get("hour", {}).get("total", 0) >= used and tokens.get("limited") else None

    tokens = model_fleet.wait(summed, 20, "the daemon's token sums in the status")
    assert "40 total tokens per hour (policy embedding-budget)" in tokens["describe"]
