"""The `modelfleet` command line. Exit codes: 0 ok, 1 invalid input, 2 usage, 3 runtime failure."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelfleet.reconciler.config import Config, ConfigError, load_config, local_url
from modelfleet.reconciler.secrets import read_secret
from modelfleet.reconciler.source.tree import DirectoryTree
from modelfleet.state.desired import compute_desired
from modelfleet.state.loader import Catalog, gc_paused, load_tree
from modelfleet.state.planning import Plan, PlanInputs, plan
from modelfleet.state.units import format_memory

if TYPE_CHECKING:
    from rich.console import Console

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_RUNTIME = 0, 1, 2, 3


class _LazyConsole:
    """A rich Console made on first use: importing rich.console and rich.markup is ~50 ms that
    `plan --json` (which prints with the json module) never needs."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.console, name)


err = _LazyConsole(stderr=True, highlight=False, soft_wrap=True)
out = _LazyConsole(highlight=False, soft_wrap=True)


def _revision_of(path: Path) -> str:
    """The commit a working directory is at (``-dirty`` when it has changes), or ``workdir``."""
    try:
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "workdir"


def _repo_dir(arg: str) -> Path:
    path = Path(arg)
    if not path.is_dir():
        raise UsageError(f"{arg}: not a directory (give the path of a manifest repository)")
    return path


class UsageError(Exception):
    pass


def cmd_validate(args: argparse.Namespace) -> int:
    repo = _repo_dir(args.repo)
    catalog = load_tree(DirectoryTree(repo))
    # Resolving against an empty pool adds the errors that need no hosts (a flavor the policies do
    # not allow, a missing artifact): the same errors `plan` reports.
    errors = compute_desired(catalog, [], "validate").errors
    if args.json:
        out.print_json(json.dumps({"valid": not errors, "errors": [e.to_json() for e in errors]}))
    for error in errors:
        err.print(str(error), markup=False)
    if errors:
        err.print(f"{len(errors)} error(s) in {repo}", style="bold red")
        return EXIT_INVALID
    if not args.json:
        n_dep = sum(len(m.deployments) for m in catalog.models.values())
        out.print(f"{repo}: valid ({len(catalog.environments)} environments, {len(catalog.policies)} "
                  f"policies, {len(catalog.models)} models, {n_dep} deployments)")
    return EXIT_OK


