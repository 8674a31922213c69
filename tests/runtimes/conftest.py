"""Fixtures for the runtime servers: real archives/snapshots, and servers on 127.0.0.1.

Torch servers run as real subprocesses (``python -m modelfleet.runtimes.torch_server``, the image's
entry point): the server makes the model directory its working directory and puts it on
sys.path, as a TorchServe worker does, which must not leak into the test process. Transformers
servers run in-process (uvicorn in a thread).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from modelfleet.runtimes.contract import RuntimeEnvironment


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, timeout: float = 60.0, proc: subprocess.Popen[bytes] | None = None,
               log_path: Path | None = None) -> httpx.Response:
    """Poll ``url`` until it answers 200 (returns the last response when the server says failed)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            log = log_path.read_text() if log_path else ""
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log[-3000:]}")
        try:
            response = httpx.get(url, timeout=2.0)
            if response.status_code == 200:
                return response
            last = response
            body = response.json()
            if body.get("phase") == "failed" or body.get("status") == "failed":
                return response
        except (httpx.TransportError, ValueError) as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready within {timeout} s (last: {last})")


class TorchServer:
    """``python -m modelfleet.runtimes.torch_server`` on 127.0.0.1 for one model directory."""

    def __init__(self, model_dir: Path, log_path: Path, env: dict[str, str] | None = None,
                 contract: RuntimeEnvironment | None = None) -> None:
        """``contract``: what the daemon would tell the container (its model directory and port are
        this server's); ``env``: more variables on top, as a manifest's runtime.env."""
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        told = dataclasses.replace(contract or RuntimeEnvironment(), model_dir=str(model_dir), port=self.port)
        full_env = {**os.environ, "HOST": "127.0.0.1", "MODELFLEET_WORK_DIR": str(log_path.parent / "work"),
                    "OMP_NUM_THREADS": "1", **told.merged_with(env or {})}
        repo = str(Path(__file__).resolve().parents[2])
        full_env["PYTHONPATH"] = repo + os.pathsep + full_env.get("PYTHONPATH", "")
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "modelfleet.runtimes.torch_server"], env=full_env,
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd="/")

    def wait(self, timeout: float = 90.0) -> httpx.Response:
        return wait_ready(self.base + "/ping", timeout, self.proc, self.log_path)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class InProcessServer:
    """An ASGI app served by uvicorn in a thread on 127.0.0.1."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None, access_log=False,
                                lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    def wait(self, path: str, timeout: float = 120.0) -> httpx.Response:
        return wait_ready(self.base + path, timeout)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@contextlib.contextmanager
def serve_in_process(app: Any) -> Iterator[InProcessServer]:
    server = InProcessServer(app)
    try:
        yield server
    finally:
        server.stop()
