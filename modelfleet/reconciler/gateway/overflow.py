"""Overflow from an on-prem model: a deployment's requests go to an endpoint outside the pool first.

A deployment with overflow settings in the route table (:class:`~modelfleet.reconciler.gateway.routes.Overflow`)
sends each request to its endpoint (the model on the user's own infrastructure) unless one of these
sends it to the pool (the deployment's own replicas; at zero, the activator holds it while one starts):

- ``unhealthy``: the active health check (a GET of ``health_path`` every ``health_period`` from this
  gateway) failed ``failure_threshold`` times in a row, and no check has succeeded since;
- ``ejected``: passive outlier detection (Envoy's): ``consecutive_failures`` requests in a row could
  not connect or got a 5xx from the endpoint; it gets no traffic for ``ejection_time`` seconds;
- ``token``: the endpoint's token file cannot be read on this machine;
- ``percentage``: a steady share, by a counter (of every 100 requests the endpoint could take,
  exactly ``percentage`` go to the pool, evenly spread), not at random;
- ``maxConcurrency``: ``max_concurrency`` requests are in flight at the endpoint from this gateway already;
- ``failover``: the endpoint failed before sending any response byte (refused, reset); the request,
  whose body was buffered for that, is sent again to the pool.

Only requests sent to the pool count as the deployment's load (the load meter, hence the autoscaler):
the endpoint's traffic is not the pool's business. The proxy drives it (:meth:`OverflowRouter.state`,
:meth:`EndpointState.choose`, ...); the app calls :meth:`OverflowRouter.sync` with every new route
table, :meth:`OverflowRouter.describe` for ``/routes`` and :meth:`OverflowRouter.close` at shutdown.
Everything runs on the event loop. Tokens are read from the gateway's machine, sent only to their
endpoint, never logged nor shown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any
from urllib.parse import urlsplit

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge

from modelfleet.reconciler.gateway.load import LoadMeter
from modelfleet.reconciler.gateway.routes import Overflow
from modelfleet.state.demand import DeploymentLoad, OverflowLoad

log = logging.getLogger("modelfleet.gateway")

ENDPOINT = "endpoint"
POOL = "pool"
# Why a request went to the pool (the `reason` label; None: it went to the endpoint).
UNHEALTHY = "unhealthy"
EJECTED = "ejected"
TOKEN = "token"
PERCENTAGE = "percentage"
MAX_CONCURRENCY = "maxConcurrency"
FAILOVER = "failover"
REASONS = (UNHEALTHY, EJECTED, TOKEN, PERCENTAGE, MAX_CONCURRENCY, FAILOVER)


class OverflowMetrics:
    """``modelfleet_gateway_overflow_requests_total{model,environment,target,reason}`` and
    ``modelfleet_gateway_overflow_endpoint_healthy{model,environment}`` (1: it gets traffic)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "modelfleet_gateway_overflow_requests",
            "Requests of deployments with an overflow endpoint, by where they went (endpoint, pool) and why",
            ["model", "environment", "target", "reason"], registry=registry)
        self.healthy = Gauge(
            "modelfleet_gateway_overflow_endpoint_healthy",
            "1 while the deployment's overflow endpoint gets traffic (healthy, not ejected), else 0",
            ["model", "environment"], registry=registry, multiprocess_mode="livemin")


