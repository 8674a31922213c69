"""Origins at plan time when the HuggingFace Hub cannot be reached (an endpoint on a closed port):
what runs keeps its commit, a revision never resolved is an error of its deployment only."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelfleet.reconciler.artifacts.huggingface import HuggingFaceResolver
from modelfleet.reconciler.artifacts.origins import OriginResolver
from modelfleet.reconciler.artifacts.store import ArtifactStore
from modelfleet.state.desired import OriginFacts
from modelfleet.state.loader import Catalog, load_tree
from modelfleet.state.outcome import deployment_statuses
from modelfleet.state.planning import Plan, PlanInputs, plan
from tests.reconciler.artifacts.hub_standin import FAKE_COMMIT, HubStandin, StandinRepo
from tests.state.helpers import custom_model, environment, host, tree

RUNNING, FRESH, TYPED = "acme/running", "acme/fresh", "acme/typed"
HOSTS = [host("h0", cpus=64, memory="256Gi")]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny-model")
    (root / "config.json").write_text('{"architectures": ["BertModel"], "model_type": "bert"}')
    return root


@pytest.fixture(scope="module")
def hub(model_files: Path) -> Iterator[HubStandin]:
    with HubStandin([StandinRepo(name, model_files) for name in (RUNNING, FRESH, TYPED)]) as standin:
        yield standin


@pytest.fixture
def closed_port() -> str:
    with socket.socket() as sock:  # a port nobody listens on: connections are refused
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


class Counting(HuggingFaceResolver):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.resolves = 0

    def resolve(self, model: str, revision: str = "main") -> str:
        self.resolves += 1
        return super().resolve(model, revision)


def catalog(*models: str, typed: bool = False) -> Catalog:
    files = {"environments.yaml": environment("production"),
             "models/local.yaml": custom_model("local", "environment: production\nruntime: {type: custom, image: x:1}")}
    for name in models:
        runtime = "\nruntime: {type: transformers}" if typed else ""
        files[f"models/{name.split('/')[1]}.yaml"] = custom_model(
            name.split("/")[1], f"environment: production\norigin: {{huggingface: {{model: {name}, revision: main}}}}"
            f"{runtime}")
    return load_tree(tree(**files))


def resolver(cache: Path, endpoint: str, state: Path) -> tuple[OriginResolver, Counting]:
    hf = Counting(cache, endpoint=endpoint, offline=False, timeout=5)
    return OriginResolver(hf, ArtifactStore(state), ttl=0.0), hf


def planned(cat: Catalog, facts: OriginFacts) -> Plan:
    return plan(PlanInputs(catalog=cat, hosts=HOSTS, revision="r", inventory=[], origin_facts=facts))


def test_a_restart_while_the_hub_is_unreachable_keeps_what_runs_and_fails_only_the_new_revision(
        hub: HubStandin, closed_port: str, tmp_path: Path) -> None:
    cache = tmp_path / "huggingface"
    # Before the outage: 'running' resolved (and deployed) while the Hub answered.
    online, _ = resolver(cache, hub.url, tmp_path / "state")
    before_facts = online.facts(catalog(RUNNING))
    assert before_facts.commits == {(RUNNING, "main"): FAKE_COMMIT} and before_facts.errors == {}
    before = planned(catalog(RUNNING), before_facts)

    # The daemon restarts while the Hub is down (nothing in memory), and a new deployment appears.
    offline, hf = resolver(cache, closed_port, tmp_path / "state")
    cat = catalog(RUNNING, FRESH)
    facts = offline.facts(cat)

    assert facts.commits == {(RUNNING, "main"): FAKE_COMMIT}  # its last resolution, kept on disk
    assert facts.metadata[(RUNNING, "main")]["pipeline_tag"] == "sentence-similarity"  # the Hub's answer, kept
    message = facts.errors[(FRESH, "main")]
    assert message.startswith(f"cannot resolve {FRESH}@main: hub unreachable (")
    assert message.endswith("; the running version keeps running")
    assert facts.unavailable == {(FRESH, "main")}
    assert hf.resolves == 1  # the Hub is asked once per pass while it does not answer, not once per model

    after = planned(cat, facts)
    running = after.desired.deployments[("running", "production")]
    assert running.errors == [] and running.spec_hash == before.desired.deployments[("running", "production")].spec_hash
    assert ("fresh", "production") in after.desired.frozen  # what it runs (if anything) is left alone
    assert {(r.model, r.host) for r in after.desired.replicas} >= {("running", "h0"), ("local", "h0")}
    statuses = deployment_statuses(after, [], [], {}, {}, 0.0)
    fresh = statuses[("fresh", "production")]
    assert fresh.state == "failure"
    assert f"cannot resolve {FRESH}@main: hub unreachable" in fresh.message
    assert "the daemon asks the Hub again every pass" in fresh.message
    assert "HF token" not in fresh.message  # not the hint for a manifest mistake
    assert statuses[("running", "production")].state != "failure"
    assert statuses[("local", "production")].state != "failure"


def test_once_the_hub_answers_again_the_new_revision_resolves(hub: HubStandin, closed_port: str,
                                                              tmp_path: Path) -> None:
    cache = tmp_path / "huggingface"
    down, _ = resolver(cache, closed_port, tmp_path / "state")
    assert (FRESH, "main") in down.facts(catalog(FRESH)).errors
    down.hf.endpoint = hub.url  # the Hub is back
    facts = down.facts(catalog(FRESH))
    assert facts.commits == {(FRESH, "main"): FAKE_COMMIT} and facts.errors == {} and facts.unavailable == set()


def test_without_the_hub_or_its_kept_metadata_only_deployments_choosing_their_runtime_from_it_wait(
        hub: HubStandin, closed_port: str, tmp_path: Path) -> None:
    cache = tmp_path / "huggingface"
    online, _ = resolver(cache, hub.url, tmp_path / "state")
    online.facts(catalog(RUNNING, TYPED))
    for kept in (cache / ".modelfleet" / "metadata").rglob("*.json"):
        kept.unlink()  # e.g. resolved by a daemon from before the metadata was kept

    offline, _ = resolver(cache, closed_port, tmp_path / "state")
    facts = offline.facts(catalog(RUNNING))
    assert facts.commits == {(RUNNING, "main"): FAKE_COMMIT} and facts.metadata == {}
    assert "cannot read the metadata of acme/running@" in facts.metadata_errors[(RUNNING, "main")]
    untyped = planned(catalog(RUNNING), facts)
    assert ("running", "production") in untyped.desired.frozen  # its runtime would be guessed otherwise

    typed_facts = offline.facts(catalog(TYPED, typed=True))
    typed = planned(catalog(TYPED, typed=True), typed_facts)
    assert typed.desired.deployments[("typed", "production")].errors == []  # runtime.type named: proceeds
    assert ("typed", "h0") in {(r.model, r.host) for r in typed.desired.replicas}


def test_a_revision_the_hub_says_does_not_exist_is_a_manifest_error_not_an_outage(
        hub: HubStandin, tmp_path: Path) -> None:
    origins, _ = resolver(tmp_path / "huggingface", hub.url, tmp_path / "state")
    cat = load_tree(tree(**{"environments.yaml": environment("production"), "models/x.yaml": custom_model(
        "x", f"environment: production\norigin: {{huggingface: {{model: {RUNNING}, revision: no-such-branch}}}}")}))
    facts = origins.facts(cat)
    assert (RUNNING, "no-such-branch") in facts.errors and facts.unavailable == set()
    state = planned(cat, facts).desired.deployments[("x", "production")]
    assert "check the model id, the revision and the daemon's HF token" in str(state.errors[0])


def test_the_last_resolution_and_metadata_are_read_from_the_cache_without_network(
        hub: HubStandin, closed_port: str, tmp_path: Path) -> None:
    online = HuggingFaceResolver(tmp_path, endpoint=hub.url, offline=False)
    assert online.last_resolved(RUNNING, "main") is None
    online.resolve(RUNNING, "main")
    answer = online.model_metadata(RUNNING, FAKE_COMMIT)
    down = HuggingFaceResolver(tmp_path, endpoint=closed_port, offline=False, timeout=5)
    assert down.last_resolved(RUNNING, "main") == FAKE_COMMIT
    assert down.last_resolved(RUNNING, FAKE_COMMIT) == FAKE_COMMIT
    assert down.last_resolved("not a model", "main") is None and down.last_resolved(RUNNING, "../x") is None
    assert down.model_metadata(RUNNING, FAKE_COMMIT) == answer  # the Hub's answer kept, not a guess
    assert down.kept_metadata(RUNNING, FAKE_COMMIT) == answer
    assert down.kept_metadata(FRESH, FAKE_COMMIT) is None
    assert hub.violations == []
