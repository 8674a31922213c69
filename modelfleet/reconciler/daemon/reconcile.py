"""The daemon: one outer reconcile that always publishes status, around a linear inner pass.

    sync git → load manifests → observe hosts → plan (pure) → apply → publish routes → statuses
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from modelfleet.reconciler.artifacts.origins import OriginResolver, huggingface_resolver
from modelfleet.reconciler.artifacts.shipping import ArtifactShipper, artifact_id
from modelfleet.reconciler.artifacts.store import ArtifactStore
from modelfleet.reconciler.config import Config
from modelfleet.reconciler.daemon.store import InventoryRow, Store
from modelfleet.reconciler.daemon.triggers import TriggerQueue
from modelfleet.reconciler.errors import ModelfleetError
from modelfleet.reconciler.gateway.routes import Backend, RouteStore, route_key
from modelfleet.reconciler.pool.adapter import HostClient
from modelfleet.reconciler.pool.observe import Observation, observe
from modelfleet.reconciler.rollout.apply import ActionOutcome, Applier, ApplyReport
from modelfleet.reconciler.secrets import redact_url
from modelfleet.reconciler.source.git import GitSource
from modelfleet.reconciler.status import CommitStatus, StatusError, StatusWriter
from modelfleet.reconciler.status import conditions as cond
from modelfleet.state.actual import ObservedReplica
from modelfleet.state.loader import Catalog, load_tree
from modelfleet.state.plan import Action
from modelfleet.state.planning import DesiredMemo, PlanResult, make_plan

log = logging.getLogger("modelfleet.daemon")
Key = tuple[str, str]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.passes = Counter("modelfleet_passes_total", "Reconcile passes", ["result"], registry=self.registry)
        self.pass_seconds = Histogram("modelfleet_pass_duration_seconds", "Duration of a reconcile pass",
                                      registry=self.registry,
                                      buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.actions = Counter("modelfleet_actions_total", "Actions applied", ["op", "result"],
                               registry=self.registry)
        self.deployments = Gauge("modelfleet_deployments", "Deployments by commit state", ["state"],
                                 registry=self.registry)
        self.hosts_up = Gauge("modelfleet_hosts_up", "Whether a pool host answers (1) or not (0)", ["host"],
                              registry=self.registry)
        self.observe_seconds = Gauge("modelfleet_observe_seconds", "Duration of the last observe",
                                     registry=self.registry)


@dataclass
class DaemonStatus:
    revision: str | None = None
    last_attempted_revision: str | None = None
    last_applied_revision: str | None = None
    observed_once: bool = False
    last_pass: dict[str, Any] = field(default_factory=dict)
    deployments: dict[Key, cond.DeploymentStatus] = field(default_factory=dict)
    hosts: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    source_error: str | None = None
    transfers: dict[str, dict[str, Any]] = field(default_factory=dict)  # "host artifact" -> progress

    def to_json(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "lastAttemptedRevision": self.last_attempted_revision,
            "lastAppliedRevision": self.last_applied_revision,
            "ready": self.observed_once,
            "lastPass": self.last_pass,
            "errors": self.errors,
            "sourceError": self.source_error,
            "deployments": [d.to_json() for _, d in sorted(self.deployments.items())],
            "hosts": [dict(name=k, **v) for k, v in sorted(self.hosts.items())],
            # The 20 most recent (list() copies atomically: shipping threads write meanwhile).
            "transfers": sorted(list(self.transfers.values()), key=lambda t: t["at"], reverse=True)[:20],
        }


class Daemon:
    def __init__(self, config: Config, status_writer: StatusWriter | None = None,
                 drain_seconds: float = 0.5) -> None:
        self.config = config
        self.state_dir = Path(config.state_dir)
        self.store = Store(self.state_dir)
        self.routes = RouteStore(self.state_dir)
        self.source = GitSource(config.repo.url, config.repo.branch, self.state_dir)
        self.hosts = {h.name: h for h in config.pool.hosts}
        self.clients = {h.name: HostClient(h, timeout=config.docker.timeout) for h in config.pool.hosts}
        self.triggers = TriggerQueue()
        self.stop_event = threading.Event()
        self.metrics = Metrics()
        self.status = DaemonStatus(last_applied_revision=self.store.fact("last_applied_revision"),
                                   last_attempted_revision=self.store.fact("last_attempted_revision"))
        self.status_writer = status_writer
        self._published: dict[str, dict[str, tuple[str, str]]] = {}  # revision -> context -> (state, desc)
        self._route_keys: set[str] = set(self.store.fact("route_keys", []))
        self._down_hosts: frozenset[str] = frozenset()
        self._unreachable_since: dict[str, float] = {}
        self._failed_rollouts: dict[str, str] = dict(self.store.fact("failed_rollouts", {}))
        # Loaded manifests of the last commit, and its repository model files that are not valid.
        self._catalog: tuple[str, Catalog, dict[str, str]] | None = None
        self._desired_memo = DesiredMemo()
        # Model origins: uploads and repository files in a content-addressed store, HuggingFace models
        # resolved to a commit and downloaded into the daemon's cache, shipped to the hosts that need them.
        self.artifacts = ArtifactStore(self.state_dir)
        self.hf = huggingface_resolver(config)
        self.origins = OriginResolver(self.hf, self.artifacts, ttl=max(5.0, config.repo.poll_interval))
        self.shipper = ArtifactShipper(self.artifacts, self.hf, on_progress=self._on_transfer)
        self.applier = Applier(self.clients, self.hosts, self.store, config.rollout, self.publish_routes,
                               drain_seconds=drain_seconds, stop_event=self.stop_event,
                               prepare_volumes=self.shipper.prepare_volumes, origin_env=self.shipper.container_env)

    def close(self) -> None:
        self.applier.close()
        for client in self.clients.values():
            client.close()
        self.store.close()
        self.routes.close()

    # --- routes ---------------------------------------------------------------------------------

    def publish_routes(self) -> int:
        table: dict[str, list[Backend]] = {key: [] for key in self._route_keys}
        for row in self.store.inventory():
            if row.phase != "active" or not row.ready or not row.url or row.host in self._down_hosts:
                continue
            key = route_key(row.model, row.environment)
            if key in table:
                table[key].append(Backend(row.url, row.name, row.host))
        return self.routes.publish({k: tuple(sorted(v, key=lambda b: b.container)) for k, v in table.items()})

    # --- the pass -------------------------------------------------------------------------------

    def reconcile(self, trigger: str = "manual") -> DaemonStatus:
        """Outer reconcile: whatever happens inside, status and history are published."""
        started = time.monotonic()
        pass_id = self.store.begin_pass(trigger)
        result, summary = "failed", {}
        try:
            summary = self._reconcile_inner(pass_id)
            troubles = ("failed_actions", "down_hosts", "deferred_actions")
            healthy = not any(summary.get(k) for k in troubles)
            result = "ok" if healthy else "degraded"
        except ModelfleetError as exc:
            self.status.source_error = str(exc)
            summary = {"error": str(exc)}
            log.error("pass %d failed: %s", pass_id, exc)
            self._publish_pass_error(str(exc))
        except Exception as exc:  # never let one pass kill the daemon
            summary = {"error": f"internal error: {type(exc).__name__}: {exc}"}
            log.exception("pass %d crashed", pass_id)
            self._publish_pass_error(f"internal error ({type(exc).__name__}); the next pass retries")
        finally:
            seconds = time.monotonic() - started
            summary["seconds"] = round(seconds, 3)
            self.store.finish_pass(pass_id, self.status.revision, result, summary)
            self.status.last_pass = {"id": pass_id, "trigger": trigger, "result": result, "seconds": seconds,
                                     "finishedAt": time.time(), **summary}
            self.metrics.passes.labels(result).inc()
            self.metrics.pass_seconds.observe(seconds)
        return self.status

    def _reconcile_inner(self, pass_id: int) -> dict[str, Any]:
        # 1. Sync the Git source: the commit to converge on.
        revision = self.source.sync()
        self.status.source_error = None
        new_revision = revision != self.status.last_attempted_revision
        self.status.revision = revision
        self.status.last_attempted_revision = revision
        self.store.set_fact("last_attempted_revision", revision)
        # 2. Observe the pool (one label-filtered list per host, in parallel).
        observation = observe(list(self.clients.values()))
        self._down_hosts = observation.down_hosts  # not routed to, whatever the grace
        suspect = self._suspect_hosts(observation)
        self._record_hosts(observation, suspect)
        owned = self._reconcile_inventory(observation)
        self.status.observed_once = True
        # A host unreachable for less than docker.downAfter keeps its replicas (a blip must not
        # reschedule everything); past that it is down and its replicas move.
        actual = observation.replicas + self._assumed_replicas(suspect)
        # 3. Plan (pure): load manifests at the commit, desired state, diff.
        if self._catalog is None or self._catalog[0] != revision:
            tree = self.source.tree(revision)
            catalog = load_tree(tree)
            self._catalog = (revision, catalog, self.origins.ingest_repository_files(catalog, tree))
        catalog, file_errors = self._catalog[1], self._catalog[2]
        facts = self.origins.facts(catalog, file_errors)
        plan = make_plan({}, list(self.hosts.values()), revision, actual, owned,
                         observation.down_hosts - suspect, catalog=catalog, memo=self._desired_memo,
                         origin_facts=facts)
        if self._adopt(plan, observation, owned):
            plan = make_plan({}, list(self.hosts.values()), revision, actual, owned,
                             observation.down_hosts - suspect, catalog=catalog, memo=self._desired_memo,
                             origin_facts=facts)
        self._sweep_readiness(plan, observation)
        actions, deferred = self._defer_unsafe_removals(self._without_failed_rollouts(plan))
        on_suspects = [a for a in actions if a.host in suspect or (a.current and a.current.host in suspect)]
        actions = [a for a in actions if a not in on_suspects]
        deferred += len(on_suspects)
        if new_revision:
            self._publish_statuses(revision, self._pending_statuses(plan, actions))
        # 4. Route keys: enabled deployments are routable (404 for the rest).
        self._set_route_keys(plan)
        self.publish_routes()
        # 5. Apply.
        report = self.applier.apply(pass_id, actions, self._count_outcome) if actions else ApplyReport()
        self._record_failed_rollouts(report)
        if actions and not report.failed:
            self._collect_artifacts(plan, observation)
        # 6. Routes and statuses from what is now true.
        self._sweep_readiness(plan, observation)
        self.publish_routes()
        statuses = self._deployment_statuses(plan, report, revision)
        global_errors = [str(e) for e in plan.catalog.errors]
        self.status.errors = global_errors
        self._publish_statuses(revision, cond.commit_statuses(list(statuses.values()), global_errors))
        if all(s.state == "success" for s in statuses.values()) and not global_errors:
            self.status.last_applied_revision = revision
            self.store.set_fact("last_applied_revision", revision)
        return {
            "revision": revision,
            "actions": len(actions),
            "deferred_actions": deferred,
            "failed_actions": [f"{o.action.op} {o.action.model}/{o.action.environment}: {o.error}"
                               for o in report.failed],
            "down_hosts": sorted(observation.down_hosts),
            "observe_seconds": round(observation.seconds, 4),
            "errors": len(plan.desired.errors),
        }

    def _publish_pass_error(self, message: str) -> None:
        """A pass that failed midway must not leave its commit 'pending' forever."""
        revision = self.status.revision
        if revision is None:
            return  # the commit is not known (the fetch failed): nothing to annotate
        with contextlib.suppress(Exception):
            self._publish_statuses(revision, [CommitStatus(cond.AGGREGATE_CONTEXT, "error", message)])

    # --- steps ----------------------------------------------------------------------------------

    def _on_transfer(self, host: str, artifact: str, sent: int, total: int) -> None:
        self.status.transfers[f"{host} {artifact}"] = {
            "host": host, "artifact": artifact, "sent": sent, "total": total, "done": sent >= total, "at": time.time()}

    def _collect_artifacts(self, plan: PlanResult, observation: Observation) -> None:
        """Remove model volumes no deployment on that host uses any more (after a clean apply)."""
        keep: dict[str, set[str]] = {name: set() for name in self.hosts}
        for replica in plan.desired.replicas:
            if replica.origin:
                keep[replica.host].add(artifact_id(replica.origin))
        for name, client in self.clients.items():
            if name in observation.down_hosts:
                continue
            try:
                removed = self.shipper.gc(client, keep[name])
            except ModelfleetError as exc:
                log.warning("artifact cleanup on %s failed: %s", name, exc)
                continue
            for volume in removed:
                log.info("removed unused model volume %s from %s", volume, name)

    def _suspect_hosts(self, observation: Observation) -> frozenset[str]:
        """Unreachable hosts still within their grace period (docker.downAfter)."""
        now = time.monotonic()
        for name in self.hosts:
            if name in observation.down_hosts:
                self._unreachable_since.setdefault(name, now)
            else:
                self._unreachable_since.pop(name, None)
        grace = self.config.docker.down_after
        return frozenset(h for h in observation.down_hosts if now - self._unreachable_since[h] < grace)

    def _assumed_replicas(self, hosts: frozenset[str]) -> list[ObservedReplica]:
        """What the inventory says runs on hosts we cannot see right now."""
        return [ObservedReplica(r.host, r.container_id, r.name, r.model, r.environment, r.replica, r.spec_hash,
                                r.revision, True)
                for r in self.store.inventory() if r.host in hosts and r.container_id and r.phase == "active"]

    def _record_hosts(self, observation: Observation, suspect: frozenset[str]) -> None:
        for name, host in self.hosts.items():
            down = name in observation.down_hosts
            self.metrics.hosts_up.labels(name).set(0 if down else 1)
            if not down:
                state = "up"
            elif name in suspect:
                state = f"unreachable (replicas move after {self.config.docker.down_after:g}s)"
            else:
                state = "down (replicas moved to other eligible hosts)"
            self.status.hosts[name] = {
                "url": redact_url(host.url), "up": not down, "state": state, "error": observation.errors.get(name),
                "location": host.location.model_dump(), "flavors": [f.name for f in host.flavors],
                "capacity": {"cpus": host.capacity.cpus, "memory": host.capacity.memory},
                "replicas": sum(1 for r in observation.replicas if r.host == name),
            }
        self.metrics.observe_seconds.set(observation.seconds)

    def _reconcile_inventory(self, observation: Observation) -> set[str]:
        """Bring the inventory in line with what the hosts show; return the container ids we own."""
        by_name = {(r.host, r.name): r for r in observation.replicas}
        owned: set[str] = set()
        for row in self.store.inventory():
            if row.host in observation.down_hosts:
                if row.container_id:
                    owned.add(row.container_id)
                continue
            seen = by_name.get((row.host, row.name))
            if seen is None:
                # Gone (removed by hand, or a create that never happened): forget it; if it is still
                # wanted, the plan creates it again.
                self.store.forget(row.host, row.name)
                continue
            if row.container_id != seen.container_id:
                self.store.adopt(row.host, row.name, seen.container_id)
            if row.ready and not seen.running:
                self.store.set_ready(row.host, row.name, False)
            owned.add(seen.container_id)
        return owned

    def _adopt(self, plan: PlanResult, observation: Observation, owned: set[str]) -> bool:
        """Managed containers missing from the inventory (its state directory was lost or reset)
        that are exactly a desired replica (same slot, host and spec hash) are adopted, not
        duplicated. Anything else not in the inventory is never touched."""
        wanted = {(r.host, r.model, r.environment, r.index, r.spec_hash) for r in plan.desired.replicas}
        adopted = False
        for replica in observation.replicas:
            key = (replica.host, replica.model, replica.environment, replica.index, replica.spec_hash)
            if replica.container_id in owned or key not in wanted:
                continue
            self.store.record_intent(replica.host, replica.name, replica.model, replica.environment, replica.index,
                                     replica.spec_hash, replica.revision)
            self.store.record_created(replica.host, replica.name, replica.container_id, None, None)
            owned.add(replica.container_id)
            log.info("adopted %s on %s: it matches the desired replica %d of %s/%s", replica.name, replica.host,
                     replica.index, replica.model, replica.environment)
            adopted = True
        return adopted

    def _without_failed_rollouts(self, plan: PlanResult) -> list[Action]:
        """A version that failed to become ready is not retried until its spec changes (auto-revert)."""
        kept = []
        for action in plan.actions:
            if action.desired is not None and action.op in ("create", "replace"):
                marker = f"{action.model}/{action.environment}@{action.desired.spec_hash}"
                if marker in self._failed_rollouts:
                    continue
            kept.append(action)
        # Forget failures of specs that are no longer desired.
        desired = {f"{r.model}/{r.environment}@{r.spec_hash}" for r in plan.desired.replicas}
        stale = [m for m in self._failed_rollouts if m not in desired]
        for marker in stale:
            del self._failed_rollouts[marker]
        if stale:
            self.store.set_fact("failed_rollouts", self._failed_rollouts)
        return kept

    def _record_failed_rollouts(self, report: ApplyReport) -> None:
        changed = False
        for outcome in report.failed:
            action = outcome.action
            if outcome.reverted and action.desired is not None and action.op in ("create", "replace"):
                marker = f"{action.model}/{action.environment}@{action.desired.spec_hash}"
                self._failed_rollouts[marker] = outcome.error or "rollout failed"
                changed = True
        if changed:
            self.store.set_fact("failed_rollouts", self._failed_rollouts)

    def _count_outcome(self, outcome: ActionOutcome) -> None:
        self.metrics.actions.labels(outcome.action.op, "ok" if outcome.ok else "failed").inc()

    def _set_route_keys(self, plan: PlanResult) -> None:
        keys = {route_key(*k) for k, s in plan.desired.deployments.items() if s.enabled or s.frozen}
        if keys != self._route_keys:
            self._route_keys = keys
            self.store.set_fact("route_keys", sorted(keys))

    def _sweep_readiness(self, plan: PlanResult, observation: Observation) -> None:
        """Replicas that run but are not known ready (after a restart mid-rollout, or restarted by
        Docker) are probed once; their URLs are filled in from what the host shows."""
        wanted = {(r.host, r.model, r.environment, r.index, r.spec_hash): r for r in plan.desired.replicas}
        by_name = {(r.host, r.name): r for r in observation.replicas}
        checks: list[tuple[InventoryRow, str, str]] = []
        for row in self.store.inventory():
            if row.phase != "active" or row.ready or row.host in self._down_hosts:
                continue
            url, probe_url = row.url, row.probe_url
            seen = by_name.get((row.host, row.name))
            if seen is not None and not seen.running:
                continue  # a standby or a crashed replica: nothing to probe
            if not probe_url:
                want = wanted.get((row.host, row.model, row.environment, row.replica, row.spec_hash))
                info = observation.containers.get((row.host, seen.container_id)) if seen else None
                if want is None or info is None or not info.running:
                    continue
                address = self.hosts[row.host].reach_address
                port, probe = info.ports.get(want.runtime.port), info.ports.get(want.runtime.probe.port)
                if port is None or probe is None:
                    continue
                url = f"http://{address}:{port}"
                probe_url = f"http://{address}:{probe}{want.runtime.probe.path}"
            checks.append((row, url or "", probe_url))
        if not checks:
            return

        def check(item: tuple[InventoryRow, str, str]) -> tuple[InventoryRow, str, str, bool]:
            row, url, probe_url = item
            return row, url, probe_url, self.applier.prober.probe(probe_url, timeout=1.0)

        with ThreadPoolExecutor(max_workers=8) as pool:
            for row, url, probe_url, ok in pool.map(check, checks):
                if ok:
                    if row.container_id and not row.probe_url:
                        self.store.record_created(row.host, row.name, row.container_id, url, probe_url)
                    self.store.set_ready(row.host, row.name, True)

    def _defer_unsafe_removals(self, actions: list[Action]) -> tuple[list[Action], int]:
        """Never remove a duplicate of a slot before the replica that stays is ready (e.g. after a
        restart in the middle of a blue-green switch): defer it to a later pass."""
        ready = {(r.model, r.environment, r.replica) for r in self.store.inventory()
                 if r.ready and r.phase == "active"}
        kept, deferred = [], 0
        for action in actions:
            if action.op == "remove" and action.reason == "duplicate" \
                    and (action.model, action.environment, action.replica) not in ready:
                deferred += 1
                continue
            kept.append(action)
        return kept, deferred

    def _pending_statuses(self, plan: PlanResult, actions: Sequence[Action]) -> list[CommitStatus]:
        touched = {(a.model, a.environment) for a in actions}
        statuses = []
        for key, state in sorted(plan.desired.deployments.items()):
            if key in touched:
                statuses.append(CommitStatus(cond.deployment_context(state.environment, state.model), "pending",
                                             f"rolling out to {', '.join(state.hosts) or 'the pool'}"))
        if statuses:
            statuses.append(CommitStatus(cond.AGGREGATE_CONTEXT, "pending",
                                         f"applying {len(actions)} action(s) to {len(touched)} deployment(s)"))
        return statuses

    def _deployment_statuses(self, plan: PlanResult, report: ApplyReport,
                             revision: str) -> dict[Key, cond.DeploymentStatus]:
        inventory = self.store.inventory()
        # Index once per pass: each deployment is then a few lookups, not a scan of everything.
        running_wanted: dict[Key, int] = {}
        for replica in plan.desired.replicas:
            if replica.running:
                running_wanted[replica.key] = running_wanted.get(replica.key, 0) + 1
        ready_by_key: dict[tuple[str, str, str], list[InventoryRow]] = {}
        present: set[Key] = set()
        for row in inventory:
            present.add((row.model, row.environment))
            if row.ready and row.phase == "active" and row.host not in self._down_hosts:
                ready_by_key.setdefault((row.model, row.environment, row.spec_hash), []).append(row)
        failures_by_key: dict[Key, list[ActionOutcome]] = {}
        for outcome in report.failed:
            failures_by_key.setdefault((outcome.action.model, outcome.action.environment), []).append(outcome)
        result: dict[Key, cond.DeploymentStatus] = {}
        counts: dict[str, int] = {"success": 0, "pending": 0, "failure": 0, "error": 0}
        for key, state in sorted(plan.desired.deployments.items()):
            # What should run: all requested replicas (placed or not: an unplaced one is still
            # missing), or for a serverless deployment the active ones.
            desired_running = running_wanted.get(key, 0) if state.serverless else state.replicas
            ready_rows = ready_by_key.get((key[0], key[1], state.spec_hash or ""), [])
            failures = failures_by_key.get(key, [])
            marker = f"{state.model}/{state.environment}@{state.spec_hash}"
            hosts = sorted({r.host for r in ready_rows})
            short = revision[:7]
            status: cond.State
            if state.errors:
                status, reason, message = "failure", cond.INVALID_MANIFEST, str(state.errors[0])
                if len(state.errors) > 1:
                    message += f" (+{len(state.errors) - 1} more)"
                if key in present:
                    message += "; the last good version keeps running"
            elif not state.enabled:
                status, reason, message = "success", cond.DISABLED, "disabled: no replicas, endpoint answers 404"
            elif failures and any(f.terminal for f in failures):
                status, reason, message = "failure", cond.ROLLOUT_FAILED, failures[0].error or "rollout failed"
            elif marker in self._failed_rollouts:
                status, reason, message = "failure", cond.ROLLOUT_FAILED, self._failed_rollouts[marker]
            elif failures:
                status, reason, message = "error", cond.HOST_ERROR, failures[0].error or "action failed"
            elif state.unschedulable and len(ready_rows) < desired_running:
                status, reason, message = "failure", cond.UNSCHEDULABLE, f"unschedulable: {state.unschedulable}"
            elif len(ready_rows) >= desired_running:
                if desired_running:
                    status, reason = "success", cond.READY
                    message = f"{len(ready_rows)}/{desired_running} ready on {', '.join(hosts)} at {short}"
                else:
                    status, reason, message = "success", cond.STANDBY, f"scaled to zero (standby) at {short}"
            else:
                down = sorted(self._down_hosts)
                why = f"; host(s) down: {', '.join(down)}" if down else ""
                status, reason = "error", cond.HOST_ERROR
                message = f"{len(ready_rows)}/{desired_running} replicas ready{why}"
            previous = self.status.deployments.get(key)
            result[key] = cond.DeploymentStatus(
                state.model, state.environment, status, reason, message, hosts, len(ready_rows),
                desired_running, revision,
                cond.conditions_for(status, reason, message, previous.conditions if previous else None),
                origin=state.origin)
            counts[status] += 1
        for name, value in counts.items():
            self.metrics.deployments.labels(name).set(value)
        self.status.deployments = result
        return result

    def _publish_statuses(self, revision: str, statuses: list[CommitStatus]) -> None:
        """Write statuses that changed since last written for this commit (forges are rate-limited)."""
        if self.status_writer is None or not statuses:
            return
        seen = self._published.setdefault(revision, {})
        changed = [s for s in statuses if seen.get(s.context) != (s.state, s.description)]
        if not changed:
            return
        try:
            self.status_writer.publish(revision, changed)
        except StatusError as exc:
            log.warning("publishing commit statuses failed: %s", exc)
            return
        for s in changed:
            seen[s.context] = (s.state, s.description)
        if len(self._published) > 20:  # only recent commits matter
            for old in list(self._published)[:-20]:
                del self._published[old]
