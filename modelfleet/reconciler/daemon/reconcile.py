"""The daemon: one outer reconcile that always publishes status, around a linear inner pass.

    sync git → load manifests → observe hosts → plan (pure) → apply → publish routes → statuses
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from modelfleet.reconciler import logs
from modelfleet.reconciler.artifacts.origins import OriginResolver, huggingface_resolver
from modelfleet.reconciler.artifacts.shipping import ArtifactShipper, artifact_id
from modelfleet.reconciler.artifacts.store import ArtifactStore
from modelfleet.reconciler.clock import SteadyWallClock
from modelfleet.reconciler.config import Config
from modelfleet.reconciler.daemon.demand import DemandBook
from modelfleet.reconciler.daemon.executions import ExecutionJournal
from modelfleet.reconciler.daemon.inputs import gather_inputs, plan_with_probes
from modelfleet.reconciler.daemon.review import ReviewPlanner
from modelfleet.reconciler.daemon.route_watch import RouteWatch
from modelfleet.reconciler.daemon.store import (
    FACT_FAILED_ROLLOUTS,
    FACT_LAST_APPLIED,
    FACT_LAST_ATTEMPTED,
    FACT_PROBE_FAILURES,
    FACT_SOURCE_UNREACHABLE_SINCE,
    FACT_UNREACHABLE_SINCE,
    Store,
)
from modelfleet.reconciler.daemon.tokens import FACT as TOKEN_FACT
from modelfleet.reconciler.daemon.tokens import TokenBook
from modelfleet.reconciler.daemon.triggers import TriggerQueue
from modelfleet.reconciler.errors import ModelfleetError
from modelfleet.reconciler.gateway.routes import Activation, Backend, Overflow, RouteStore
from modelfleet.reconciler.pool.adapter import HostClient
from modelfleet.reconciler.pool.observe import Observation, observe
from modelfleet.reconciler.rollout.apply import Applier, ApplyReport
from modelfleet.reconciler.rollout.readiness import ReadinessMonitor
from modelfleet.reconciler.secrets import GatewaySecrets, redact_url
from modelfleet.reconciler.source.git import GitSource
from modelfleet.reconciler.status import CommitStatus, StatusError, StatusWriter
from modelfleet.reconciler.status.outbox import StatusOutbox
from modelfleet.state.autoscaler import ScalerMemory, decide
from modelfleet.state.demand import DemandReport, LoadSample, TrafficRate, WindowUsage, overflow_message
from modelfleet.state.desired import reserved_capacity
from modelfleet.state.loader import Catalog, load_tree
from modelfleet.state.outcome import deployment_statuses, failed_rollouts_after, pending_statuses
from modelfleet.state.plan import ActionOutcome
from modelfleet.state.planning import DesiredMemo, Plan, PlanInputs
from modelfleet.state.readiness import ReadinessVerdict
from modelfleet.state.routes import gateways_behind, route_key
from modelfleet.state.source import Condition, nothing_fetched, source_health
from modelfleet.state.status import AGGREGATE_CONTEXT, GATEWAYS_SWITCHING, DeploymentStatus, commit_statuses
from modelfleet.state.token_limits import GRANULARITIES, TokenLimits, current, token_verdict

log = logging.getLogger("modelfleet.daemon")
Key = tuple[str, str]
# Passes for the autoscaler (an activation, a scale decision) converge on the commit already
# fetched: a git fetch must not sit between a held request and its replica.
SCALING_TRIGGERS = frozenset({"demand", "scale"})
ACK_WAIT = 0.3  # seconds a pass waits for the gateways to serve its route table before deciding statuses
REMOVAL_ACK_WAIT = 10.0  # seconds a rollout waits for the gateways to serve the table before removing a replica


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.passes = Counter("modelfleet_passes_total", "Reconcile passes", ["result"], registry=self.registry)
        self.pass_seconds = Histogram("modelfleet_pass_duration_seconds", "Duration of a reconcile pass",
                                      registry=self.registry,
                                      buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.actions = Counter("modelfleet_actions_total", "Actions applied", ["op", "result"],
                               registry=self.registry)
        self.rollout_seconds = Histogram("modelfleet_rollout_duration_seconds", "Time from the start of a "
                                         "create, replace or start action to its replica being ready", ["op"],
                                         registry=self.registry,
                                         buckets=(0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200))
        self.deployments = Gauge("modelfleet_deployments", "Deployments by commit state", ["state"],
                                 registry=self.registry)
        self.hosts_up = Gauge("modelfleet_hosts_up", "Whether a pool host answers (1) or not (0)", ["host"],
                              registry=self.registry)
        self.observe_seconds = Gauge("modelfleet_observe_seconds", "Duration of the last observe",
                                     registry=self.registry)
        self.desired_replicas = Gauge("modelfleet_desired_replicas", "Replicas a deployment should run",
                                      ["model", "environment"], registry=self.registry)
        self.ready_replicas = Gauge("modelfleet_ready_replicas", "Ready replicas of a deployment",
                                    ["model", "environment"], registry=self.registry)
        self.activations = Counter("modelfleet_activations_total", "Serverless deployments started from zero "
                                   "for held requests", ["model", "environment"], registry=self.registry)
        self.scale_decisions = Counter("modelfleet_scale_decisions_total", "Autoscaler decisions that changed "
                                       "a deployment's replicas", ["model", "environment", "direction"],
                                       registry=self.registry)


@dataclass
class DaemonStatus:
    """What the API shows. The revisions last attempted and applied are read from the store (they
    live there only)."""

    store: Store | None = None
    revision: str | None = None
    observed_once: bool = False
    last_pass: dict[str, Any] = field(default_factory=dict)
    deployments: dict[Key, DeploymentStatus] = field(default_factory=dict)
    hosts: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    source_error: str | None = None
    source_condition: Condition | None = None  # SourceSynced (state/source.py)
    source_recovery: str | None = None  # the local Git mirror was damaged and fetched afresh (this process)
    transfers: dict[str, dict[str, Any]] = field(default_factory=dict)  # "host artifact" -> progress
    demand: DemandBook | None = None  # the gateways' load (serverless), shown live
    status_outbox: StatusOutbox | None = None  # forge statuses waiting to be written (status/outbox.py)
    # The forge's pull requests planned (daemon/review.py ReviewPlanner.pulls_json), when there is a forge.
    pull_requests: Callable[[], dict[str, Any]] | None = None
    # Route key -> the token limits and the tokens used in their windows (deployments with limits).
    tokens: Callable[[], dict[str, dict[str, Any]]] | None = None

    @property
    def last_attempted_revision(self) -> str | None:
        return self.store.fact(FACT_LAST_ATTEMPTED) if self.store is not None else None

    @property
    def last_applied_revision(self) -> str | None:
        return self.store.fact(FACT_LAST_APPLIED) if self.store is not None else None

    def _deployment_json(self, status: DeploymentStatus, load: dict[str, list[LoadSample]],
                         traffic: dict[str, TrafficRate], tokens: dict[str, dict[str, Any]]) -> dict[str, Any]:
        data = status.to_json()
        key = route_key(status.model, status.environment)
        if key in tokens:
            data["tokens"] = tokens[key]
        rate = traffic.get(key)
        if rate is not None:
            data["traffic"] = {"rps": rate.rps, "errorsPerSecond": rate.errors_per_second, "window": rate.window}
        samples = load.get(key)
        if samples:
            latest = samples[-1]
            data["load"] = {"concurrency": round(latest.concurrency, 3), "rps": round(latest.rps, 3),
                            "inFlight": latest.in_flight, "queued": latest.queued,
                            "idleSeconds": latest.idle_seconds}
            if latest.overflow is not None:
                data["overflow"] = {"endpointHealthy": latest.overflow.endpoint_healthy,
                                    "toEndpoint": latest.overflow.to_endpoint, "toPool": latest.overflow.to_pool}
                data["message"] = f"{data.get('message') or ''}; {overflow_message(latest.overflow)}".lstrip("; ")
        return data

    def to_json(self) -> dict[str, Any]:
        load = self.demand.samples() if self.demand is not None else {}
        traffic = self.demand.traffic() if self.demand is not None else {}
        tokens = self.tokens() if self.tokens is not None else {}
        return {
            "revision": self.revision,
            "lastAttemptedRevision": self.last_attempted_revision,
            "lastAppliedRevision": self.last_applied_revision,
            "ready": self.observed_once,
            "lastPass": self.last_pass,
            "errors": self.errors,
            "sourceError": self.source_error,
            "sourceRecovery": self.source_recovery,
            "conditions": [asdict(self.source_condition)] if self.source_condition is not None else [],
            "deployments": [self._deployment_json(d, load, traffic, tokens)
                            for _, d in sorted(self.deployments.items())],
            "gateways": self.demand.gateways() if self.demand is not None else {},
            "hosts": [dict(name=k, **v) for k, v in sorted(self.hosts.items())],
            # The 20 most recent (list() copies atomically: shipping threads write meanwhile).
            "transfers": sorted(list(self.transfers.values()), key=lambda t: t["at"], reverse=True)[:20],
            "statusWriter": self.status_outbox.to_json() if self.status_outbox is not None else None,
            "pullRequests": self.pull_requests() if self.pull_requests is not None else None,
        }


class Daemon:
    def __init__(self, config: Config, status_writer: StatusWriter | None = None,
                 drain_seconds: float = 0.5, clock: Callable[[], float] | None = None) -> None:
        self.config = config
        # Wall-clock time (host reachability is remembered across restarts) that system clock steps
        # do not move (reconciler/clock.py).
        self.clock = clock or SteadyWallClock()
        self.state_dir = Path(config.state_dir)
        self.store = Store(self.state_dir)
        self.routes = RouteStore(self.state_dir)
        self.route_watch = RouteWatch()
        self._route_since: dict[str, tuple[tuple[str, ...], int]] = {}  # route key -> (backend URLs, version)
        self._awaiting_gateways = 0  # the route table version some deployment waits for the gateways to serve
        self.source = GitSource(config.repo.url, config.repo.branch, self.state_dir, timeout=config.repo.fetch_timeout)
        self.hosts = {h.name: h for h in config.pool.hosts}
        self.clients = {h.name: HostClient(h, timeout=config.docker.timeout) for h in config.pool.hosts}
        # One observing thread per host, kept from pass to pass (pool/observe.py).
        self._observers = ThreadPoolExecutor(max_workers=max(1, len(self.clients)), thread_name_prefix="observe")
        self._replica_counts: dict[Key, tuple[int, int]] = {}  # what the replica gauges were last set to
        self.triggers = TriggerQueue()
        self.stop_event = threading.Event()
        self.metrics = Metrics()
        self.status = DaemonStatus(store=self.store)
        self.status_writer = status_writer
        self._published: dict[str, dict[str, tuple[str, str]]] = {}  # revision -> context -> (state, desc)
        # The plan of the current pass: what apply threads publish routes for.
        self._plan: Plan | None = None
        self._gateway_settings: tuple[Plan, GatewaySettings] | None = None
        self._routes_lock = threading.Lock()
        # Loaded manifests of the last commit, and its repository model files that are not valid.
        self._catalog: tuple[str, Catalog, dict[str, str]] | None = None
        self._desired_memo = DesiredMemo()
        # Serverless: the gateways' load (in memory; refilled by their next reports after a restart)
        # and what the autoscaler remembers between passes.
        self.demand = DemandBook()
        self.executions = ExecutionJournal()  # what the gateways served (api/executions.py)
        # The tokens each deployment used, over every gateway (saved in the store: a restart forgives nothing).
        self.tokens = TokenBook(load=lambda: self.store.fact(TOKEN_FACT),
                                save=lambda data: self.store.set_fact(TOKEN_FACT, data))
        self.status.tokens = self.tokens_json
        self.status.demand = self.demand
        self._scaler_memory: dict[Key, ScalerMemory] = {}
        # Model origins: uploads and repository files in a content-addressed store, HuggingFace models
        # resolved to a commit and downloaded into the daemon's cache, shipped to the hosts that need them.
        self.artifacts = ArtifactStore(self.state_dir)
        self.hf = huggingface_resolver(config)
        self.origins = OriginResolver(self.hf, self.artifacts, ttl=max(5.0, config.repo.poll_interval))
        self.shipper = ArtifactShipper(self.artifacts, self.hf, on_progress=self._on_transfer)
        # Between passes: the replicas the last plan checked, probed again every readinessProbe.period.
        self.readiness = ReadinessMonitor(self.store, lambda: self._plan.monitored if self._plan else [],
                                          self._on_readiness, lambda: self.applier.prober)
        # Per-deployment secrets the gateway adds and our runtimes require (stateDir/gateway-secret.key).
        self.gateway_secrets = GatewaySecrets(self.state_dir)
        self.applier = Applier(self.clients, self.hosts, self.store, config.rollout, self.publish_routes,
                               drain_seconds=drain_seconds, stop_event=self.stop_event,
                               prepare_volumes=self.shipper.prepare_volumes, origin_env=self.shipper.container_env,
                               gateway_secret=self.gateway_secrets.for_deployment,
                               await_gateways=self._await_gateways_before_removal)
        # Review branches (review.branches): planned after a pass on a thread of their own, never applied.
        self.reviews = ReviewPlanner(self)

    def close(self) -> None:
        self.reviews.close()
        self.applier.close()
        self._observers.shutdown(wait=False)
        for client in self.clients.values():
            client.close()
        with contextlib.suppress(ModelfleetError):
            self.tokens.flush()
        self.store.close()
        self.routes.close()

    # --- routes ---------------------------------------------------------------------------------

    def publish_routes(self) -> int:
        """The route table from the inventory: ready, active replicas on reachable hosts, for the
        endpoints the current plan routes (404 for the rest). Called from apply threads too."""
        current = self._plan
        if current is None:
            return 0
        with self._routes_lock:
            table: dict[str, list[Backend]] = {key: [] for key in current.route_keys}
            for row in self.store.inventory():
                if row.phase != "active" or not row.ready or not row.url or row.host in current.unreachable_hosts:
                    continue
                key = route_key(row.model, row.environment)
                if key in table:
                    host = self.hosts.get(row.host)
                    table[key].append(Backend(row.url, row.name, row.host, row.replica, row.spec_hash, row.revision,
                                              host.location.name if host else "",
                                              host.location.continent if host else ""))
            # What the gateways hold and overflow depends on the plan only: made once per plan, not on
            # each publish (apply threads publish as every replica becomes ready).
            if self._gateway_settings is None or self._gateway_settings[0] is not current:
                before = self._gateway_settings[1] if self._gateway_settings is not None else None
                self._gateway_settings = (current, gateway_settings(current, before))
            settings = self._gateway_settings[1]
            routes = {k: tuple(sorted(v, key=lambda b: b.container)) for k, v in table.items()}
            version = self.routes.publish(routes, activation=settings.activation, overflow=settings.overflow,
                                          tokens=settings.tokens)
            self.route_watch.published(version)  # the long-polls of remote gateways answer now
            for key, backends in routes.items():  # since which version each deployment has these backends
                urls = tuple(b.url for b in backends)
                if self._route_since.get(key, ((), 0))[0] != urls:
                    self._route_since[key] = (urls, version)
            return version

    # --- the pass -------------------------------------------------------------------------------

    @logs.scoped
    def reconcile(self, trigger: str = "manual") -> DaemonStatus:
        """Outer reconcile: whatever happens inside, status and history are published."""
        started = time.monotonic()
        pass_id = 0  # 0: the store could not even record the pass (disk full): nothing is applied
        result, summary = "failed", {}
        try:
            pass_id = self.store.begin_pass(trigger)
            logs.bind(pass_id=pass_id)  # on every line this pass logs (reconciler/logs.py)
            summary = self._reconcile_inner(pass_id, trigger)
            troubles = ("failed_actions", "down_hosts", "held_actions")
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
            try:
                if pass_id:
                    self.store.finish_pass(pass_id, self.status.revision, result, summary)
            except ModelfleetError as exc:  # a store that cannot record the pass must not end the loop
                log.error("pass %d could not be recorded: %s", pass_id, exc)
                result, summary = "failed", {**summary, "error": summary.get("error") or str(exc)}
                self._publish_pass_error(str(exc))
            self.status.last_pass = {"id": pass_id, "trigger": trigger, "result": result, "seconds": seconds,
                                     "finishedAt": time.time(), **summary, "store": self.store.health()}
            self.metrics.passes.labels(result).inc()
            self.metrics.pass_seconds.observe(seconds)
        self.reviews.after_pass(trigger)
        return self.status

    def _reconcile_inner(self, pass_id: int, trigger: str = "manual") -> dict[str, Any]:
        # 1. Sync the Git source: the commit to converge on (a scaling pass keeps the last one; while
        #    the fetch fails, the commit fetched last, and the status says why).
        known = self.status.revision
        revision = known if trigger in SCALING_TRIGGERS and known is not None else self._sync_source()
        new_revision = revision != self.store.fact(FACT_LAST_ATTEMPTED)
        self.status.revision = revision
        logs.bind(revision=revision)
        self.store.set_fact(FACT_LAST_ATTEMPTED, revision)
        # 2. Observe the pool (one label-filtered list per host, in parallel).
        observation = observe(list(self.clients.values()), self._observers)
        # 3. Load the manifests at the commit (cached per commit) and what is known of their origins.
        catalog, file_errors = self._load(revision)
        facts = self.origins.facts(catalog, file_errors)
        # 4. Plan (pure): every decision of the pass, from the facts; probes the replicas that run.
        #    (The readiness monitor waits meanwhile: one writer of readiness facts at a time.)
        with self.readiness.lock:
            inputs = gather_inputs(self.config, catalog, revision, observation, self.store, facts, self.clock(),
                                   commit_message=self.source.commit_message(revision))
            inputs = replace(inputs, load=self.demand.samples(), scaler_memory=dict(self._scaler_memory),
                             watching_since=self.demand.watching_since, monotonic=self.demand.clock())
            plan = self.plan_pass(inputs)
            self._plan = plan
            self.reviews.pass_planned(inputs, plan)
            self._remember_scaling(plan, observation)
            # 5. Write what the plan learnt (inventory, host reachability, versions no longer desired).
            self.store.write_changes(plan.inventory)
            self.store.set_fact(FACT_PROBE_FAILURES, plan.probe_failures)
        for why in plan.left_routes:
            log.warning("readiness: %s", why)
        self.store.set_fact(FACT_UNREACHABLE_SINCE, plan.unreachable_since)
        self.store.set_fact(FACT_FAILED_ROLLOUTS, plan.failed_rollouts)
        self._record_hosts(observation, plan)
        self.status.observed_once = True
        if new_revision:
            self._publish_statuses(revision, pending_statuses(plan))
        self.publish_routes()
        # 6. Apply exactly the plan's actions.
        report = self.applier.apply(pass_id, plan.actions, self._count_outcome) if plan.actions else ApplyReport()
        failed_rollouts = failed_rollouts_after(plan.failed_rollouts, report.outcomes)
        if failed_rollouts != plan.failed_rollouts:
            self.store.set_fact(FACT_FAILED_ROLLOUTS, failed_rollouts)
        if plan.actions and not report.failed:
            self._collect_artifacts(plan, observation)
        # 7. Replicas the plan probed that were not ready yet get a second chance after apply.
        self.readiness.step(plan.unanswered)
        self.publish_routes()
        # 8. Statuses from what is now true.
        with self._routes_lock:  # apply threads and the readiness monitor publish too
            route_versions = {key: since for key, (_, since) in self._route_since.items()}
        self._wait_for_gateways(max(route_versions.values(), default=0))
        statuses = deployment_statuses(plan, self.store.inventory(), report.outcomes, failed_rollouts,
                                       self.status.deployments, self.clock(), route_versions,
                                       self.demand.acknowledged())
        self._awaiting_gateways = max((route_versions.get(route_key(*key), 0) for key, s in statuses.items()
                                       if s.reason == GATEWAYS_SWITCHING), default=0)
        self._count_states(statuses)
        self.status.deployments = statuses
        global_errors = [str(e) for e in plan.catalog.errors]
        self.status.errors = global_errors
        self._publish_statuses(revision, commit_statuses(list(statuses.values()), global_errors, plan.deletion_hold))
        if all(s.state == "success" for s in statuses.values()) and not global_errors and not plan.deletion_hold:
            self.store.set_fact(FACT_LAST_APPLIED, revision)
        return {
            "revision": revision,
            "actions": len(plan.actions),
            "held_actions": len(plan.held),
            "deletion_hold": plan.deletion_hold,
            "failed_actions": [f"{o.action.op} {o.action.model}/{o.action.environment}: {o.error}"
                               for o in report.failed],
            "down_hosts": sorted(observation.down_hosts),
            "observe_seconds": round(observation.seconds, 4),
            "errors": len(plan.desired.errors),
        }

    def _await_gateways_before_removal(self, version: int) -> None:
        """An old replica goes only once every live gateway serves the table without it (at most
        REMOVAL_ACK_WAIT: a gateway that does not follow any more must not hold rollouts forever)."""
        if behind := gateways_behind(version, self.demand.acknowledged()):
            log.info("waiting for gateway(s) %s to serve route table v%d before removing a replica",
                     ", ".join(behind), version)
        self._wait_for_gateways(version, REMOVAL_ACK_WAIT)
        if behind := gateways_behind(version, self.demand.acknowledged()):
            log.warning("removing a replica although gateway(s) %s do not serve route table v%d yet (waited %gs)",
                        ", ".join(behind), version, REMOVAL_ACK_WAIT)

    def _wait_for_gateways(self, version: int, timeout: float = ACK_WAIT) -> None:
        """Give the live gateways a moment to serve route table ``version`` (they say so at once,
        kicked by the new table) before the statuses are decided; one still behind after
        ``timeout`` makes its deployments pending, and its report wakes a pass later."""
        deadline = time.monotonic() + timeout
        while gateways_behind(version, self.demand.acknowledged()) and time.monotonic() < deadline:
            time.sleep(0.01)

    # --- serverless -----------------------------------------------------------------------------

    def on_demand(self, report: DemandReport) -> set[str]:
        """A gateway's load report (API thread). Requests held for activation wake a pass at once;
        returns the route keys with held requests."""
        held = self.demand.record(report)
        self.tokens.record(report.gateway, report.tokens)
        if held:
            self.triggers.fire("demand")
        elif self._awaiting_gateways and report.table_version >= self._awaiting_gateways and not gateways_behind(
                self._awaiting_gateways, self.demand.acknowledged()):
            self._awaiting_gateways = 0
            self.triggers.fire("demand")  # every gateway serves the new routes: the statuses say ready now
        return held

    def token_usage(self) -> dict[str, dict[str, WindowUsage]]:
        """The current windows' tokens of every deployment with token limits (a demand report's reply)."""
        settings = self._gateway_settings
        return self.tokens.reply(settings[1].tokens if settings is not None else ())

    def tokens_json(self) -> dict[str, dict[str, Any]]:
        """For the status: each limited deployment's limits, the tokens of its windows, and whether
        its requests are refused now."""
        settings = self._gateway_settings
        if settings is None:
            return {}
        now = self.tokens.clock()
        result: dict[str, dict[str, Any]] = {}
        for key, limits in settings[1].tokens.items():
            usage = self.tokens.usage(key)
            data: dict[str, Any] = {"limits": limits.to_dict(), "describe": limits.describe()}
            for granularity in sorted(limits.granularities, key=GRANULARITIES.index):
                counts = current(usage, granularity, now)
                data[granularity] = {"input": counts.input, "output": counts.output, "total": counts.total}
            verdict = token_verdict(limits, usage, now)
            data["limited"] = verdict.message if verdict is not None else None
            result[key] = data
        return result

    def check_scaling(self) -> bool:
        """Between passes (every ~2 s): would the autoscaler, fed the latest load, change a
        deployment's replicas? Then a pass is due. The decision itself is the plan's: this only
        asks the same pure function whether to plan now."""
        current = self._plan
        if current is None or not current.scaling:
            return False
        load = self.demand.samples()
        now = self.demand.clock()
        wanted_running: dict[Key, int] = {}
        for replica in current.desired.replicas:
            if replica.running and replica.key in current.scaling:
                wanted_running[replica.key] = wanted_running.get(replica.key, 0) + 1
        for entry in current.catalog.deployments():
            spec = entry.spec
            last = current.scaling.get(entry.key)
            if spec is None or spec.serverless is None or last is None:
                continue
            running = wanted_running.get(entry.key, 0)
            decision = decide(spec.serverless, load.get(route_key(*entry.key), ()), self._scaler_memory.get(entry.key),
                              now, current=running, watching_since=self.demand.watching_since)
            if decision.desired != running:
                self.triggers.fire("scale")
                return True
        return False

    def _remember_scaling(self, plan: Plan, observation: Observation) -> None:
        running: dict[Key, int] = {}
        for replica in observation.replicas:
            if replica.running:
                running[replica.key] = running.get(replica.key, 0) + 1
        for key, decision in plan.scaling.items():
            before = running.get(key, 0)
            if decision.desired != before:
                self.metrics.scale_decisions.labels(key[0], key[1], "up" if decision.desired > before else "down").inc()
                if before == 0:
                    self.metrics.activations.labels(*key).inc()
                log.info("autoscaler: %s/%s %d -> %d: %s", key[0], key[1], before, decision.desired, decision.reason)
        self._scaler_memory = {key: decision.memory for key, decision in plan.scaling.items()}

    def _on_readiness(self, verdict: ReadinessVerdict) -> None:
        """The monitor changed who is ready: routes now, statuses by a pass."""
        for why in verdict.why.values():
            log.warning("readiness: %s", why)
        self.publish_routes()
        self.triggers.fire("readiness")

    def _sync_source(self) -> str:
        """Step 1: fetch the branch. When the fetch fails and a commit was fetched before, the pass
        goes on with that commit (drift repair continues); state/source.py says what is reported.
        With no commit ever fetched the pass fails (GitSourceError)."""
        try:
            synced = self.source.sync()
        except ModelfleetError as exc:
            self.status.source_condition = nothing_fetched(str(exc), self.status.source_condition, self.clock())
            raise
        finally:
            self.status.source_recovery = self.source.recovery
        health = source_health(synced.failure, synced.revision, self.store.fact(FACT_SOURCE_UNREACHABLE_SINCE),
                               self.status.source_condition, self.clock())
        if health.error is not None and health.error != self.status.source_error:
            log.warning("%s", health.error)
        elif health.error is None and self.status.source_error is not None:
            log.info("the git source syncs again: %s at %s", self.config.repo.branch, synced.revision[:12])
        self.store.set_fact(FACT_SOURCE_UNREACHABLE_SINCE, health.fact)
        self.status.source_error = health.error
        self.status.source_condition = health.condition
        for commit, status in health.statuses:
            self._publish_statuses(commit, [status])
        return synced.revision

    def plan_pass(self, inputs: PlanInputs) -> Plan:
        """The pass's plan (the same function `modelfleet plan` uses)."""
        return plan_with_probes(inputs, self.applier.prober, self._desired_memo)

    def _load(self, revision: str) -> tuple[Catalog, dict[str, str]]:
        if self._catalog is None or self._catalog[0] != revision:
            tree = self.source.tree(revision)
            catalog = load_tree(tree)
            self._catalog = (revision, catalog, self.origins.ingest_repository_files(catalog, tree))
        return self._catalog[1], self._catalog[2]

    def _publish_pass_error(self, message: str) -> None:
        """A pass that failed midway must not leave its commit 'pending' forever."""
        revision = self.status.revision
        if revision is None:
            return  # the commit is not known (the fetch failed): nothing to annotate
        with contextlib.suppress(Exception):
            self._publish_statuses(revision, [CommitStatus(AGGREGATE_CONTEXT, "error", message)])

    # --- steps ----------------------------------------------------------------------------------

    def _on_transfer(self, host: str, artifact: str, sent: int, total: int) -> None:
        self.status.transfers[f"{host} {artifact}"] = {
            "host": host, "artifact": artifact, "sent": sent, "total": total, "done": sent >= total, "at": time.time()}

    def _collect_artifacts(self, plan: Plan, observation: Observation) -> None:
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

    def _record_hosts(self, observation: Observation, plan: Plan) -> None:
        reserved = reserved_capacity(plan.desired, list(self.hosts.values()))
        for name, host in self.hosts.items():
            down = name in observation.down_hosts
            self.metrics.hosts_up.labels(name).set(0 if down else 1)
            if not down:
                state = "up"
            elif name in plan.suspect_hosts:
                state = f"unreachable (replicas move after {self.config.docker.down_after:g}s)"
            else:
                state = "down (replicas moved to other eligible hosts)"
            self.status.hosts[name] = {
                "url": redact_url(host.url), "up": not down, "state": state, "error": observation.errors.get(name),
                "location": host.location.model_dump(), "flavors": [f.name for f in host.flavors],
                "capacity": {"cpus": host.capacity.cpus, "memory": host.capacity.memory},
                # What the placement reserves there (state/desired.reserved_capacity).
                "reserved": {"cpus": reserved[name][0], "memory": reserved[name][1]},
                "replicas": sum(1 for r in observation.replicas if r.host == name),
                "observe_seconds": observation.host_seconds.get(name),
            }
        self.metrics.observe_seconds.set(observation.seconds)

    def _count_outcome(self, outcome: ActionOutcome) -> None:
        self.metrics.actions.labels(outcome.action.op, "ok" if outcome.ok else "failed").inc()
        if outcome.ok and outcome.action.op in ("create", "replace", "start"):
            self.metrics.rollout_seconds.labels(outcome.action.op).observe(outcome.seconds)

    def _count_states(self, statuses: dict[Key, DeploymentStatus]) -> None:
        counted = self._replica_counts
        for key, status in statuses.items():
            figures = (status.desired_replicas, status.ready_replicas)
            if counted.get(key) == figures:
                continue  # the gauges say so already (a label lookup per series and pass adds up)
            counted[key] = figures
            self.metrics.desired_replicas.labels(status.model, status.environment).set(status.desired_replicas)
            self.metrics.ready_replicas.labels(status.model, status.environment).set(status.ready_replicas)
        counts: dict[str, int] = {"success": 0, "pending": 0, "failure": 0, "error": 0}
        for status in statuses.values():
            counts[status.state] += 1
        for name, value in counts.items():
            self.metrics.deployments.labels(name).set(value)

    def _publish_statuses(self, revision: str, statuses: list[CommitStatus]) -> None:
        """Write statuses that changed since last written for this commit (forges are rate-limited)."""
        if self.status_writer is None or not statuses:
            return
        if isinstance(self.status_writer, StatusOutbox):
            # Queued (the outbox skips what it wrote already): never waits for the forge.
            self.status_writer.publish(revision, statuses)
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