class EndpointState:
    """One deployment's endpoint as this gateway sees it: health, requests in flight, counts."""

    def __init__(self, key: str, settings: Overflow, metrics: OverflowMetrics | None) -> None:
        self.key = key
        model, _, environment = key.partition("/")
        self.model, self.environment = model, environment
        self.settings = settings
        parts = urlsplit(settings.endpoint)
        self.url = f"{parts.scheme}://{parts.netloc}"  # what the upstream pool connects to
        self.prefix = parts.path.rstrip("/").encode()  # prepended to the request's sub-path
        self.health_url = settings.endpoint.rstrip("/") + settings.health_path
        self.in_flight = 0
        self.healthy = True  # the active check's verdict (assumed healthy until it says otherwise)
        self.check_failures = 0  # failed active checks in a row
        self.last_check_error: str | None = None
        self.checks = 0
        self.consecutive_failures = 0  # failed requests in a row (passive)
        self.ejected_until: float | None = None  # loop time
        self.ejections = 0
        self.seen = 0  # requests the endpoint could have taken (the percentage's counter)
        self.to_endpoint = 0
        self.to_pool = 0
        self.reasons: dict[str, int] = {}
        self.reported = (0, 0)  # (to_endpoint, to_pool) when the demand report's interval started
        self.token: str | None = None
        self.token_error: str | None = None
        self._token_stat: tuple[int, int] | None = None
        self.task: asyncio.Task[None] | None = None
        self._metrics = metrics
        self._gauge = metrics.healthy.labels(model, environment) if metrics is not None else None
        self._counters: dict[tuple[str, str], Counter] = {}
        self.read_token()
        self._set_gauge()

    # -- routing ---------------------------------------------------------------------------------

    def available(self, now: float) -> bool:
        """The endpoint gets traffic now (healthy, not ejected, its token readable)."""
        return self.healthy and not self._ejected(now) and self.token_error is None

    def _ejected(self, now: float) -> bool:
        until = self.ejected_until
        if until is None:
            return False
        if now >= until:
            self.ejected_until = None
            log.info("overflow endpoint of %s is back from ejection", self.key)
            self._set_gauge(now)
            return False
        return True

    def choose(self, now: float) -> str | None:
        """None: send this request to the endpoint; else why it goes to the pool."""
        if not self.healthy:
            return UNHEALTHY
        if self._ejected(now):
            return EJECTED
        if self.token_error is not None:
            return TOKEN
        settings = self.settings
        percentage = settings.percentage
        if percentage:
            seen = self.seen = self.seen + 1
            # Exactly floor(seen * p / 100) of the first `seen` requests went to the pool.
            if int(seen * percentage / 100) > int((seen - 1) * percentage / 100):
                return PERCENTAGE
        limit = settings.max_concurrency
        if limit is not None and self.in_flight >= limit:
            return MAX_CONCURRENCY
        return None

    def sent_to_pool(self, reason: str) -> None:
        self.to_pool += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self._count(POOL, reason)

    def answered(self, status: int, now: float) -> None:
        """The endpoint answered a request (its status line arrived)."""
        self.to_endpoint += 1
        self._count(ENDPOINT, "")
        if status >= 500:
            self.failed(now, f"answered {status}")
        else:
            self.consecutive_failures = 0

    def failed(self, now: float, why: str) -> None:
        """A request failed at the endpoint (could not connect, reset, 5xx): passive outlier detection."""
        self.consecutive_failures += 1
        if self.consecutive_failures >= self.settings.consecutive_failures and self.ejected_until is None:
            self.ejected_until = now + self.settings.ejection_time
            self.ejections += 1
            self.consecutive_failures = 0
            log.warning("overflow endpoint of %s ejected for %gs after %d failed requests in a row (last: %s)",
                        self.key, self.settings.ejection_time, self.settings.consecutive_failures, why)
            self._set_gauge(now)

    def _count(self, target: str, reason: str) -> None:
        if self._metrics is None:
            return
        counter = self._counters.get((target, reason))
        if counter is None:
            counter = self._counters[(target, reason)] = self._metrics.requests.labels(
                self.model, self.environment, target, reason)
        counter.inc()

    def headers(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The request's headers for the endpoint: its own bearer token instead of the client's, if any."""
        if self.token is None:
            return headers
        kept = [(n, v) for n, v in headers if n.lower() != b"authorization"]
        kept.append((b"authorization", b"Bearer " + self.token.encode()))
        return kept

    # -- the token -------------------------------------------------------------------------------

    def read_token(self) -> None:
        """(Re-)read the token file when it changed; an unreadable one keeps traffic off the endpoint."""
        path = self.settings.token_file
        if path is None:
            return
        try:
            stat = os.stat(path)
            key = (stat.st_mtime_ns, stat.st_size)
            if key == self._token_stat and self.token is not None:
                return
            with open(path, encoding="utf-8") as handle:
                token = handle.read().strip()
            if not token:
                raise ValueError("the file is empty")
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            error = f"cannot read the token file {path}: {getattr(exc, 'strerror', None) or exc}"
            if error != self.token_error:
                log.error("overflow endpoint of %s gets no traffic: %s", self.key, error)
            self.token, self.token_error, self._token_stat = None, error, None
            self._set_gauge()
            return
        if self.token_error is not None:
            log.info("overflow endpoint of %s: token file %s readable again", self.key, path)
        self.token, self.token_error, self._token_stat = token, None, key
        self._set_gauge()

    # -- the active health check -----------------------------------------------------------------

    def checked(self, error: str | None, now: float) -> None:
        """One active check's result (None: healthy)."""
        self.checks += 1
        self.last_check_error = error
        if error is None:
            self.check_failures = 0
            if not self.healthy:
                log.info("overflow endpoint of %s is healthy again: traffic goes back to it", self.key)
            self.healthy = True
        else:
            self.check_failures += 1
            if self.healthy and self.check_failures >= self.settings.failure_threshold:
                self.healthy = False
                log.warning("overflow endpoint of %s is unhealthy (%d failed checks: %s): all its traffic "
                            "goes to the pool", self.key, self.check_failures, error)
        self._set_gauge(now)

    async def run_checks(self, client: httpx.AsyncClient) -> None:
        settings = self.settings
        loop = asyncio.get_running_loop()
        while True:
            self.read_token()
            headers = {"authorization": f"Bearer {self.token}"} if self.token is not None else {}
            error: str | None
            try:
                response = await client.get(self.health_url, headers=headers, timeout=settings.health_timeout)
                error = None if response.status_code < 500 else f"{settings.health_path} answered " \
                                                                  f"{response.status_code}"
            except httpx.TimeoutException:
                error = f"{settings.health_path} did not answer within {settings.health_timeout:g}s"
            except httpx.HTTPError as exc:
                error = f"{settings.health_path}: {type(exc).__name__}: {exc}"
            except Exception as exc:  # an odd URL, a bug: the checks go on, the endpoint counts as failing
                error = f"{settings.health_path}: {type(exc).__name__}: {exc}"
            self.checked(error, loop.time())
            await asyncio.sleep(settings.health_period)

    def _set_gauge(self, now: float | None = None) -> None:
        if self._gauge is None:
            return
        ejected = self.ejected_until is not None and (now is None or now < self.ejected_until)
        self._gauge.set(1 if self.healthy and not ejected and self.token_error is None else 0)

    # -- what is shown ---------------------------------------------------------------------------

    def describe(self, now: float) -> dict[str, Any]:
        available = self.available(now)
        if available:
            routing = "endpoint"
        elif not self.healthy:
            routing = f"pool: the endpoint is unhealthy ({self.last_check_error})"
        elif self.token_error is not None:
            routing = f"pool: {self.token_error}"
        else:
            routing = f"pool: the endpoint is ejected for {max(0.0, (self.ejected_until or now) - now):.1f}s more"
        s = self.settings
        return {
            "endpoint": s.endpoint, "tokenFile": s.token_file, "maxConcurrency": s.max_concurrency,
            "percentage": s.percentage, "healthy": self.healthy, "ejected": self.ejected_until is not None,
            "available": available, "routing": routing, "inFlight": self.in_flight,
            "toEndpoint": self.to_endpoint, "toPool": self.to_pool, "toPoolBy": dict(sorted(self.reasons.items())),
            "healthCheck": {"url": self.health_url, "period": s.health_period, "timeout": s.health_timeout,
                            "failureThreshold": s.failure_threshold, "checks": self.checks,
                            "failuresInARow": self.check_failures, "lastError": self.last_check_error},
            "outlierDetection": {"consecutiveFailures": s.consecutive_failures, "ejectionTime": s.ejection_time,
                                 "failuresInARow": self.consecutive_failures, "ejections": self.ejections},
        }

    def load(self, now: float, *, reset: bool) -> OverflowLoad:
        """For the demand report: whether the endpoint takes traffic, and the counts of the interval
        (since the last report with ``reset``, which starts a new one)."""
        endpoint, pool = self.reported
        load = OverflowLoad(endpoint_healthy=self.available(now), to_endpoint=max(0, self.to_endpoint - endpoint),
                            to_pool=max(0, self.to_pool - pool))
        if reset:
            self.reported = (self.to_endpoint, self.to_pool)
        return load


class OverflowRouter:
    """The endpoint state of every deployment with overflow settings, keyed by route key."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.metrics = OverflowMetrics(registry) if registry is not None else None
        self.states: dict[str, EndpointState] = {}
        self._client: httpx.AsyncClient | None = None
        self._closed = False

    def state(self, key: str, settings: Overflow) -> EndpointState:
        """``key``'s state under ``settings`` (the route table's): created, or renewed when they changed."""
        state = self.states.get(key)
        if state is None or state.settings != settings:
            state = self._replace(key, settings, state)
        if state.task is None:
            self._start(state)
        return state

    def sync(self, overflow: dict[str, Overflow]) -> None:
        """Follow a new route table: forget removed deployments, (re)start the checks of the others."""
        for key in [k for k in self.states if k not in overflow]:
            self._stop(self.states.pop(key))
        for key, settings in overflow.items():
            state = self.states.get(key)
            if state is None or state.settings != settings:
                state = self._replace(key, settings, state)
            if state.task is None:
                self._start(state)

    def _replace(self, key: str, settings: Overflow, old: EndpointState | None) -> EndpointState:
        state = EndpointState(key, settings, self.metrics)
        if old is not None:
            self._stop(old)
            state.reported = old.reported
            # Counts carry over; health is judged afresh under the new settings (requests in flight at
            # the old one release the old state).
            state.to_endpoint, state.to_pool, state.reasons = old.to_endpoint, old.to_pool, old.reasons
        self.states[key] = state
        return state

    def _start(self, state: EndpointState) -> None:
        if self._closed:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # not on the loop yet: started by the first request (or the next table)
        if self._client is None:
            self._client = httpx.AsyncClient(trust_env=False, follow_redirects=False)
        state.task = asyncio.ensure_future(state.run_checks(self._client))

    @staticmethod
    def _stop(state: EndpointState) -> None:
        if state.task is not None:
            state.task.cancel()
            state.task = None

    def describe(self, now: float) -> dict[str, Any]:
        return {key: state.describe(now) for key, state in sorted(self.states.items())}

    def add_to(self, deployments: dict[str, DeploymentLoad], now: float, meter: LoadMeter, *,
               reset: bool) -> dict[str, DeploymentLoad]:
        """The demand report's deployments with where each overflow deployment's requests went.

        One whose pool saw no request lately (not in ``deployments``) is reported too, at zero load
        and with the time since the pool's last request (``meter``): what the autoscaler reads from
        it is what it would conclude from its absence.
        """
        result = dict(deployments)
        clock = meter.clock()
        for key, state in self.states.items():
            overflow = state.load(now, reset=reset)
            current = result.get(key)
            if current is None:
                pool = meter.keys.get(key)
                last = pool.last_arrival if pool is not None else None
                idle = None if last is None else round(max(0.0, clock - last), 4)
                result[key] = DeploymentLoad(idle_seconds=idle, overflow=overflow)
            else:
                result[key] = current.model_copy(update={"overflow": overflow})
        return result

    async def aclose(self) -> None:
        self._closed = True
        tasks = [s.task for s in self.states.values() if s.task is not None]
        for state in self.states.values():
            self._stop(state)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._client is not None:
            await self._client.aclose()
            self._client = None
