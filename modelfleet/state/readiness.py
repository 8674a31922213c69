"""Readiness of the replicas that run (pure): what to probe, and what the answers mean.

Every pass probes each active replica running on a reachable host, the ready ones too (the
readiness monitor; the daemon also re-probes them between passes, every ``readinessProbe.period``),
at the URL its published port gives *now*. The answers decide:

* a replica that answers is ready: in the routes (again), its count of failed probes reset;
* a ready replica that does not answer counts one more failed probe; after
  ``readinessProbe.failureThreshold`` failures in a row it is not ready (out of the routes) until
  it answers again;
* a ready replica whose published port changed (its container was restarted, e.g. by a dockerd
  restart, and Docker gave it another port) is probed at the new port and written with it; a route
  to the old port is never kept.

The consecutive failures are a fact the store keeps between passes and between the monitor's
probes: (host, container id) -> count, only for replicas that are ready and failing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from modelfleet.state.actual import ObservedReplica
from modelfleet.state.desired import DesiredReplica
from modelfleet.state.inventory import InventoryRow, ReadyUpdate
from modelfleet.state.pool import Host
from modelfleet.state.runtimes import ResolvedProbe, ResolvedRuntime

DEFAULT_PROBE = ResolvedProbe(path="/", port=0)  # period, timeout and failureThreshold as the manifest's defaults
WantedKey = tuple[str, str, str, int, str]  # host, model, environment, index, spec hash


def failure_key(host: str, container_id: str) -> str:
    """How a replica's count of failed probes is keyed in the store (a container, not a name:
    a container created again under the same name starts from zero)."""
    return f"{host}/{container_id}"


@dataclass(frozen=True)
class ReadinessCheck:
    """A replica that runs on a reachable host: the shell probes ``probe_url`` and plans (or
    judges) again with the answer."""

    host: str
    name: str
    container_id: str
    url: str
    probe_url: str
    fill_urls: bool  # the row has other URLs (none, or a port that changed): an answer writes these
    ready: bool = False  # routed now (at the row's URL)
    failures: int = 0  # failed probes in a row so far, while ready
    failure_threshold: int = DEFAULT_PROBE.failure_threshold
    period: float = DEFAULT_PROBE.period
    timeout: float = DEFAULT_PROBE.timeout
    model: str = ""
    environment: str = ""
    replica: int = 0

    @property
    def key(self) -> str:
        return failure_key(self.host, self.container_id)

    @property
    def label(self) -> str:
        return f"replica {self.replica} on {self.host}"


@dataclass(frozen=True)
class ReadinessVerdict:
    """What the answers to some checks mean; the changes are data the shell writes."""

    ready: tuple[ReadyUpdate, ...] = ()  # answered: ready (again), with the URLs it answered at
    unready: tuple[tuple[str, str], ...] = ()  # (host, name) out of the routes
    failures: dict[str, int] = field(default_factory=dict)  # of the checked: ready, failing, still routed
    unanswered: tuple[ReadinessCheck, ...] = ()  # not ready after this answer
    why: dict[str, str] = field(default_factory=dict)  # failure_key -> why it is not ready / left the routes

    @property
    def changed(self) -> bool:
        """Whether the route table changes."""
        return bool(self.ready or self.unready)


def readiness_checks(rows: Iterable[InventoryRow], observed: Iterable[ObservedReplica],
                     ports: Mapping[tuple[str, str], Mapping[int, int]], hosts: Iterable[Host],
                     wanted: Mapping[WantedKey, DesiredReplica],
                     runtimes: Mapping[tuple[str, str], ResolvedRuntime],
                     unreachable: Iterable[str], failures: Mapping[str, int]) -> list[ReadinessCheck]:
    """A check per active replica that runs on a reachable host (the caller leaves out the rows
    that must not be routed, e.g. a failed version left in place). ``wanted``: the desired replicas
    (their runtime says which container port serves and which is probed); ``runtimes``: each
    deployment's desired runtime, for the probe settings of a replica of another spec."""
    seen = {(r.host, r.name): r for r in observed}
    by_name = {h.name: h for h in hosts}
    blind = frozenset(unreachable)
    checks = []
    for row in rows:
        if row.phase != "active" or row.host in blind or not row.container_id:
            continue
        replica = seen.get((row.host, row.name))
        if replica is None or not replica.running or replica.container_id != row.container_id:
            continue  # a standby or a crashed replica: nothing to probe
        want = wanted.get((row.host, row.model, row.environment, row.replica, row.spec_hash))
        runtime = want.runtime if want is not None else runtimes.get((row.model, row.environment))
        probe = runtime.probe if runtime is not None else DEFAULT_PROBE
        url, probe_url = row.url or "", row.probe_url or ""
        now = _urls_now(want, ports.get((row.host, row.container_id)), by_name.get(row.host))
        fill = now is not None and now != (url, probe_url)
        if now is not None:
            url, probe_url = now
        if not url or not probe_url:
            continue  # nowhere to probe (ports not published): not routable either
        checks.append(ReadinessCheck(
            row.host, row.name, row.container_id, url, probe_url, fill, ready=row.ready,
            failures=failures.get(failure_key(row.host, row.container_id), 0) if row.ready else 0,
            failure_threshold=probe.failure_threshold, period=probe.period, timeout=probe.timeout,
            model=row.model, environment=row.environment, replica=row.replica))
    return checks


