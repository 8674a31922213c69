"""`modelfleet logs MODEL [--environment E] [--follow] [--tail N] [--json] [--no-containers]`.

Shows a deployment's executions (the inference requests the gateways served, one line each) and the
container logs of its replicas, from ``GET /api/v1/logs/<model>`` of the daemon API. ``--follow``
then polls every second and prints what is new: executions after the last one seen, container
lines after the last poll. While the API does not answer, ``--follow`` says so once and keeps polling.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from modelfleet.reconciler.cli.events import EventsUnavailable, _api_base_and_token, poll_forever
from modelfleet.state.executions import Execution, describe

POLL_SECONDS = 1.0
FOLLOW_LIMIT = 5000  # executions per poll while following (the API's most)


def logs_fetcher(base: str, token: str | None, model: str) -> Callable[[dict[str, str]], dict[str, Any]]:
    """A function that GETs ``/api/v1/logs/<model>`` with query parameters (raises EventsUnavailable)."""
    from urllib.parse import quote

    import httpx

    from modelfleet.reconciler.secrets import redact_url

    url = f"{base}/api/v1/logs/{quote(model, safe='')}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    client = httpx.Client(headers=headers, timeout=30, trust_env=False)

    def fetch(params: dict[str, str]) -> dict[str, Any]:
        try:
            response = client.get(url, params=params)
        except httpx.HTTPError as exc:
            raise EventsUnavailable(f"cannot reach the daemon API at {redact_url(base)}: {exc}") from None
        try:
            data = response.json()
        except ValueError:
            raise EventsUnavailable(f"{redact_url(url)} answered {response.status_code}, not JSON") from None
        if response.status_code != 200:
            error = data.get("error") if isinstance(data, dict) else None
            detail = error or response.text[:300]
            raise EventsUnavailable(f"{redact_url(url)} answered {response.status_code}: {detail}")
        if not isinstance(data, dict) or not isinstance(data.get("executions"), list):
            raise EventsUnavailable(f"{redact_url(url)} did not answer executions")
        return data

    return fetch


def render(data: dict[str, Any], as_json: bool) -> list[str]:
    """The lines of one answer: container lines first (grouped by replica), then executions."""
    lines: list[str] = []
    for replica in data.get("containers") or []:
        name = f"{replica.get('container')} ({replica.get('environment')}, replica {replica.get('replica')}, " \
               f"{replica.get('host')})"
        if as_json:
            lines.extend(json.dumps({"container": replica.get("container"), "host": replica.get("host"),
                                     "line": line}) for line in replica.get("lines") or [])
            if replica.get("error"):
                lines.append(json.dumps({"container": replica.get("container"), "error": replica["error"]}))
            continue
        if replica.get("error"):
            lines.append(f"[{name}] cannot read its log: {replica['error']}")
        lines.extend(f"[{replica.get('container')}] {line}" for line in replica.get("lines") or [])
    for entry in data.get("executions") or []:
        if as_json:
            lines.append(json.dumps(entry, sort_keys=True))
            continue
        fields = {k: v for k, v in entry.items() if k != "seq"}
        try:
            execution = Execution.model_validate(fields)
        except ValueError:
            lines.append(json.dumps(entry, sort_keys=True))
            continue
        when = datetime.fromtimestamp(execution.time, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        lines.append(f"{when} {describe(execution.model_dump())}")
    return lines


def follow(fetch: Callable[[dict[str, str]], dict[str, Any]], params: dict[str, str],
           emit: Callable[[str], None], warn: Callable[[str], None], as_json: bool = False,
           sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.time,
           interval: float = POLL_SECONDS) -> None:
    """Print what there is, then poll forever and print what is new (container lines since the
    previous poll: one logged while a poll is answered may show twice, never not at all)."""
    query = dict(params)
    containers = query.get("tail") != "0"
    asked_at = 0.0

    def fetch_new() -> dict[str, Any]:
        nonlocal asked_at
        asked_at = clock()
        return fetch(query)

    def handle(data: dict[str, Any]) -> None:
        for line in render(data, as_json):
            emit(line)
        query["since"] = str(data.get("next") or query.get("since") or 0)
        query["limit"] = str(FOLLOW_LIMIT)  # after the first answer: everything new
        if containers:
            query.pop("tail", None)
            query["containerSince"] = f"{asked_at:.3f}"

    poll_forever(fetch_new, handle, warn, sleep, interval)


def add_logs_parser(sub: Any) -> None:
    p = sub.add_parser("logs", help="show a deployment's executions (from the gateways) and its replicas' container "
                                    "logs (from the daemon API); --follow prints new ones as they come")
    p.add_argument("model", help="the model (metadata.name of its Model manifest)")
    p.add_argument("--environment", "-e", help="only this environment (default: every environment of the model)")
    p.add_argument("--follow", "-f", action="store_true", help="keep polling (every second) and print what is new")
    p.add_argument("--tail", type=int, default=20, metavar="N",
                   help="executions and container lines per replica to show first (default 20)")
    p.add_argument("--no-containers", action="store_true", help="executions only")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--config", help="daemon config, to find the API address and token")
    p.add_argument("--api", help="API base URL (default: from --config, else http://127.0.0.1:8081)")


def cmd_logs(args: argparse.Namespace) -> int:
    import sys

    from modelfleet.reconciler.cli.main import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, err

    def warn(text: str) -> None:
        err.print(f"modelfleet logs: {text}", markup=False)

    if args.tail < 0:
        warn(f"--tail {args.tail}: give a number of lines >= 0")
        return EXIT_USAGE
    base, token = _api_base_and_token(args.config, args.api)
    fetch = logs_fetcher(base, token, args.model)
    params = {"limit": str(args.tail), "tail": "0" if args.no_containers else str(args.tail)}
    if args.environment:
        params["environment"] = args.environment

    def emit(text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    if args.follow:
        follow(fetch, params, emit, warn, as_json=args.json)
        return EXIT_OK  # not reached: ended by Ctrl-C (main returns 130)
    try:
        data = fetch(params)
    except EventsUnavailable as exc:
        warn(str(exc))
        return EXIT_RUNTIME
    for line in render(data, args.json):
        emit(line)
    return EXIT_OK
