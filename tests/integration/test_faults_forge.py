"""The forge's status API down, with the daemon on real dockerd hosts: deployments converge while
every status write fails (5xx), /api/v1/status shows the queue, and once the forge answers again
every context ends on its latest state."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from netns_hosts import TestHost

from tests.integration.fleet import BASE_MANIFESTS, echo_model, free_port, make_fleet, running
from tests.reconciler.status.forge_standin import StandInForge

TOKEN = "tok-forge-integration-5e4d3c2b1a"


class FlakyForge(StandInForge):
    """A stand-in Gitea that answers 503 to every well-formed request while ``failing``."""

    failing = True

    def _check(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, Any]:
        code, payload = super()._check(method, path, headers, raw)
        if code == 201 and self.failing:
            return 503, {"message": "The server is temporarily unavailable"}
        return code, payload


@pytest.fixture
def git_daemon(tmp_path: Path) -> Iterator[str]:
    """git:// on loopback, serving the test's directory (the daemon's repo.url must name owner/name)."""
    port = free_port()
    proc = subprocess.Popen(["git", "daemon", "--reuseaddr", "--export-all", f"--base-path={tmp_path.parent}",
                             "--listen=127.0.0.1", f"--port={port}", str(tmp_path.parent)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        yield f"git://127.0.0.1:{port}/{tmp_path.name}/origin.git"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_statuses_wait_for_a_forge_that_is_down_and_never_slow_the_fleet(
        tmp_path: Path, clean_hosts: list[TestHost], git_daemon: str) -> None:
    token_file = tmp_path / "forge-token"
    token_file.write_text(TOKEN + "\n")
    forge = FlakyForge("gitea", TOKEN, f"{tmp_path.name}/origin")
    with forge:
        fleet = make_fleet(tmp_path, clean_hosts[:2],
                           repo={"url": git_daemon, "branch": "main", "pollInterval": "2s", "watch": False},
                           status={"provider": "gitea", "url": forge.url, "tokenFile": str(token_file)})
        head = fleet.push({**BASE_MANIFESTS, "models/echo.yaml": echo_model(replicas=1)})
        with running(fleet):
            # The forge fails every write: the deployment converges all the same.
            fleet.wait(lambda: fleet.deployment("echo").get("state") == "success" and fleet.routed(), 60,
                       "echo deployed while the forge is down")
            writer = fleet.wait(lambda: (s := fleet.status().get("statusWriter") or {}).get("retryingSince")
                                and s, 30, "the status writer retrying")
            assert writer["pending"] >= 1 and "HTTP 503" in writer["lastError"]
            assert fleet.status()["lastPass"]["result"] == "ok"

            forge.failing = False
            fleet.wait(lambda: (s := fleet.status().get("statusWriter") or {}).get("pending") == 0
                       and s.get("retryingSince") is None, 90, "the queue written once the forge is back")
            latest: dict[str, str] = {}
            for request in forge.requests:
                if request.sha == head and isinstance(request.body, dict):
                    latest[request.body["context"]] = request.body["state"]
            assert latest.get("modelfleet/production/echo") == "success"
            assert latest.get("modelfleet") == "success"
            assert forge.violations == []
            assert TOKEN not in fleet.log()