def _urls_now(want: DesiredReplica | None, ports: Mapping[int, int] | None,
              host: Host | None) -> tuple[str, str] | None:
    """The replica's URLs from the ports it publishes now; None when they cannot be told."""
    if want is None or ports is None or host is None:
        return None
    port, probe = ports.get(want.runtime.port), ports.get(want.runtime.probe.port)
    if port is None or probe is None:
        return None
    return f"http://{host.reach_address}:{port}", f"http://{host.reach_address}:{probe}{want.runtime.probe.path}"


def judge(checks: Sequence[ReadinessCheck], results: Mapping[tuple[str, str], bool]) -> ReadinessVerdict:
    """The meaning of the answers (``results``: (host, name) -> answered; missing = not answered)."""
    ready: list[ReadyUpdate] = []
    unready: list[tuple[str, str]] = []
    failures: dict[str, int] = {}
    unanswered: list[ReadinessCheck] = []
    why: dict[str, str] = {}
    for check in checks:
        if results.get((check.host, check.name), False):
            if not check.ready or check.fill_urls:
                ready.append(ReadyUpdate(check.host, check.name, check.container_id, check.url, check.probe_url,
                                         check.fill_urls))
            continue
        if check.ready and check.fill_urls:
            # Restarted on another port: the route to the old one goes now, whatever the threshold.
            unready.append((check.host, check.name))
            why[check.key] = (f"{check.label} was restarted on another port ({check.url}) and does not answer "
                              "its readiness probe there yet")
        elif check.ready:
            count = check.failures + 1
            if count < check.failure_threshold:
                failures[check.key] = count
                continue  # still routed: the gateway's retries cover it meanwhile
            unready.append((check.host, check.name))
            why[check.key] = (f"{check.label} failed {count} readiness probes in a row (failureThreshold "
                              f"{check.failure_threshold}): out of the routes until it answers again")
        else:
            why[check.key] = f"{check.label} does not answer its readiness probe ({check.probe_url})"
        unanswered.append(replace(check, ready=False, failures=0))
    return ReadinessVerdict(tuple(ready), tuple(unready), failures, tuple(unanswered), why)


def failures_after(previous: Mapping[str, int], checked: Iterable[ReadinessCheck], verdict: ReadinessVerdict,
                   live: Iterable[InventoryRow]) -> dict[str, int]:
    """The failure counts to remember: the verdict's for the checked replicas, the previous ones
    for replicas not checked this time that still exist (e.g. on a host unreachable for now)."""
    checked_keys = {c.key for c in checked}
    exists = {failure_key(r.host, r.container_id) for r in live if r.container_id}
    kept = {k: n for k, n in previous.items() if k in exists and k not in checked_keys}
    return {**kept, **verdict.failures}


def refreshed(checks: Iterable[ReadinessCheck], rows: Iterable[InventoryRow],
              failures: Mapping[str, int]) -> list[ReadinessCheck]:
    """The checks of the last plan in line with the store now (for the monitor between passes):
    gone or replaced containers are dropped, ready flags and failure counts are the current ones."""
    by_name = {(r.host, r.name): r for r in rows}
    result = []
    for check in checks:
        row = by_name.get((check.host, check.name))
        if row is None or row.phase != "active" or row.container_id != check.container_id:
            continue
        result.append(replace(check, ready=row.ready,
                              fill_urls=(row.url or "", row.probe_url or "") != (check.url, check.probe_url),
                              failures=failures.get(check.key, 0) if row.ready else 0))
    return result


def with_verdict(rows: Sequence[InventoryRow], verdict: ReadinessVerdict) -> list[InventoryRow]:
    """The rows once the verdict's changes are written."""
    ready = {(u.host, u.name): u for u in verdict.ready}
    unready = set(verdict.unready)
    result = []
    for row in rows:
        update = ready.get((row.host, row.name))
        if update is not None:
            row = replace(row, ready=True, url=update.url if update.fill_urls else row.url,
                          probe_url=update.probe_url if update.fill_urls else row.probe_url)
        elif (row.host, row.name) in unready:
            row = replace(row, ready=False)
        result.append(row)
    return result
