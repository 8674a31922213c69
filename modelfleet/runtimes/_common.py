"""Pieces shared by the runtime servers: settings from the environment, readiness, the model thread,
the load -> warm-up -> ready sequence, the health check and the size-limited request body.

Imports only the standard library, starlette and uvicorn (the servers import torch themselves).
What the daemon tells a container (model directory, names, port) is read through
``modelfleet.runtimes.contract``; the variables here are the servers' own tuning knobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import hmac
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from modelfleet.runtimes.contract import GATEWAY_SECRET_HEADER, ContractError, RuntimeEnvironment

T = TypeVar("T")

log = logging.getLogger("modelfleet.runtime")

# The servers' own settings (not set by the daemon; a manifest's runtime.env may set them).
ENV_HOST = "HOST"  # listen address; default 0.0.0.0
ENV_WARMUP = "MODELFLEET_WARMUP"  # "0" skips the warm-up call (readiness = loaded)
ENV_QUEUE_SIZE = "MODELFLEET_QUEUE_SIZE"  # requests waiting for the model before 503; default 100
ENV_STUCK_SECONDS = "MODELFLEET_STUCK_SECONDS"  # one call running longer -> not ready; default 600
ENV_LOG_LEVEL = "MODELFLEET_LOG_LEVEL"  # default info
ENV_GC_FREEZE = "MODELFLEET_GC_FREEZE"  # "0": the garbage collector keeps running while the model loads


def env_str(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value or default


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r}: not an integer") from None


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r}: not a number") from None


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    return raw not in ("0", "false", "no", "off")


def contract_from_env() -> RuntimeEnvironment:
    """What the daemon told this container (``modelfleet.runtimes.contract``); a bad value exits
    with the message naming the variable."""
    try:
        return RuntimeEnvironment.from_env(os.environ)
    except ContractError as exc:
        raise SystemExit(str(exc)) from None


def check_readable(path: Path, limit: int = 10_000) -> None:
    """Fail with a clear message when model files cannot be read by this process.

    Libraries report an unreadable file confusingly (transformers says "No such file"); the
    runtime runs as uid 65534, so files written 0600 by root (transformers' save_pretrained does
    that for weights) must be made readable (``chmod -R a+rX``) before they are mounted.
    """
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (is the model mounted?)")
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise PermissionError(f"{path} is not readable by uid {os.getuid()}: make it readable (chmod -R a+rX)")
    if not path.is_dir():
        return
    unreadable: list[str] = []
    for count, (root, dirs, files) in enumerate(os.walk(path)):
        if count > limit:
            break
        for name in dirs:
            if not os.access(os.path.join(root, name), os.R_OK | os.X_OK):
                unreadable.append(os.path.relpath(os.path.join(root, name), path) + "/")
        for name in files:
            full = os.path.join(root, name)
            if os.path.exists(full) and not os.access(full, os.R_OK):
                unreadable.append(os.path.relpath(full, path))
    if unreadable:
        shown = ", ".join(sorted(unreadable)[:5]) + (" ..." if len(unreadable) > 5 else "")
        raise PermissionError(f"model files not readable by uid {os.getuid()} in {path}: {shown} "
                              f"(make them readable: chmod -R a+rX)")


def setup_logging() -> None:
    level = env_str(ENV_LOG_LEVEL, "info").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def set_offline() -> None:
    """Never reach a hub: models come from the mounted directory only."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def cgroup_cpu_limit() -> float | None:
    """The container's CPU quota in CPUs (cgroup v2 ``cpu.max`` or v1 CFS), None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota_us > 0 and period_us > 0:
            return quota_us / period_us
    except (OSError, ValueError):
        pass
    return None


def compute_threads() -> int:
    """Threads for the math library: the CPU quota (not the host's cores: that oversubscribes)."""
    explicit = os.environ.get("OMP_NUM_THREADS", "").strip()
    if explicit.isdigit() and int(explicit) > 0:
        return int(explicit)
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit()
    if limit is not None:
        available = min(available, max(1, math.ceil(limit)))
    return max(1, available)


def configure_torch_threads() -> int:
    import torch

    threads = compute_threads()
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only settable before the first parallel region
        torch.set_num_interop_threads(1)
    return threads


def process_age() -> float | None:
    """Seconds since this process started, by the kernel's clock (so the interpreter's own start
    and the imports before any of our code ran count too); None where /proc cannot tell."""
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat[stat.rindex(")") + 2:].split()[19])  # field 22, starttime
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class StartupTimes:
    """Where a runtime's start went: named steps in order (``with times.step("import torch"):``),
    logged in one line when the model is ready, so a slow cold start shows its slow step."""

    def __init__(self) -> None:
        self.steps: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str) -> Any:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.steps[name] = self.steps.get(name, 0.0) + time.monotonic() - t0

    def summary(self) -> str:
        return ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.steps.items())