@dataclass(frozen=True)
class GatewaySettings:
    """What the route table tells gateways besides the backends, per route key."""

    activation: dict[str, Activation]  # serverless deployments: how requests are held while they activate
    overflow: dict[str, Overflow]  # those with an on-prem endpoint: where their requests go first
    tokens: dict[str, TokenLimits]  # those with maxToken policies: their budgets


def gateway_settings(plan: Plan, before: GatewaySettings | None = None) -> GatewaySettings:
    """The plan's gateway settings (never an endpoint's token). A deployment whose manifests are
    invalid (frozen) keeps the token limits it had: bad input never lifts a limit."""
    activation: dict[str, Activation] = {}
    overflow: dict[str, Overflow] = {}
    tokens: dict[str, TokenLimits] = {}
    for deployment, state in plan.desired.deployments.items():
        limited = route_key(*deployment)
        if state.token_limits is not None:
            tokens[limited] = state.token_limits
        elif state.frozen and before is not None and limited in before.tokens:
            tokens[limited] = before.tokens[limited]
    for entry in plan.catalog.deployments():
        spec = entry.spec
        if spec is None or spec.serverless is None or not spec.enabled:
            continue
        key = route_key(*entry.key)
        activation[key] = Activation(queue=spec.serverless.queue, timeout=spec.serverless.activation_timeout)
        if spec.overflow is not None:
            o = spec.overflow
            overflow[key] = Overflow(
                endpoint=o.endpoint, token_file=o.token_file, health_path=o.health_check.path,
                health_period=o.health_check.period, health_timeout=o.health_check.timeout,
                failure_threshold=o.health_check.failure_threshold, max_concurrency=o.max_concurrency,
                percentage=o.percentage, consecutive_failures=o.outlier_detection.consecutive_failures,
                ejection_time=o.outlier_detection.ejection_time)
    return GatewaySettings(activation, overflow, tokens)
