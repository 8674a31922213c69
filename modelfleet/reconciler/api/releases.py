"""``POST /api/v1/releases`` (body ``{"model", "from", "to", "branch"?}``): `modelfleet release` on a
fresh clone of ``repo.url`` under ``stateDir/releases``, pushed as a release branch (never to the
tracked branch: merging it deploys it). The HuggingFace commit to pin is the one the daemon deployed.
With a forge status provider, the branch's pull request is opened too (or the open one reused).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from modelfleet.reconciler.secrets import bearer_token_matches, redact_url

if TYPE_CHECKING:
    from modelfleet.reconciler.daemon.reconcile import Daemon

MAX_BODY = 64 * 1024
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_BRANCH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,200}$")
_IDENTITY = {"GIT_AUTHOR_NAME": "modelfleet", "GIT_AUTHOR_EMAIL": "modelfleet@localhost",
             "GIT_COMMITTER_NAME": "modelfleet", "GIT_COMMITTER_EMAIL": "modelfleet@localhost",
             "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}


def _deployed_commit(daemon: Daemon, model: str, environment: str) -> str | None:
    status = daemon.status.deployments.get((model, environment))
    origin = (status.origin or {}) if status is not None else {}
    hf = origin.get("huggingface") if isinstance(origin, dict) else None
    commit = hf.get("commit") if isinstance(hf, dict) else None
    return commit if isinstance(commit, str) and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def _pull_request(daemon: Daemon, done: Any) -> dict[str, Any]:
    """With a forge (the review planner's pull requests): the release branch's pull request, opened
    or the one open already: ``{"pullRequest": {number, url, created}}``; ``{"pullRequestError"}``
    when the forge refuses (the branch is pushed all the same). Nothing without a forge."""
    from modelfleet.reconciler.cli.release import open_pull_request
    from modelfleet.reconciler.status import StatusError

    reviews = getattr(daemon, "reviews", None)
    pulls = getattr(reviews, "pulls", None)
    if pulls is None or not done.branch:
        return {}
    body = (f"{done.message}\n\nOpened by modelfleet (`POST /api/v1/releases`): merging it into "
            f"`{daemon.config.repo.branch}` deploys it; modelfleet comments its plan here.")
    try:
        pull, created = open_pull_request(pulls, done.branch, daemon.config.repo.branch, done.message, body)
    except StatusError as exc:
        return {"pullRequestError": str(exc)}
    return {"pullRequest": {"number": pull.number, "url": pull.url, "created": created}}


def release_routes(daemon: Daemon, api_token: str | None) -> list[Route]:
    lock = threading.Lock()  # one release at a time

    def run(model: str, source: str, target: str, branch: str | None) -> tuple[int, dict[str, Any]]:
        from modelfleet.reconciler.cli.release import ReleaseError, release

        root = Path(daemon.config.state_dir) / "releases"
        root.mkdir(parents=True, exist_ok=True)
        with lock:
            work = Path(tempfile.mkdtemp(prefix="release-", dir=root))
            try:
                clone = subprocess.run(["git", "clone", "-q", "--branch", daemon.config.repo.branch,
                                        daemon.config.repo.url, str(work / "repo")], capture_output=True, text=True,
                                       timeout=300, env={**os.environ, **_IDENTITY}, stdin=subprocess.DEVNULL,
                                       check=False)
                if clone.returncode != 0:
                    return 502, {"error": f"cannot clone {redact_url(daemon.config.repo.url)}: "
                                          f"{redact_url(clone.stderr.strip()[-300:])}"}
                try:
                    done = release(work / "repo", model, source, target, push=True, branch=branch,
                                   deployed_commit=_deployed_commit(daemon, model, source), git_env=_IDENTITY)
                except ReleaseError as exc:
                    return 422, {"error": redact_url(str(exc))}
                answer: dict[str, Any] = {"branch": done.branch, "commit": done.commit, "message": done.message,
                                          "file": done.promotion.file}
                answer.update(_pull_request(daemon, done))
                return 201, answer
            finally:
                shutil.rmtree(work, ignore_errors=True)

    async def releases(request: Request) -> Response:
        if api_token is not None and not bearer_token_matches(request.headers.get("authorization"), api_token):
            return JSONResponse({"error": "unauthorized: send Authorization: Bearer <api token>"}, status_code=401)
        body = await request.body()
        if len(body) > MAX_BODY:
            return JSONResponse({"error": "body too large"}, status_code=413)
        try:
            import json

            data = json.loads(body or b"{}")
        except ValueError:
            return JSONResponse({"error": "body is not JSON"}, status_code=400)
        if not isinstance(data, dict):
            return JSONResponse({"error": 'expected {"model": ..., "from": ..., "to": ...}'}, status_code=400)
        fields = {key: data.get(key) for key in ("model", "from", "to")}
        bad = [key for key, value in fields.items() if not isinstance(value, str) or not _NAME.match(value)]
        branch = data.get("branch")
        if bad or (branch is not None and (not isinstance(branch, str) or not _BRANCH.match(branch)
                                           or ".." in branch)):
            what = ", ".join(bad) if bad else "branch"
            return JSONResponse({"error": f"{what}: expected {{\"model\", \"from\", \"to\"}} (names: lowercase "
                                          "letters, digits, '-') and optionally \"branch\""}, status_code=400)
        code, result = await run_in_threadpool(run, str(fields["model"]), str(fields["from"]), str(fields["to"]),
                                                branch)
        return JSONResponse(result, status_code=code)

    return [Route("/api/v1/releases", releases, methods=["POST"])]