class Phase(enum.Enum):
    LOADING = "loading"
    WARMING = "warming"
    READY = "ready"
    FAILED = "failed"


@dataclass
class Readiness:
    """Whether the model answers. READY only after it loaded AND answered a warm-up call."""

    phase: Phase = Phase.LOADING
    message: str = "loading the model"
    since: float = field(default_factory=time.monotonic)
    load_seconds: float | None = None
    warmup_seconds: float | None = None
    ready_after: float | None = None  # seconds from the process's start to READY
    startup: StartupTimes = field(default_factory=StartupTimes)

    def set(self, phase: Phase, message: str) -> None:
        self.phase, self.message, self.since = phase, message, time.monotonic()

    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY


class QueueFull(Exception):
    """More requests wait for the model than the queue allows."""


class ModelThread:
    """One thread runs every model call, in order (handlers are not thread-safe; TorchServe runs
    one worker per model). The event loop only awaits, so /ping and the health endpoints answer
    while a long inference runs. Bounded: beyond ``queue_size`` waiting calls, QueueFull.
    """

    def __init__(self, queue_size: int = 100, stuck_seconds: float = 600.0) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._lock = threading.Lock()
        self._pending = 0
        self._running_since: float | None = None
        self.queue_size = queue_size
        self.stuck_seconds = stuck_seconds

    @property
    def pending(self) -> int:
        return self._pending

    def stuck(self) -> bool:
        """A call has been running longer than ``stuck_seconds`` (0 disables the check)."""
        since = self._running_since
        return self.stuck_seconds > 0 and since is not None and time.monotonic() - since > self.stuck_seconds

    def _wrap(self, fn: Callable[[], T]) -> Callable[[], T]:
        def run() -> T:
            self._running_since = time.monotonic()
            try:
                return fn()
            finally:
                self._running_since = None
                with self._lock:
                    self._pending -= 1

        return run

    async def run(self, fn: Callable[[], T], *, bypass_limit: bool = False) -> T:
        with self._lock:
            if not bypass_limit and self._pending >= self.queue_size:
                raise QueueFull(f"{self._pending} requests are waiting for the model")
            self._pending += 1
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._executor, self._wrap(fn))
        except BaseException:
            with self._lock:
                self._pending -= 1
            raise
        return await future

    def start(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """``fn`` on the model thread, not counted against ``queue_size`` (the caller bounds its own
        queue); its asyncio future, to await or to add callbacks to."""
        with self._lock:
            self._pending += 1
        try:
            return asyncio.get_running_loop().run_in_executor(self._executor, self._wrap(fn))
        except BaseException:
            with self._lock:
                self._pending -= 1
            raise

    def submit(self, fn: Callable[[], T]) -> None:
        """Run ``fn`` on the model thread without waiting (loading at startup)."""
        with self._lock:
            self._pending += 1
        self._executor.submit(self._wrap(fn))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    @classmethod
    def from_env(cls) -> ModelThread:
        return cls(env_int(ENV_QUEUE_SIZE, 100), env_float(ENV_STUCK_SECONDS, 600.0))


# --------------------------------------------------------------------------- load, warm up, ready


class WarmupRejected(Exception):
    """The warm-up call ran but its answer is not acceptable; the message (used as is) says why."""


@contextlib.contextmanager
def collector_paused(enabled: bool = True) -> Iterator[None]:
    """Python's cyclic garbage collector off for the block, then everything still alive frozen
    (``gc.freeze``: never scanned again) and the collector back on.

    Importing torch and transformers and loading a model create 10^5-10^6 objects; the collector's
    full passes over that growing heap cost a sixth of torch's import and a quarter of a MiniLM
    start (measured in the runtime image, 1 CPU). Frozen, the loaded model is not rescanned by
    every later full collection either. The price: reference cycles that became garbage while
    loading (~10^4 small objects, a few MB for MiniLM) are never freed. Nothing changes when
    ``enabled`` is false or the collector is already off (another load is running, or the
    embedding program turned it off).
    """
    if not enabled or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


async def load_then_warm(thread: ModelThread, readiness: Readiness, load: Callable[[], T],
                         warm: Callable[[T], None] | None, *, warmup_timeout: float | None = None) -> None:
    """The startup of a runtime: ``load()`` on the model thread, then one ``warm(loaded)`` call
    through the model (``warm`` None: warm-up disabled), then READY; the garbage collector paused
    meanwhile (``collector_paused``; ``MODELFLEET_GC_FREEZE=0`` keeps it running).

    Never raises: a load failure, a warm-up exception or WarmupRejected, or a warm-up running
    beyond ``warmup_timeout`` seconds leave the runtime FAILED with the reason in
    ``readiness.message`` (the health check shows it; the process stays up to say so).
    ``load`` publishes what it loaded itself (requests may reach it during the warm-up).
    """
    with collector_paused(env_bool(ENV_GC_FREEZE, True)):
        await _load_then_warm(thread, readiness, load, warm, warmup_timeout)


async def _load_then_warm(thread: ModelThread, readiness: Readiness, load: Callable[[], T],
                          warm: Callable[[T], None] | None, warmup_timeout: float | None) -> None:
    t0 = time.monotonic()
    age = process_age()
    if age is not None:
        readiness.startup.steps.setdefault("process start to loading", age)
    try:
        loaded = await thread.run(load, bypass_limit=True)
    except Exception as exc:
        log.exception("loading the model failed")
        readiness.set(Phase.FAILED, f"loading the model failed: {type(exc).__name__}: {exc}")
        return
    readiness.load_seconds = time.monotonic() - t0
    log.info("model loaded in %.2f s", readiness.load_seconds)
    if warm is None:
        readiness.set(Phase.READY, "loaded (warm-up disabled)")
        _log_ready(readiness)
        return
    readiness.set(Phase.WARMING, "warm-up call running")
    t1 = time.monotonic()
    try:
        call = thread.run(lambda: warm(loaded), bypass_limit=True)
        await (asyncio.wait_for(call, warmup_timeout) if warmup_timeout else call)
    except TimeoutError:
        readiness.set(Phase.FAILED, f"the warm-up call did not answer within {warmup_timeout:.0f} s")
        return
    except WarmupRejected as exc:
        readiness.set(Phase.FAILED, str(exc))
        return
    except Exception as exc:
        log.exception("the warm-up call failed")
        readiness.set(Phase.FAILED, f"the warm-up call failed: {type(exc).__name__}: {exc}")
        return
    readiness.warmup_seconds = time.monotonic() - t1
    readiness.startup.steps["warm-up"] = readiness.warmup_seconds
    readiness.set(Phase.READY, "model answers")
    log.info("ready: the model answers (%.2f s after loading began)", time.monotonic() - t0)
    _log_ready(readiness)


def _log_ready(readiness: Readiness) -> None:
    readiness.ready_after = process_age()
    after = f"{readiness.ready_after:.2f} s" if readiness.ready_after is not None else "unknown"
    log.info("startup: ready %s after the process started (%s)", after, readiness.startup.summary())


@dataclass(frozen=True)
class Health:
    healthy: bool
    phase: Phase
    message: str


def check_health(readiness: Readiness, thread: ModelThread) -> Health:
    """Healthy = READY and no model call stuck beyond ``thread.stuck_seconds``."""
    if readiness.ready and not thread.stuck():
        return Health(True, readiness.phase, readiness.message)
    message = readiness.message
    if readiness.ready:
        message = f"a model call has been running for more than {thread.stuck_seconds:.0f} s"
    return Health(False, readiness.phase, message)


# --------------------------------------------------------------------------- request bodies


class BodyTooLarge(Exception):
    """The request body is larger than the server accepts."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request larger than {limit} bytes")
        self.limit = limit


def reject_declared_oversize(request: Request, limit: int) -> None:
    """BodyTooLarge when the Content-Length says more than ``limit`` (nothing read yet)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, at most ``limit`` bytes: BodyTooLarge as soon as it is exceeded, before
    reading on (a chunked body declares no length)."""
    reject_declared_oversize(request, limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def json_response(payload: Any, status: int = 200, indent: int | None = None,
                  headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(payload, indent=indent, ensure_ascii=False, allow_nan=False, default=_json_default)
    return Response(body.encode("utf-8"), status_code=status, media_type="application/json", headers=headers)


def _json_default(value: Any) -> Any:
    # numpy scalars/arrays and torch tensors that a handler left in its output.
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# Answered without the gateway's secret: the readiness probe (MODELFLEET_OPEN_PATH) and these.
HEALTH_PATHS = frozenset({"/ping", "/health", "/healthz", "/readyz", "/livez"})
_SECRET_HEADER = GATEWAY_SECRET_HEADER.encode()


class GatewaySecretGuard:
    """Refuses (401) every request without the deployment's secret in X-Modelfleet-Gateway-Secret,
    except the health paths: with it, a replica's port answers only through the gateway, which adds
    the header, whoever else can reach the host."""

    def __init__(self, app: Any, secret: str, open_paths: frozenset[str]) -> None:
        self.app = app
        self._secret = secret.encode()
        self._open = open_paths

    @classmethod
    def around(cls, app: Any, environment: RuntimeEnvironment) -> Any:
        """``app`` guarded when the daemon gave a secret (MODELFLEET_GATEWAY_SECRET), else as is."""
        if not environment.gateway_secret:
            return app
        open_paths = HEALTH_PATHS | ({environment.open_path} if environment.open_path else set())
        return cls(app, environment.gateway_secret, frozenset(open_paths))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in self._open:
            given = next((value for name, value in scope["headers"] if name == _SECRET_HEADER), b"")
            if not hmac.compare_digest(given, self._secret):
                body = json.dumps({"error": "Unauthorized", "message": "this replica answers only through the "
                                   "modelfleet gateway"}).encode()
                await send({"type": "http.response.start", "status": 401, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def run_server(app: Any, name: str, port: int) -> None:
    """Serve ``app`` with uvicorn on HOST:``port``: one process, one event loop; guarded by the
    gateway's secret when the daemon set one."""
    import uvicorn

    app = GatewaySecretGuard.around(app, contract_from_env())

    host = env_str(ENV_HOST, "0.0.0.0")
    log.info("%s listening on %s:%d", name, host, port)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        workers=1,
        log_config=None,  # keep our logging setup
        access_log=env_bool("MODELFLEET_ACCESS_LOG", False),
        timeout_graceful_shutdown=10,
        timeout_keep_alive=30,
    )
    uvicorn.Server(config).run()