def _load_config_or_exit(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        for error in exc.errors:
            err.print(str(error), markup=False)
        raise SystemExit(EXIT_INVALID) from None


def _one_shot(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run a command with the cyclic GC paused: a one-shot command builds a large object graph
    without cycles, and each collection would walk all of it (~0.4 s at 10k deployments) to free
    nothing. Reference counting still frees memory; the GC is restored afterwards."""

    def run(args: argparse.Namespace) -> int:
        with gc_paused():
            return command(args)

    return run


@_one_shot
def cmd_plan(args: argparse.Namespace) -> int:
    """The plan a daemon pass would apply. Against the live pool it plans from the same facts the
    daemon does (observation, the daemon's store under stateDir, readiness probes), with the same
    function; --offline plans against an empty pool. --ref plans a ref of the remote repository
    (repo.url) as the daemon plans a review branch: without probing again."""
    config = _load_config_or_exit(args.config)
    if getattr(args, "ref", None):
        return _plan_ref(args, config)
    repo = _repo_dir(args.repo)
    tree = DirectoryTree(repo)
    catalog = load_tree(tree)
    revision = _revision_of(repo)
    if args.offline:
        result = plan(PlanInputs(catalog=catalog, hosts=list(config.pool.hosts), revision=revision))
    else:
        result = _plan_live(config, catalog, tree, revision)
    if args.json:
        sys.stdout.write(_plan_json(result.to_json(explain=args.explain)))
    else:
        _print_plan(result, args.explain)
    if result.desired.errors and not args.json:
        for error in result.desired.errors:
            err.print(str(error), markup=False)
    return EXIT_INVALID if result.desired.errors else EXIT_OK


def _plan_ref(args: argparse.Namespace, config: Config) -> int:
    """``plan --ref REF``: fetch REF of repo.url into a temporary bare repository (the daemon's
    mirror and store are only read) and plan its commit like a review branch head."""
    import shutil
    import tempfile

    from modelfleet.reconciler.source.ref import RefError, fetch_ref

    scratch = Path(tempfile.mkdtemp(prefix="modelfleet-plan-"))
    try:
        try:
            tree, revision = fetch_ref(config.repo.url, args.ref, scratch)
        except RefError as exc:
            err.print(str(exc), markup=False)
            return EXIT_RUNTIME
        catalog = load_tree(tree)
        if args.offline:
            result = plan(PlanInputs(catalog=catalog, hosts=list(config.pool.hosts), revision=revision))
        else:
            result = _plan_live(config, catalog, tree, revision, probe=False)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        sys.stdout.write(_plan_json(result.to_json(explain=args.explain)))
    else:
        _print_plan(result, args.explain)
        for error in result.desired.errors:
            err.print(str(error), markup=False)
    return EXIT_INVALID if result.desired.errors else EXIT_OK


def _plan_json(data: Mapping[str, object]) -> str:
    """The plan as JSON, one top-level key per line and each item of a list (each deployment,
    each action) on a line of its own: readable, greppable, and written by the C encoder
    (``indent=`` runs the pure-Python one: ~2 s for 10k deployments)."""
    encode = json.JSONEncoder().encode
    lines = []
    for key, value in data.items():
        if isinstance(value, list) and value:
            items = ",\n    ".join(encode(item) for item in value)
            lines.append(f"  {encode(key)}: [\n    {items}\n  ]")
        else:
            lines.append(f"  {encode(key)}: {encode(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _plan_live(config: Config, catalog: Catalog, tree: Mapping[str, bytes], revision: str,
               probe: bool = True) -> Plan:
    import time

    from modelfleet.reconciler.artifacts.origins import OriginResolver, huggingface_resolver
    from modelfleet.reconciler.artifacts.store import ArtifactStore
    from modelfleet.reconciler.daemon.inputs import gather_inputs, plan_with_probes
    from modelfleet.reconciler.daemon.store import Store
    from modelfleet.reconciler.pool.observe import observe_pool
    from modelfleet.reconciler.rollout.readiness import ReadinessProber

    observation = observe_pool(config)
    for host, reason in sorted(observation.errors.items()):
        err.print(f"host {host} is unreachable: {reason}", markup=False)
    store = Store.open_read_only(config.state_dir)
    if store is None:
        err.print(f"no daemon state in {config.state_dir}: planning as a daemon starting afresh would",
                  markup=False)
    # Resolve HuggingFace revisions to the commit that would be deployed (the daemon's cache).
    facts = OriginResolver(huggingface_resolver(config), ArtifactStore(config.state_dir)).facts(catalog)
    prober = ReadinessProber()
    try:
        inputs = gather_inputs(config, catalog, revision, observation, store, facts, time.time())
        return plan_with_probes(inputs, prober) if probe else plan(inputs)
    finally:
        prober.close()
        if store is not None:
            store.close()


def _print_plan(result: Plan, explain: bool) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"Deployments at {result.desired.revision[:12]}", title_justify="left")
    for column in ("model", "environment", "runtime", "replicas", "hosts", "state"):
        table.add_column(column)
    for key in sorted(result.desired.deployments):
        state = result.desired.deployments[key]
        runtime = state.runtime
        rt = f"{runtime.type} ({runtime.cpus:g} cpu, {format_memory(runtime.memory)})" if runtime else "-"
        if state.errors:
            status = "[red]invalid[/red]"
        elif not state.enabled:
            status = "[dim]disabled[/dim]"
        elif state.unschedulable:
            status = f"[yellow]{escape(state.unschedulable)}[/yellow]"
        else:
            status = "[green]ok[/green]" + (" (serverless)" if state.serverless else "")
        table.add_row(state.model, state.environment, rt, str(state.replicas),
                      ", ".join(state.hosts) or "-", status)
    out.print(table)
    if explain:
        for key in sorted(result.desired.deployments):
            state = result.desired.deployments[key]
            if state.runtime is not None:
                out.print(f"[bold]{state.model}/{state.environment}[/bold]: runtime {state.runtime.type} "
                          f"({state.runtime.reason})")
            for host in state.eligible_hosts:
                out.print(f"  [green]✓[/green] {host}")
            for host, reason in sorted(state.excluded.items()):
                # Reasons quote names from the config (locations are free text): not markup.
                out.print(f"  [red]✗[/red] {host}: {escape(reason)}", markup=True)
    for key, notes in sorted(result.notes.items()):
        for note in notes:
            out.print(f"[dim]note: {escape(key[0])}/{escape(key[1])}: {escape(note)}[/dim]")
    if result.held:
        held = Table(title=f"{len(result.held)} action(s) held back (not taken by this pass)", title_justify="left")
        for column in ("op", "model", "environment", "replica", "host", "why"):
            held.add_column(column)
        for item in result.held:
            a = item.action
            held.add_row(a.op, a.model, a.environment, str(a.replica), a.host, escape(item.why))
        out.print(held)
    if not result.actions:
        out.print("No changes: the pool matches the repository." if not result.held
                  else "No action will be taken by this pass.")
        return
    actions = Table(title=f"{len(result.actions)} action(s)", title_justify="left")
    for column in ("op", "model", "environment", "replica", "host", "reason"):
        actions.add_column(column)
    for action in result.actions:
        actions.add_row(action.op, action.model, action.environment, str(action.replica), action.host,
                        action.reason)
    out.print(actions)


def _setup_logging(config: Config, verbose: bool) -> None:
    """The config's ``logging`` (text or JSON lines, level; reconciler/logs.py); -v means debug."""
    from modelfleet.reconciler.logs import setup_logging

    setup_logging(config.logging.format, config.logging.level, verbose)


def cmd_run(args: argparse.Namespace) -> int:
    from modelfleet.reconciler.daemon.service import run_daemon

    config = _load_config_or_exit(args.config)
    _setup_logging(config, args.verbose)
    return run_daemon(config, str(Path(args.config).resolve()), once=args.once)


def cmd_gateway(args: argparse.Namespace) -> int:
    from modelfleet.reconciler.gateway.server import GatewayError, gateway_workers, run_gateway, run_gateway_workers
    from modelfleet.reconciler.gateway.workers import worker_index

    config = _load_config_or_exit(args.config)
    _setup_logging(config, args.verbose)
    try:
        workers = gateway_workers(config)
        if workers > 1 and worker_index() is None:
            return run_gateway_workers(config, str(Path(args.config).resolve()), workers, args.verbose)
        run_gateway(config)
    except GatewayError as exc:
        err.print(f"modelfleet gateway: {exc}", markup=False)
        return EXIT_RUNTIME
    return EXIT_OK


def _api_get(args: argparse.Namespace, path: str) -> dict[str, object]:
    import httpx

    base = args.api
    token = None
    if args.config:
        config = _load_config_or_exit(args.config)
        base = base or local_url(config.api.listen)
        token = read_secret(config.api.token_file)
    base = base or "http://127.0.0.1:8081"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.get(base.rstrip("/") + path, headers=headers, timeout=10, trust_env=False)
    except httpx.HTTPError as exc:
        err.print(f"modelfleet: cannot reach the daemon API at {base}: {exc}", markup=False)
        raise SystemExit(EXIT_RUNTIME) from None
    if response.status_code != 200:
        err.print(f"modelfleet: {base}{path} answered {response.status_code}: {response.text[:300]}", markup=False)
        raise SystemExit(EXIT_RUNTIME)
    data: dict[str, object] = response.json()
    return data


_STATE_STYLE = {"success": "green", "pending": "yellow", "failure": "red", "error": "red"}


def cmd_status(args: argparse.Namespace) -> int:
    from rich.table import Table

    data = _api_get(args, "/api/v1/status")
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    revision = str(data.get("revision") or "-")
    applied = str(data.get("lastAppliedRevision") or "-")
    out.print(f"revision {revision[:12]} (last applied {applied[:12]})")
    if data.get("sourceError"):
        out.print(f"[red]source error:[/red] {data['sourceError']}")
    for error in data.get("errors") or []:  # type: ignore[attr-defined]
        out.print(f"[red]error:[/red] {error}")
    table = Table()
    for column in ("model", "environment", "state", "ready", "hosts", "message"):
        table.add_column(column)
    for d in data.get("deployments") or []:  # type: ignore[attr-defined]
        style = _STATE_STYLE.get(d["state"], "")
        message = d["message"]
        limited = (d.get("tokens") or {}).get("limited")
        if limited:  # its requests are answered 429 now (maxToken policies)
            message = f"{message}; [yellow]429: {limited}[/yellow]"
        table.add_row(d["model"], d["environment"], f"[{style}]{d['state']}[/{style}]",
                      f"{d['ready_replicas']}/{d['desired_replicas']}", ", ".join(d["hosts"]), message)
    out.print(table)
    return EXIT_OK


def cmd_hosts(args: argparse.Namespace) -> int:
    from rich.markup import escape
    from rich.table import Table

    data = _api_get(args, "/api/v1/hosts")
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    table = Table()
    for column in ("host", "health", "location", "flavors", "capacity", "replicas"):
        table.add_column(column)
    for h in data.get("hosts") or []:  # type: ignore[attr-defined]
        health = "[green]up[/green]" if h["up"] else f"[red]{escape(h.get('state') or 'down')}[/red]"
        loc = h["location"]
        cap = h["capacity"]
        table.add_row(h["name"], health, f"{loc['name']} ({loc['country']}, {loc['continent']})",
                      ", ".join(h["flavors"]), f"{cap['cpus']:g} cpus / {format_memory(cap['memory'])}",
                      str(h["replicas"]))
    out.print(table)
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    # Generated from the models (a few ms), so it always matches this version's validation.
    from modelfleet.state.schema import render_manifest_schema

    text = render_manifest_schema()
    if args.output is None:
        sys.stdout.write(text)
        return EXIT_OK
    try:
        Path(args.output).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {args.output}: {exc.strerror}") from None
    return EXIT_OK


def _lazy(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """A command whose module (and its heavier imports) loads only when it runs."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        command: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(module), name)
        return command(args)

    return run


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "validate": cmd_validate,
    "plan": cmd_plan,
    "run": cmd_run,
    "gateway": cmd_gateway,
    "status": cmd_status,
    "hosts": cmd_hosts,
    "schema": cmd_schema,
    "upload": _lazy("modelfleet.reconciler.cli.upload", "cmd_upload"),
    "runtimes": _lazy("modelfleet.reconciler.cli.runtimes", "cmd_runtimes"),
    "release": _lazy("modelfleet.reconciler.cli.release", "cmd_release"),
    "confirm": _lazy("modelfleet.reconciler.cli.release", "cmd_confirm"),
    "events": _lazy("modelfleet.reconciler.cli.events", "cmd_events"),
    "logs": _lazy("modelfleet.reconciler.cli.logs", "cmd_logs"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """All commands; given the ``command`` about to run, only what parsing it needs."""
    parser = argparse.ArgumentParser(prog="modelfleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check the manifests of a repository; all errors at once")
    p.add_argument("repo", nargs="?", default=".", help="manifest repository (default: .)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("plan", help="show where each deployment would run and what would change")
    p.add_argument("repo", nargs="?", default=".", help="manifest repository (default: .)")
    p.add_argument("--config", required=True, help="daemon config (modelfleet.yaml) with the pool")
    p.add_argument("--offline", action="store_true", help="plan against an empty pool (no Docker calls)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--explain", action="store_true", help="show why each excluded host is excluded")
    p.add_argument("--ref", metavar="REF", help="plan REF (a branch, tag or commit) of the remote repository "
                                                "(repo.url), as the daemon plans a review branch")

    p = sub.add_parser("run", help="run the reconciler daemon (and, by default, a gateway child)")
    p.add_argument("--config", required=True, help="daemon config (modelfleet.yaml)")
    p.add_argument("--once", action="store_true", help="run one reconcile pass and exit")
    p.add_argument("-v", "--verbose", action="store_true")

    p = sub.add_parser("gateway", help="run the inference gateway (data plane) on gateway.listen")
    p.add_argument("--config", required=True, help="daemon config (modelfleet.yaml)")
    p.add_argument("-v", "--verbose", action="store_true")

    for verb, text in (("status", "show deployments and their state (from the daemon API)"),
                       ("hosts", "show the pool's hosts and their health (from the daemon API)")):
        p = sub.add_parser(verb, help=text)
        p.add_argument("--config", help="daemon config, to find the API address and token")
        p.add_argument("--api", help="API base URL (default: from --config, else http://127.0.0.1:8081)")
        p.add_argument("--json", action="store_true")

    p = sub.add_parser("events", help="show the daemon's recent passes and their actions; --follow prints new "
                                      "passes as they finish (from the daemon API)")
    p.add_argument("--config", help="daemon config, to find the API address and token")
    p.add_argument("--api", help="API base URL (default: from --config, else http://127.0.0.1:8081)")
    p.add_argument("--follow", "-f", action="store_true", help="keep polling (every second) and print each "
                                                                "pass once, as it finishes")
    p.add_argument("--json", action="store_true", help="one JSON object per pass and line, with its actions")

    from modelfleet.reconciler.cli.logs import add_logs_parser

    add_logs_parser(sub)

    p = sub.add_parser("schema", help="print the JSON Schema of the manifests (for editors)")
    p.add_argument("--output", "-o", metavar="FILE", help="write it to FILE instead of stdout")

    from modelfleet.reconciler.cli.release import add_release_parsers

    add_release_parsers(sub)

    if command in COMMANDS and command not in _HEAVY_PARSERS:
        # Defining upload/runtimes imports httpx, docker and rich.progress (~0.15 s): skipped when
        # another command runs (its own parser and messages stay the same).
        return parser
    from modelfleet.reconciler.cli.runtimes import add_runtimes_parser
    from modelfleet.reconciler.cli.upload import add_upload_parser

    add_upload_parser(sub)
    add_runtimes_parser(sub)
    return parser


_HEAVY_PARSERS = ("upload", "runtimes")


def _command_in(argv: Sequence[str]) -> str | None:
    """The command name in ``argv`` (the main parser has no options but -h)."""
    return argv[0] if argv and not argv[0].startswith("-") else None


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_in(argv))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        err.print(f"modelfleet: {exc}", markup=False)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
