"""`modelfleet run`: the long-running daemon process.

Threads: the reconcile loop (main thread), the HTTP API (uvicorn), the poll scheduler
(APScheduler), the ref watcher (watchfiles), the readiness monitor, and a supervisor for the child
gateway process.
SIGTERM/SIGINT stop it cleanly: the current action finishes or is safely abandoned (the store is
write-ahead), and the loop exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from apscheduler.schedulers.background import BackgroundScheduler

from modelfleet.reconciler.api.app import make_api
from modelfleet.reconciler.config import Config, local_url, parse_listen
from modelfleet.reconciler.daemon.reconcile import Daemon
from modelfleet.reconciler.daemon.sdnotify import notify, watchdog_interval
from modelfleet.reconciler.daemon.triggers import watch_refs
from modelfleet.reconciler.secrets import read_secret
from modelfleet.reconciler.statedir import StoreError
from modelfleet.reconciler.status import StatusWriter
from modelfleet.reconciler.status.outbox import StatusOutbox, queued
from modelfleet.state.demand import REPORT_INTERVAL

log = logging.getLogger("modelfleet.service")
MAX_BACKOFF = 60.0


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _close_status_writer(daemon: Daemon) -> None:
    """Write the statuses still queued (for a few seconds at most), then stop the outbox."""
    if isinstance(daemon.status_writer, StatusOutbox):
        daemon.status_writer.close(timeout=5.0)


def make_status_writer(config: Config, daemon: Daemon) -> StatusWriter | None:
    """The writer of ``status.provider`` (see status/registry.py); None for ``none``."""
    from modelfleet.reconciler.status.registry import make_writer

    return make_writer(config.status, repo_path=str(daemon.source.path), repo_url=config.repo.url)


def use_pull_requests(config: Config, daemon: Daemon) -> None:
    """With a forge ``status.provider``: the review planner plans its open pull requests."""
    from modelfleet.reconciler.status.pulls import pulls_from_settings

    try:
        pulls = pulls_from_settings(config.status, config.repo.url)
    except ValueError as exc:  # (the status writer was built from the same settings)
        log.error("pull requests are not planned: %s", exc)
        return
    if pulls is not None:
        daemon.reviews.use_forge(pulls)
        log.info("planning the open pull requests against %s on %s (%s)", config.repo.branch, pulls.forge,
                 pulls.target)


class GatewaySupervisor:
    """Keeps one gateway process running for the embedded setup; adopts one that survived us.

    The gateway is started in a session of its own, writing to stateDir/gateway.log (no pipe to
    us): a daemon killed by any signal leaves it serving the last route table. The next daemon
    adopts it by its pidfile (the pid is alive and is a modelfleet gateway) rather than start a
    second one; it starts one only when none is ours and nothing answers on gateway.listen."""

    def __init__(self, config_path: str, config: Config, stop: threading.Event) -> None:
        self.config_path = config_path
        self.config = config
        self.stop = stop
        self.pidfile = Path(config.state_dir) / "gateway.pid"
        self.process: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None  # the gateway we supervise: started by us or adopted
        self.health_url = local_url(config.gateway.listen) + "/healthz"
        self._foreign_logged = False

    def _alive(self) -> bool:
        try:
            return httpx.get(self.health_url, timeout=0.5, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    @staticmethod
    def _is_gateway(pid: int) -> bool:
        """The process lives and is a `modelfleet gateway` (not a pid reused by something else)."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            return False  # gone
        except OSError:  # no /proc here: the best we can tell is that it lives
            try:
                os.kill(pid, 0)
            except (ProcessLookupError, PermissionError):
                return False
            return True
        args = cmdline.split(b"\0")
        return b"gateway" in args and any(b"modelfleet" in a for a in args)

    def _running(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return self.pid is not None and self._is_gateway(self.pid)

    def _pid_from_file(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def _adopt(self) -> bool:
        pid = self._pid_from_file()
        if pid is None or pid == self.pid or not self._is_gateway(pid):
            return False
        self.process, self.pid = None, pid
        log.info("adopted the running gateway (pid %d) on %s", pid, self.config.gateway.listen)
        return True

    def _spawn(self) -> None:
        log_path = Path(self.config.state_dir) / "gateway.log"
        with open(log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "modelfleet.reconciler.cli", "gateway", "--config", self.config_path],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # a SIGKILL or Ctrl-C of the daemon must not take traffic down
            )
        self.pid = self.process.pid
        self.pidfile.write_text(str(self.process.pid))
        log.info("gateway started (pid %d) on %s", self.process.pid, self.config.gateway.listen)

    def check(self) -> None:
        """One round of supervision: ours runs, or adopt the one of the pidfile, or start one."""
        if self._running() or self._adopt():
            return
        if self._alive():
            # Something answers there that is not ours (no pidfile): starting one would only fail to bind.
            if not self._foreign_logged:
                log.warning("a gateway answers on %s but is not in %s: not starting another one",
                            self.config.gateway.listen, self.pidfile)
                self._foreign_logged = True
            return
        if self.pid is not None:
            code = self.process.returncode if self.process is not None else "?"
            log.warning("gateway (pid %d) exited with %s; restarting", self.pid, code)
        self._spawn()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.check()
            except OSError as exc:  # e.g. stateDir not writable: keep trying, never kill the daemon
                log.error("cannot start the gateway: %s", exc)
            self.stop.wait(2.0)

    def start(self) -> threading.Thread:
        # The first round at once, in the caller's thread: no second gateway races an adopted one.
        with contextlib.suppress(OSError):
            self.check()
        thread = threading.Thread(target=self.run, name="modelfleet-gateway-supervisor", daemon=True)
        thread.start()
        return thread

    def terminate(self) -> None:
        pid = self.pid if self._running() else None
        if pid is None:
            candidate = self._pid_from_file()
            pid = candidate if candidate is not None and self._is_gateway(candidate) else None
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
            if self.process is not None and self.process.pid == pid:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=10)
            else:  # adopted: not our child, wait for it to go
                deadline = time.monotonic() + 10
                while self._is_gateway(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
        with contextlib.suppress(FileNotFoundError):
            self.pidfile.unlink()


def run_daemon(config: Config, config_path: str, *, once: bool = False) -> int:
    try:
        daemon = Daemon(config)
    except StoreError as exc:  # e.g. a full stateDir: a clear message, not a traceback
        log.error("cannot start: %s", exc)
        return 3
    # Forge statuses go through the outbox: written in the background, retried with backoff.
    daemon.status_writer = queued(make_status_writer(config, daemon), registry=daemon.metrics.registry)
    if isinstance(daemon.status_writer, StatusOutbox):
        daemon.status.status_outbox = daemon.status_writer
    # Pull requests on the forge: planned like review branches, one comment each.
    if config.review.pull_requests and daemon.status_writer is not None:
        use_pull_requests(config, daemon)
    stop = daemon.stop_event

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: finishing the current step, then exiting", signal.Signals(signum).name)
        notify("STOPPING=1")
        stop.set()
        daemon.triggers.fire("shutdown")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    if once:
        daemon.reconcile("once")
        _close_status_writer(daemon)
        daemon.close()
        return 0 if daemon.status.last_pass.get("result") == "ok" else 3

    # HTTP API.
    api_host, api_port = parse_listen(config.api.listen, default_host="127.0.0.1")
    app = make_api(daemon, read_secret(config.api.token_file), read_secret(config.repo.webhook_secret_file),
                   daemon.triggers.fire)
    server = uvicorn.Server(uvicorn.Config(app, host=api_host, port=api_port, log_level="warning",
                                           access_log=False, lifespan="off"))
    try:
        # Bind here, not in the server thread: a port in use is a clear startup error, not a daemon
        # that silently runs without its API.
        api_socket = socket.create_server((api_host, api_port), family=_family(api_host), reuse_port=False)
    except OSError as exc:
        log.error("cannot listen on api.listen %s: %s", config.api.listen, exc.strerror)
        daemon.close()
        return 3
    api_thread = threading.Thread(target=server.run, kwargs={"sockets": [api_socket]}, name="modelfleet-api",
                                  daemon=True)
    api_thread.start()

    # Gateway child (embedded mode).
    supervisor = None
    if config.gateway.mode == "child":
        supervisor = GatewaySupervisor(config_path, config, stop)
        supervisor.start()

    # Poll timer with jitter, and the watchdog.
    scheduler = BackgroundScheduler(daemon=True)
    scheduler.add_job(lambda: daemon.triggers.fire("poll"), "interval", seconds=config.repo.poll_interval,
                      jitter=max(1, int(config.repo.poll_interval * 0.1)), id="poll")
    # Serverless: between passes, ask the autoscaler whether the gateways' load calls for a pass.
    scheduler.add_job(daemon.check_scaling, "interval", seconds=REPORT_INTERVAL, id="autoscale",
                      max_instances=1, coalesce=True)
    interval = watchdog_interval()
    if interval:
        scheduler.add_job(lambda: notify("WATCHDOG=1"), "interval", seconds=interval, id="watchdog")
    scheduler.start()
    # Between passes: ready replicas probed every readinessProbe.period (failureThreshold).
    daemon.readiness.start(stop)

    # Ref watcher for local repositories: a push triggers a pass within a second.
    if config.repo.watch:
        paths = daemon.source.watch_paths()
        if paths:
            watch_refs(paths, lambda: daemon.triggers.fire("watch"), stop)

    daemon.triggers.fire("startup")
    notified_ready = False
    backoff = 1.0
    try:
        while not stop.is_set():
            reason = daemon.triggers.wait(timeout=1.0)
            if reason is None or stop.is_set():
                continue
            daemon.reconcile(reason)
            if not notified_ready and daemon.status.observed_once:
                notify("READY=1")
                notified_ready = True
            if daemon.status.last_pass.get("result") == "ok":
                backoff = 1.0
            else:
                # Transient trouble: retry with backoff, jittered (the poll timer also retries).
                delay = min(backoff, MAX_BACKOFF) * (0.8 + 0.4 * random.random())
                backoff = min(backoff * 2, MAX_BACKOFF)
                timer = threading.Timer(delay, lambda: daemon.triggers.fire("retry"))
                timer.daemon = True
                timer.start()
    finally:
        scheduler.shutdown(wait=False)
        daemon.route_watch.close()  # remote gateways' long-polls end now (they keep their table)
        server.should_exit = True
        if supervisor is not None:
            supervisor.terminate()
        api_thread.join(timeout=5)
        _close_status_writer(daemon)
        daemon.close()
        log.info("stopped")
    return 0

