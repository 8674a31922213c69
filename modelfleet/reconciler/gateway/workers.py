"""Gateway worker processes (``gateway.workers``): N processes serving one port with SO_REUSEPORT.

`modelfleet gateway` with more than one worker is a small supervisor: it starts ``workers``
processes (``modelfleet gateway --config CFG --worker K``), each a whole gateway that binds
``gateway.listen`` with SO_REUSEPORT (the kernel spreads connections over them), follows the route
table, holds its own activation queue and sends its own demand reports and execution records, as
``<gateway id>-w<K>``: the daemon sums gateways, so the figures add up. Their metrics go to one
directory (prometheus_client's multiprocess mode, ``<stateDir>/gateway-metrics``, emptied at start),
and ``/metrics`` of any worker shows the sums over all of them.

A worker that dies is started again (after 1 s, doubling to 30 s while it keeps dying); one that
fails at start (the port in use, a bad token file) fails the whole gateway. SIGTERM/SIGINT go to
every worker, which drain as a single gateway does; workers get SIGTERM if the supervisor dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("modelfleet.gateway")

WORKER_ENV = "MODELFLEET_GATEWAY_WORKER"
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
METRICS_DIR = "gateway-metrics"
START_GRACE = 5.0  # a worker that exits within this long after its start failed to start
MAX_RESTART_DELAY = 30.0
PR_SET_PDEATHSIG = 1


def worker_index() -> int | None:
    """This process's worker index, when it is one of several workers."""
    value = os.environ.get(WORKER_ENV)
    return int(value) if value and value.isdigit() else None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class WorkerSupervisor:
    def __init__(self, config_path: str, state_dir: str | Path, workers: int, verbose: bool = False) -> None:
        self.config_path = config_path
        self.workers = workers
        self.verbose = verbose
        self.metrics_dir = Path(state_dir) / METRICS_DIR
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self.started_at: dict[int, float] = {}
        self.restarts: dict[int, int] = {}
        self._stop = threading.Event()

    def _start(self, index: int) -> None:
        env = {**os.environ, WORKER_ENV: str(index), METRICS_ENV: str(self.metrics_dir)}
        command = [sys.executable, "-m", "modelfleet.reconciler.cli", "gateway", "--config", self.config_path]
        if self.verbose:
            command.append("-v")
        self.processes[index] = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                                                 preexec_fn=_die_with_parent)
        self.started_at[index] = time.monotonic()

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit code (3: a worker could not start)."""
        shutil.rmtree(self.metrics_dir, ignore_errors=True)  # figures of an earlier run are not ours
        self.metrics_dir.mkdir(parents=True, exist_ok=True)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for index in range(self.workers):
                self._start(index)
            log.info("gateway: %d workers (pids %s)", self.workers,
                     ", ".join(str(p.pid) for p in self.processes.values()))
            return self._supervise()
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._stop.set()

    def _supervise(self) -> int:
        due: dict[int, float] = {}  # worker -> when to start it again
        while not self._stop.wait(0.2):
            now = time.monotonic()
            for index, process in list(self.processes.items()):
                code = process.poll()
                if code is None or index in due:
                    continue
                if now - self.started_at[index] < START_GRACE and code == 3:
                    log.error("gateway worker %d could not start (exit %d): see its message above", index, code)
                    return 3
                self.restarts[index] = self.restarts.get(index, 0) + 1
                delay = min(2 ** (self.restarts[index] - 1), MAX_RESTART_DELAY)
                if now - self.started_at[index] > 60:
                    self.restarts[index], delay = 1, 1.0  # it ran a while: not a crash loop
                log.warning("gateway worker %d (pid %d) exited with %s; starting it again in %gs", index, process.pid,
                            code, delay)
                due[index] = now + delay
            for index, when in list(due.items()):
                if now >= when:
                    del due[index]
                    self._start(index)
        return 0

    def _stop_all(self, timeout: float = 35.0) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.processes.values():
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
