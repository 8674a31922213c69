"""`modelfleet events [--config CFG | --api URL] [--follow] [--json]`: the daemon's pass history.

Reads ``GET /api/v1/history`` (the recent passes and actions of the store). Without ``--follow``
it prints the finished passes it lists, oldest first, and exits; with ``--follow`` it then polls
every second and prints each pass once, when it has finished (with its actions). While the API
does not answer, ``--follow`` says so once and keeps polling.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

POLL_SECONDS = 1.0
_SEEN_KEEP = 1000  # pass ids remembered (the history holds far fewer)


class EventsUnavailable(Exception):
    """The daemon API did not answer, or answered something else than the history."""


def _api_base_and_token(config_path: str | None, api: str | None) -> tuple[str, str | None]:
    from modelfleet.reconciler.cli.main import _load_config_or_exit
    from modelfleet.reconciler.config import local_url
    from modelfleet.reconciler.secrets import read_secret

    token = None
    base = api
    if config_path:
        config = _load_config_or_exit(config_path)
        base = base or local_url(config.api.listen)
        token = read_secret(config.api.token_file)
    return (base or "http://127.0.0.1:8081").rstrip("/"), token


def history_fetcher(base: str, token: str | None) -> Callable[[], dict[str, Any]]:
    """A function that GETs ``/api/v1/history`` (raises EventsUnavailable, naming the URL)."""
    import httpx

    from modelfleet.reconciler.secrets import redact_url

    url = f"{base}/api/v1/history"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    client = httpx.Client(headers=headers, timeout=10, trust_env=False)

    def fetch() -> dict[str, Any]:
        try:
            response = client.get(url)
        except httpx.HTTPError as exc:
            raise EventsUnavailable(f"cannot reach the daemon API at {redact_url(base)}: {exc}") from None
        if response.status_code != 200:
            raise EventsUnavailable(f"{redact_url(url)} answered {response.status_code}: {response.text[:300]}")
        try:
            data = response.json()
        except ValueError:
            raise EventsUnavailable(f"{redact_url(url)} did not answer JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("passes"), list):
            raise EventsUnavailable(f"{redact_url(url)} did not answer a pass history")
        return data

    return fetch


def finished_passes(history: dict[str, Any], seen: Iterable[int] = ()) -> list[dict[str, Any]]:
    """The finished passes of a history answer not in ``seen``, oldest first, each with its actions
    (``actions``: those of the answer with its pass id, in the order they ran)."""
    skip = set(seen)
    actions: dict[int, list[dict[str, Any]]] = {}
    for action in history.get("actions") or []:
        if isinstance(action, dict) and isinstance(action.get("pass_id"), int):
            actions.setdefault(action["pass_id"], []).append(action)
    passes = []
    for entry in history.get("passes") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int):
            continue
        if entry.get("finished_at") is None or entry["id"] in skip:
            continue
        passes.append({**entry, "actions": sorted(actions.get(entry["id"], []), key=lambda a: a.get("id") or 0)})
    return sorted(passes, key=lambda p: p["id"])


def _when(timestamp: Any) -> str:
    if not isinstance(timestamp, int | float):
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_pass(entry: dict[str, Any]) -> str:
    """A pass as text: one line for the pass, one indented line per action."""
    summary = entry.get("summary") if isinstance(entry.get("summary"), dict) else {}
    assert isinstance(summary, dict)
    revision = str(entry.get("revision") or "-")[:12]
    seconds = summary.get("seconds")
    parts = [f"{_when(entry.get('finished_at'))} pass {entry['id']} {entry.get('result') or '-'}",
             f"trigger={entry.get('trigger') or '-'}", f"revision={revision}",
             f"actions={summary.get('actions', len(entry.get('actions') or []))}"]
    if summary.get("held_actions"):
        parts.append(f"held={summary['held_actions']}")
    if isinstance(seconds, int | float):
        parts.append(f"in {seconds:.2f}s")
    lines = [" ".join(parts)]
    if summary.get("error"):
        lines.append(f"  error: {summary['error']}")
    for host in summary.get("down_hosts") or []:
        lines.append(f"  host down: {host}")
    for action in entry.get("actions") or []:
        line = (f"  {action.get('op')} {action.get('model')}/{action.get('environment')} "
                f"replica {action.get('replica')} on {action.get('host')}: {action.get('result') or 'running'}")
        if action.get("error"):
            line += f": {action['error']}"
        lines.append(line)
    return "\n".join(lines)


def render(entry: dict[str, Any], as_json: bool) -> str:
    return json.dumps(entry, sort_keys=True, default=str) if as_json else format_pass(entry)


def poll_forever(fetch: Callable[[], dict[str, Any]], handle: Callable[[dict[str, Any]], None],
                 warn: Callable[[str], None], sleep: Callable[[float], None] = time.sleep,
                 interval: float = POLL_SECONDS) -> None:
    """``handle(fetch())`` every ``interval`` seconds, forever (Ctrl-C ends it). An API that does not
    answer is reported once per outage (and once back)."""
    failing = False
    while True:
        try:
            data = fetch()
        except EventsUnavailable as exc:
            if not failing:
                warn(f"{exc} (retrying every {interval:g}s)")
            failing = True
        else:
            if failing:
                warn("the daemon API answers again")
            failing = False
            handle(data)
        sleep(interval)


def follow(fetch: Callable[[], dict[str, Any]], emit: Callable[[str], None], warn: Callable[[str], None],
           as_json: bool = False, sleep: Callable[[float], None] = time.sleep,
           interval: float = POLL_SECONDS) -> None:
    """Print the finished passes, then poll forever, printing each new pass once when it finished."""
    seen: list[int] = []

    def handle(history: dict[str, Any]) -> None:
        for entry in finished_passes(history, seen):
            emit(render(entry, as_json))
            seen.append(entry["id"])
        del seen[:-_SEEN_KEEP]

    poll_forever(fetch, handle, warn, sleep, interval)


def cmd_events(args: argparse.Namespace) -> int:
    import sys

    from modelfleet.reconciler.cli.main import EXIT_OK, EXIT_RUNTIME, err

    base, token = _api_base_and_token(args.config, args.api)
    fetch = history_fetcher(base, token)

    def emit(text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def warn(text: str) -> None:
        err.print(f"modelfleet events: {text}", markup=False)

    if args.follow:
        follow(fetch, emit, warn, as_json=args.json)
        return EXIT_OK  # not reached: ended by Ctrl-C (main returns 130)
    try:
        history = fetch()
    except EventsUnavailable as exc:
        warn(str(exc))
        return EXIT_RUNTIME
    for entry in finished_passes(history):
        emit(render(entry, args.json))
    return EXIT_OK
