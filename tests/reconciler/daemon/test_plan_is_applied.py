"""The plan is the truth: for generated catalogs, pools and observed states, the actions a daemon
pass applies are exactly the pure plan's actions, and `modelfleet plan` (the same inputs gathered
from the daemon's store) shows the same ones."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelfleet.reconciler.config import Config, parse_config
from modelfleet.reconciler.daemon import reconcile as daemon_module
from modelfleet.reconciler.daemon.inputs import gather_inputs, plan_with_probes
from modelfleet.reconciler.daemon.reconcile import Daemon
from modelfleet.reconciler.daemon.store import FACT_FAILED_ROLLOUTS, FACT_UNREACHABLE_SINCE, Store
from modelfleet.reconciler.pool.adapter import ContainerInfo
from modelfleet.reconciler.pool.observe import Observation
from modelfleet.reconciler.rollout.apply import ApplyReport
from modelfleet.reconciler.source.git import Synced
from modelfleet.state.actual import ObservedReplica, container_name
from modelfleet.state.desired import OriginFacts, compute_desired
from modelfleet.state.inventory import InventoryRow
from modelfleet.state.loader import Catalog, load_tree
from modelfleet.state.plan import Action, ActionOutcome
from modelfleet.state.planning import PlanInputs, ReadinessCheck, failed_rollout_marker, plan
from tests.state.helpers import custom_model, echo_deployment, environment, examples, tree

NOW = 1_000_000.0
DOWN_AFTER = 10.0
PORT = 8080
REVISION = "a" * 40


class ScriptedProber:
    """Answers readiness probes from a table (the replicas' health is part of the generated facts)."""

    def __init__(self, answers: dict[tuple[str, str], bool]) -> None:
        self.answers = answers
        self.asked: list[ReadinessCheck] = []

    def probe_all(self, checks: Sequence[ReadinessCheck], timeout: float = 1.0) -> dict[tuple[str, str], bool]:
        self.asked.extend(checks)
        return {(c.host, c.name): self.answers.get((c.host, c.name), False) for c in checks}

    def probe(self, url: str, timeout: float) -> bool:
        return False

    def close(self) -> None:
        pass


def _config(state_dir: Path, hosts: int) -> Config:
    pool = [{"name": f"h{i}", "url": f"tcp://192.0.2.{i + 1}:2375",
             "location": {"name": f"loc-{i % 2}", "country": "FR", "continent": "EU"},
             "flavors": [{"name": "amd-genoa", "type": "cpu"}], "capacity": {"cpus": 4, "memory": "8Gi"}}
            for i in range(hosts)]
    return parse_config(yaml.safe_dump({"repo": {"url": str(state_dir / "repo")}, "stateDir": str(state_dir),
                                        "status": {"provider": "none"}, "pool": {"hosts": pool},
                                        "docker": {"downAfter": f"{DOWN_AFTER:g}s"}}))


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    n_hosts = draw(st.integers(1, 4))
    n_models = draw(st.integers(1, 4))
    models = {}
    for m in range(n_models):
        replicas = draw(st.integers(0, 3))
        image = draw(st.sampled_from(["example/echo:1", "example/echo:2"]))
        models[f"m{m}"] = custom_model(f"m{m}", echo_deployment("production", replicas=replicas, image=image))
    files = tree(**{"environments.yaml": environment("production"),
                    **{f"models/{name}.yaml": body for name, body in models.items()}})
    return {"hosts": n_hosts, "files": files, "draw": draw}


def _facts(data: dict[str, Any], catalog: Catalog, hosts: list[Any]) -> dict[str, Any]:
    """Observed containers, inventory rows, unreachable hosts, failed versions and probe answers
    around the desired state: matching, drifted, duplicated, foreign, left over."""
    draw = data["draw"]
    desired = compute_desired(catalog, hosts, REVISION)
    names = [h.name for h in hosts]
    observed: list[ObservedReplica] = []
    rows: list[InventoryRow] = []
    answers: dict[tuple[str, str], bool] = {}
    counter = 0

    def container(model: str, index: int, host: str, spec: str) -> None:
        nonlocal counter
        counter += 1
        name = container_name(model, "production", index, spec) + f"-{counter}"
        cid = f"{counter:064x}"
        running = draw(st.booleans())
        replica = ObservedReplica(host, cid, name, model, "production", index, spec, "old", running)
        if draw(st.integers(0, 9)) > 0:
            observed.append(replica)  # else: gone from the host, the row is stale
        if draw(st.integers(0, 4)) > 0:  # owned (in the inventory) most of the time
            has_url = draw(st.booleans())
            url = f"http://192.0.2.1:{30000 + counter}" if has_url else None
            rows.append(InventoryRow(host, name, cid, model, "production", index, spec, "old", "active",
                                     draw(st.booleans()) and running, url, f"{url}/" if url else None))
        answers[(host, name)] = draw(st.booleans())

    for replica in desired.replicas:
        for _ in range(draw(st.integers(0, 2))):  # 0: missing; 2: a duplicate of the slot
            kind = draw(st.sampled_from(["same", "old-spec", "other-host"]))
            host = replica.host if kind != "other-host" else draw(st.sampled_from(names))
            spec = replica.spec_hash if kind != "old-spec" else "0" * 16
            container(replica.model, replica.index, host, spec)
    for _ in range(draw(st.integers(0, 2))):  # containers of a model that left Git
        container("gone", draw(st.integers(0, 2)), draw(st.sampled_from(names)), "1" * 16)
    for _ in range(draw(st.integers(0, 1))):  # a write-ahead row whose create never happened
        counter += 1
        rows.append(InventoryRow(draw(st.sampled_from(names)), f"mf-never-{counter}", None, "m0", "production", 0,
                                 "2" * 16, "old", "creating", False, None, None))
    unreachable = {h: NOW - draw(st.sampled_from([1.0, 5.0, 50.0]))
                   for h in draw(st.sets(st.sampled_from(names), max_size=len(names) - 1))}
    visible = [r for r in observed if r.host not in unreachable]
    specs = sorted({(r.model, r.spec_hash) for r in desired.replicas})
    failed = {failed_rollout_marker(m, "production", s): "never got ready"
              for m, s in draw(st.sets(st.sampled_from(specs), max_size=2))} if specs else {}
    return {"observed": visible, "rows": rows, "unreachable": unreachable, "failed": failed, "answers": answers}


def _seed(store: Store, rows: list[InventoryRow], unreachable: dict[str, float], failed: dict[str, str]) -> None:
    for row in rows:
        store.record_intent(row.host, row.name, row.model, row.environment, row.replica, row.spec_hash, row.revision)
        if row.container_id is not None:
            store.record_created(row.host, row.name, row.container_id, row.url, row.probe_url)
            if row.ready:
                store.set_ready(row.host, row.name, True)
    store.set_fact(FACT_UNREACHABLE_SINCE, unreachable)
    store.set_fact(FACT_FAILED_ROLLOUTS, failed)


def _observation(observed: list[ObservedReplica], unreachable: dict[str, float]) -> Observation:
    containers = {(r.host, r.container_id): ContainerInfo(r.container_id, r.name, {}, r.running,
                                                          {PORT: 30000 + i})
                  for i, r in enumerate(observed)}
    return Observation(list(observed), containers, frozenset(unreachable),
                       {h: "connection refused" for h in unreachable})


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=scenarios())
def test_the_daemon_applies_exactly_the_plan(data: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as patch:
        state_dir = Path(tmp)
        config = _config(state_dir, data["hosts"])
        hosts = list(config.pool.hosts)
        catalog = load_tree(data["files"])
        facts = _facts(data, catalog, hosts)
        store = Store(state_dir)
        _seed(store, facts["rows"], facts["unreachable"], facts["failed"])
        store.close()
        observation = _observation(facts["observed"], facts["unreachable"])

        # What `modelfleet plan` shows: the inputs gathered from the daemon's store, read-only.
        reader = Store.open_read_only(state_dir)
        assert reader is not None
        cli_plan = plan_with_probes(gather_inputs(config, catalog, REVISION, observation, reader, OriginFacts(), NOW),
                                    ScriptedProber(facts["answers"]))  # type: ignore[arg-type]
        reader.close()

        # The pure plan from the facts as generated (not gathered by the shell).
        expected = plan(PlanInputs(
            catalog=catalog, hosts=hosts, revision=REVISION, observed=facts["observed"],
            ports={key: info.ports for key, info in observation.containers.items()},
            unreachable=facts["unreachable"], inventory=_as_stored(facts["rows"]),
            failed_rollouts=facts["failed"], probe_results=facts["answers"], origin_facts=OriginFacts(),
            now=NOW, down_after=DOWN_AFTER))

        # A real daemon pass, with the pool's answers scripted and apply recorded.
        applied: list[Action] = []

        def record(pass_id: int, actions: Sequence[Action], on_outcome: Any = None) -> ApplyReport:
            applied.extend(actions)
            return ApplyReport([ActionOutcome(a, True) for a in actions])

        daemon = Daemon(config, clock=lambda: NOW)
        try:
            patch.setattr(daemon_module, "observe", lambda clients, executor=None: observation)
            patch.setattr(daemon.source, "sync", lambda: Synced(REVISION))
            patch.setattr(daemon, "_load", lambda revision: (catalog, {}))
            patch.setattr(daemon.origins, "facts", lambda catalog, file_errors=None: OriginFacts())
            patch.setattr(daemon.applier, "apply", record)
            patch.setattr(daemon.applier, "prober", ScriptedProber(facts["answers"]))
            patch.setattr(daemon, "_collect_artifacts", lambda plan, observation: None)
            status = daemon.reconcile("test")
        finally:
            daemon.close()
        assert "error" not in status.last_pass, status.last_pass
        assert applied == expected.actions
        assert cli_plan.actions == expected.actions
        assert [h.action for h in cli_plan.held] == [h.action for h in expected.held]
        # Nothing the plan holds back is applied, and every held action says why.
        assert not {id(h.action) for h in expected.held} & {id(a) for a in applied}
        assert all(h.why for h in expected.held)


def _as_stored(rows: list[InventoryRow]) -> list[InventoryRow]:
    """The rows as the store returns them (ordered by host and name; a write-ahead row has no URLs)."""
    return sorted(rows, key=lambda r: (r.host, r.name))


def test_held_back_versions_are_not_created_and_the_plan_says_why() -> None:
    files = tree(**{"environments.yaml": environment("production"),
                    "models/m0.yaml": custom_model("m0", echo_deployment("production", replicas=2))})
    catalog = load_tree(files)
    config = _config(Path("/nonexistent"), 2)
    hosts = list(config.pool.hosts)
    desired = compute_desired(catalog, hosts, REVISION)
    marker = failed_rollout_marker("m0", "production", desired.replicas[0].spec_hash)
    result = plan(PlanInputs(catalog=catalog, hosts=hosts, revision=REVISION, inventory=[],
                             failed_rollouts={marker: "not ready within 300s"}))
    assert result.actions == []
    assert [h.action.op for h in result.held] == ["create", "create"]
    assert all("failed its rollout" in h.why and "not ready within 300s" in h.why for h in result.held)
    outcome = result.outcomes[("m0", "production")]
    assert (outcome.state, outcome.reason) == ("failure", "RolloutFailed")
    data = result.to_json()
    held = data["held"]
    assert data["actions"] == [] and isinstance(held, list) and all("failed its rollout" in h["held"] for h in held)
    # A new spec is a new version: it is planned again.
    changed = tree(**{"environments.yaml": environment("production"),
                      "models/m0.yaml": custom_model("m0", echo_deployment("production", replicas=2,
                                                                           image="example/echo:2"))})
    again = plan(PlanInputs(catalog=load_tree(changed), hosts=hosts, revision=REVISION, inventory=[],
                            failed_rollouts={marker: "not ready within 300s"}))
    assert [a.op for a in again.actions] == ["create", "create"] and again.failed_rollouts == {}
