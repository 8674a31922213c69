"""Apply a plan to the pool: create, blue-green replace, start, stop, pause, remove.

Actions of one deployment run in plan order, one at a time (a rolling blue-green); deployments run
in parallel. Every step is written to the store *before* it happens on a host (write-ahead), so a
daemon killed at any point converges on the next pass and never leaves an orphan.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from modelfleet.reconciler.config import RolloutSettings
from modelfleet.reconciler.daemon.store import Store
from modelfleet.reconciler.errors import (
    DockerOperationError,
    Interrupted,
    ModelfleetError,
    NotReady,
    TerminalError,
)
from modelfleet.reconciler.pool.adapter import ContainerInfo, ContainerSpec, HostClient
from modelfleet.reconciler.rollout.readiness import ReadinessProber
from modelfleet.state.actual import LABEL_REVISION, ObservedReplica, container_name, labels_for
from modelfleet.state.desired import STANDBY_PAUSED, DesiredReplica
from modelfleet.state.plan import Action, ActionOutcome
from modelfleet.state.pool import Host

log = logging.getLogger("modelfleet.apply")
Key = tuple[str, str]


def _log_fields(pass_id: int, action: Action) -> dict[str, object]:
    """What a JSON log line of an action carries (apply threads do not see the pass's log context)."""
    return {"pass_id": pass_id, "model": action.model, "environment": action.environment, "host": action.host}


@dataclass
class ApplyReport:
    outcomes: list[ActionOutcome] = field(default_factory=list)

    def for_key(self, key: Key) -> list[ActionOutcome]:
        return [o for o in self.outcomes if (o.action.model, o.action.environment) == key]

    @property
    def failed(self) -> list[ActionOutcome]:
        return [o for o in self.outcomes if not o.ok]


class Applier:
    def __init__(
        self,
        clients: Mapping[str, HostClient],
        hosts: Mapping[str, Host],
        store: Store,
        rollout: RolloutSettings,
        publish_routes: Callable[[], object],
        *,
        drain_seconds: float = 0.5,
        stop_event: threading.Event | None = None,
        prepare_volumes: Callable[[HostClient, DesiredReplica], dict[str, dict[str, str]] | None] | None = None,
        origin_env: Callable[[dict[str, object] | None], dict[str, str]] | None = None,
        gateway_secret: Callable[[str, str], str | None] | None = None,
        await_gateways: Callable[[int], None] | None = None,
    ) -> None:
        """``await_gateways(version)``: returns once the gateways serve route table ``version`` (or
        gave up waiting): an old replica is removed only after that, so a gateway that is slow to
        follow (a remote one reconnecting) never sends a request to a replica that is gone."""
        self.clients = clients
        self.hosts = hosts
        self.store = store
        self.rollout = rollout
        self.publish_routes = publish_routes
        self.drain_seconds = drain_seconds
        self.stop_event = stop_event or threading.Event()
        self.prepare_volumes = prepare_volumes
        self.origin_env = origin_env
        self.gateway_secret = gateway_secret
        self.await_gateways = await_gateways
        self.prober = ReadinessProber()
        self._progress = threading.local()  # per deployment group: the progress deadline
        self._publish_lock = threading.Lock()

    def close(self) -> None:
        self.prober.close()

    # --- entry point ----------------------------------------------------------------------------

    def apply(self, pass_id: int, actions: Sequence[Action],
              on_outcome: Callable[[ActionOutcome], None] | None = None) -> ApplyReport:
        groups: dict[Key, list[Action]] = {}
        for action in actions:
            groups.setdefault((action.model, action.environment), []).append(action)
        report = ApplyReport()
        lock = threading.Lock()

        def run_group(group: list[Action]) -> None:
            # rollout.progressDeadline: each action must make progress within it of the last one that did.
            self._progress.deadline = (time.monotonic() + self.rollout.progress_deadline
                                       if self.rollout.progress_deadline else None)
            for action in group:
                if self.stop_event.is_set():
                    return  # shutting down: the next pass picks up the rest
                outcome = self._run(pass_id, action)
                if outcome.ok and self._progress.deadline is not None:
                    self._progress.deadline = time.monotonic() + self.rollout.progress_deadline
                with lock:
                    report.outcomes.append(outcome)
                if on_outcome is not None:
                    on_outcome(outcome)
                if not outcome.ok and action.op in ("create", "replace", "start"):
                    # Don't tear down the old replicas of a deployment whose new ones fail.
                    return

        with ThreadPoolExecutor(max_workers=self.rollout.parallelism) as pool:
            list(pool.map(run_group, groups.values()))
        return report

    def _run(self, pass_id: int, action: Action) -> ActionOutcome:
        started = time.monotonic()
        container = action.current.name if action.current else None
        action_id = self.store.begin_action(pass_id, action.op, action.model, action.environment, action.host,
                                            action.replica, container)
        try:
            handler = {"create": self._create, "replace": self._replace, "remove": self._remove,
                       "start": self._start, "stop": self._stop, "pause": self._pause}[action.op]
            handler(action)
        except ModelfleetError as exc:
            self.store.finish_action(action_id, "failed", str(exc))
            log.warning("%s %s/%s replica %d on %s failed: %s", action.op, action.model, action.environment,
                        action.replica, action.host, exc, extra=_log_fields(pass_id, action))
            return ActionOutcome(action, False, str(exc), isinstance(exc, TerminalError | NotReady),
                                 time.monotonic() - started, failed_version=isinstance(exc, NotReady))
        self.store.finish_action(action_id, "ok")
        log.info("%s %s/%s replica %d on %s (%s) in %.2fs", action.op, action.model, action.environment,
                 action.replica, action.host, action.reason, time.monotonic() - started,
                 extra=_log_fields(pass_id, action))
        return ActionOutcome(action, True, None, False, time.monotonic() - started)

    def _publish(self) -> int | None:
        """Publish the route table; its version (None from a publisher that does not say)."""
        with self._publish_lock:
            version = self.publish_routes()
        return version if isinstance(version, int) else None

    def _drain(self, version: int | None) -> None:
        """In-flight requests finish and the gateways serve the table without the replica."""
        time.sleep(self.drain_seconds)
        if version is not None and self.await_gateways is not None:
            self.await_gateways(version)

    # --- operations -----------------------------------------------------------------------------

    def _create(self, action: Action) -> None:
        assert action.desired is not None
        self._bring_up(action.desired)

    def _replace(self, action: Action) -> None:
        """Blue-green: new replica up and ready and routed, then the old one drained and removed.

        If the new one never gets ready, it is removed and the old one keeps serving (auto-revert).
        """
        assert action.desired is not None and action.current is not None
        self._bring_up(action.desired)
        self._take_down(action.current)

    def _remove(self, action: Action) -> None:
        assert action.current is not None
        self._take_down(action.current)

    def _start(self, action: Action) -> None:
        assert action.desired is not None and action.current is not None
        client = self.clients[action.current.host]
        if action.current.paused:
            client.unpause(action.current.container_id)  # loaded already: ready as soon as it is thawed
        else:
            client.start(action.current.container_id)
        info = client.inspect(action.current.container_id)
        self._await_ready(action.desired, client, info)

    def _stop(self, action: Action) -> None:
        assert action.current is not None
        current = action.current
        self.store.set_ready(current.host, current.name, False)
        if current.running:
            self._drain(self._publish())
        self.clients[current.host].stop(current.container_id)  # a paused one too (Docker thaws it to stop it)

    def _pause(self, action: Action) -> None:
        """A standby kept paused (serverless.standby: paused): a running replica leaves the routes,
        drains and is frozen; a stopped one is started, waited for until ready (loaded, warmed up;
        never routed) and frozen. One that does not get ready is stopped again (a stopped standby)."""
        assert action.desired is not None and action.current is not None
        current = action.current
        client = self.clients[current.host]
        if current.running:
            self.store.set_ready(current.host, current.name, False)
            self._drain(self._publish())
        else:
            client.start(current.container_id)
            self._warm_standby(action.desired, client, client.inspect(current.container_id))
        client.pause(current.container_id)

    # --- steps ----------------------------------------------------------------------------------

    def _bring_up(self, want: DesiredReplica) -> None:
        client = self.clients[want.host]
        name = container_name(want.model, want.environment, want.index, want.spec_hash)
        paused = not want.running and want.standby == STANDBY_PAUSED
        spec = self._container_spec(client, want, name)
        self.store.record_intent(want.host, name, want.model, want.environment, want.index, want.spec_hash,
                                 want.revision)
        try:
            info = client.create_and_start(spec, start=want.running or paused)
        except DockerOperationError as exc:
            if "Conflict" not in str(exc) and "already in use" not in str(exc):
                raise
            # A leftover of an interrupted attempt holds the name: replace it, but only if its labels
            # prove it is exactly this replica (a container we cannot prove we own is never removed).
            stale = client.find(name)
            if stale is not None:
                if any(stale.labels.get(k) != v for k, v in spec.labels.items() if k != LABEL_REVISION):
                    raise TerminalError(f"a container named {name} that modelfleet did not create for this replica"
                                        f" already exists on host {want.host}; rename or remove it") from None
                client.remove(stale.id)
            info = client.create_and_start(spec, start=want.running or paused)
        url = self._url(want.host, info, want.runtime.port)
        probe = want.runtime.probe
        probe_url = self._url(want.host, info, probe.port) + probe.path if url else None
        self.store.record_created(want.host, name, info.id, url, probe_url)
        if want.running:
            self._await_ready(want, client, info)
        elif paused:  # a paused standby: loaded, warmed up, never routed, then frozen
            self._warm_standby(want, client, info, fail=self._fail)
            client.pause(info.id)
        # else a stopped standby: created (image and model in place), not running

    def _warm_standby(self, want: DesiredReplica, client: HostClient, info: ContainerInfo,
                      fail: Callable[[HostClient, DesiredReplica, ContainerInfo, str], None] | None = None) -> None:
        """Wait until a standby answers its probe, without routing it. ``fail``: what a standby that
        does not get ready becomes (default: stopped again, NotReady raised)."""
        self._probe_until_ready(want, client, info, fail or self._stop_unready)

    def _stop_unready(self, client: HostClient, want: DesiredReplica, info: ContainerInfo, why: str) -> None:
        logs = client.logs_tail(info.id)
        client.stop(info.id)
        detail = f"; last log lines: {logs}" if logs else ""
        raise NotReady(f"standby replica {want.index} of {want.model}/{want.environment} on {want.host} {why}: "
                       f"not paused, left stopped (a request starts it){detail}")

    def _await_ready(self, want: DesiredReplica, client: HostClient, info: ContainerInfo) -> None:
        url = self._url(want.host, info, want.runtime.port)
        self._probe_until_ready(want, client, info, self._fail)
        self.store.set_ready(want.host, info.name, True, url)
        self._publish()

    def _probe_until_ready(self, want: DesiredReplica, client: HostClient, info: ContainerInfo,
                           fail: Callable[[HostClient, DesiredReplica, ContainerInfo, str], None]) -> None:
        url = self._url(want.host, info, want.runtime.port)
        probe = want.runtime.probe
        probe_url = self._url(want.host, info, probe.port) + probe.path if url else None
        deadline = time.monotonic() + self.rollout.healthy_deadline
        why_late = f"not ready within rollout.healthyDeadline ({self.rollout.healthy_deadline:g}s, probe {probe.path})"
        progress_deadline = getattr(self._progress, "deadline", None)
        if progress_deadline is not None and progress_deadline < deadline:
            deadline = progress_deadline
            why_late = (f"not ready within rollout.progressDeadline ({self.rollout.progress_deadline:g}s since the "
                        f"last progress of this rollout, probe {probe.path})")
        if probe.initial_delay:
            time.sleep(probe.initial_delay)
        healthy_since: float | None = None
        attempts = 0
        while True:
            attempts += 1
            ok = probe_url is not None and self.prober.probe(probe_url, probe.timeout)
            now = time.monotonic()
            if ok:
                healthy_since = healthy_since or now
                if now - healthy_since >= self.rollout.min_healthy_time:
                    break
            else:
                healthy_since = None
            if attempts % 10 == 0 and not client.inspect(info.id).running:
                fail(client, want, info, "the container exited")
            if self.stop_event.is_set():
                # Not a failure of the version: the next daemon probes it (readiness checks of the plan).
                raise Interrupted(f"shutting down while replica {want.index} of {want.model}/{want.environment}"
                                  f" on {want.host} was getting ready")
            if now >= deadline:
                fail(client, want, info, why_late)
            # Probe often while a replica comes up (a refused connection costs nothing): a held
            # request waits for exactly this. Never more often than every 20 ms, never less than 0.1 s.
            time.sleep(min(probe.period, 0.1, 0.02 * attempts))

    def _fail(self, client: HostClient, want: DesiredReplica, info: ContainerInfo, why: str) -> None:
        """The new version failed: with rollout.autoRevert it is removed, otherwise (Nomad's semantics)
        it is left in place, not routed, for inspection. Either way the previous version keeps serving
        and this version is not retried until the spec changes."""
        logs = client.logs_tail(info.id)
        detail = f"; last log lines: {logs}" if logs else ""
        if not self.rollout.auto_revert:
            raise NotReady(f"new replica {want.index} of {want.model}/{want.environment} on {want.host} {why}:"
                           f" left in place as {info.name} (rollout.autoRevert: false), previous version keeps"
                           f" serving{detail}")
        self.store.mark_removing(want.host, info.name)
        client.remove(info.id)
        self.store.forget(want.host, info.name)
        raise NotReady(f"new replica {want.index} of {want.model}/{want.environment} on {want.host} {why}:"
                       f" removed it, previous version keeps serving{detail}")

    def _take_down(self, old: ObservedReplica) -> None:
        self.store.mark_removing(old.host, old.name)
        version = self._publish()
        if old.running:
            self._drain(version)
        self.clients[old.host].remove(old.container_id)
        self.store.forget(old.host, old.name)

    def _container_spec(self, client: HostClient, want: DesiredReplica, name: str) -> ContainerSpec:
        from modelfleet.runtimes.contract import RuntimeEnvironment

        runtime = want.runtime
        # The runtime contract (modelfleet/runtimes/contract.py): where the model is and what it
        # is, which deployment this is, the port; then the manifest's env on top.
        origin_env = self.origin_env(want.origin) if self.origin_env and want.origin else {}
        ours = runtime.type in ("torch", "transformers")
        # Our runtimes refuse requests that do not carry the deployment's secret (the gateway adds
        # it); other servers would not check it, so they are not given it.
        secret = self.gateway_secret(want.model, want.environment) if ours and self.gateway_secret else None
        contract = RuntimeEnvironment.from_env(origin_env, strict=True).for_deployment(
            want.model, want.environment,
            # our runtimes listen where the manifest says; TEI/TGI take --port (in their args)
            port=runtime.port if ours else None, gateway_secret=secret, open_path=runtime.probe.path,
            batch_size=runtime.batch_size, max_batch_delay=runtime.max_batch_delay_ms,  # torch only (resolved)
        )
        env = contract.merged_with(dict(runtime.env))
        volumes = self.prepare_volumes(client, want) if self.prepare_volumes else None
        host = self.hosts.get(want.host)
        publish = {"publish_ip": host.publish_ip} if host is not None else {}
        return ContainerSpec(
            name=name, image=runtime.image, command=list(runtime.args) or None, environment=env,
            labels=labels_for(want.model, want.environment, want.index, want.spec_hash, want.revision),
            port=runtime.port, cpus=runtime.cpus, memory=runtime.memory, volumes=volumes,
            **publish,
        )

    def _url(self, host: str, info: ContainerInfo, port: int) -> str:
        published = info.ports.get(port)
        if published is None:
            return ""
        return f"http://{self.hosts[host].reach_address}:{published}"
