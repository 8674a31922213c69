"""`modelfleet plan --offline` is the pure core and its inputs: it imports no client of Docker, Git,
HTTP or the daemon's store, and none of the shell that uses them (they cost startup time for nothing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples-repo"

# Module prefixes `plan --offline --json` must not import.
FORBIDDEN = (
    "docker", "git", "httpx", "httpcore", "urllib3", "requests", "huggingface_hub", "prometheus_client",
    "apscheduler", "watchfiles", "torch", "sqlite3", "rich",
    "modelfleet.reconciler.pool", "modelfleet.reconciler.daemon", "modelfleet.reconciler.artifacts",
    "modelfleet.reconciler.rollout", "modelfleet.reconciler.gateway", "modelfleet.reconciler.api",
    "modelfleet.reconciler.status", "modelfleet.reconciler.images", "modelfleet.reconciler.cli.upload",
    "modelfleet.reconciler.cli.runtimes",
)
# Light modules under a forbidden prefix: the status provider names the config validates against.
ALLOWED = ("modelfleet.reconciler.status", "modelfleet.reconciler.status.registry")


def test_plan_offline_json_imports_nothing_of_the_shell() -> None:
    probe = ("import json, sys, contextlib, io; from modelfleet.reconciler.cli.main import main; "
             "out = io.StringIO(); code = None\n"
             "with contextlib.redirect_stdout(out):\n"
             f"    code = main(['plan', {str(EXAMPLES)!r}, '--config', {str(EXAMPLES / 'modelfleet.yaml')!r},"
             " '--offline', '--json'])\n"
             "json.loads(out.getvalue())\n"
             "print(json.dumps({'code': code, 'modules': sorted(sys.modules)}))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    result = json.loads(done.stdout)
    assert result["code"] == 0
    imported = [m for m in result["modules"]
                if any(m == f or m.startswith(f + ".") for f in FORBIDDEN) and m not in ALLOWED]
    assert imported == []
