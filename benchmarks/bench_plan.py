"""Benchmark of the pure planning path (load_tree + compute_desired + diff) and of `modelfleet plan`.

Run on demand (not part of the test suite):

    .venv/bin/python benchmarks/bench_plan.py            # 1k / 10k / 50k deployments, RSS, the CLI
    .venv/bin/python benchmarks/bench_plan.py --quick    # 1k / 10k, RSS, the CLI
    .venv/bin/python benchmarks/bench_plan.py --profile  # cProfile of one 10k run

A synthetic manifest tree is generated in memory (``path -> bytes``): 10 environments, 20 policies
(location and flavor), models of 5 deployments each (each in 5 of the environments), and a pool of
100 hosts in 10 locations with 4 CPU flavors. The "actual" state given to ``diff`` is the desired
state itself, minus a few replicas and with a few stale ones (a realistic steady-state pass).
For the CLI, the 10k tree (2,000 models x 5 environments) and a config with the 100 hosts are
written to a temporary directory and `modelfleet plan DIR --config CFG --offline --json` runs as a
subprocess: its wall time includes interpreter start, imports, reading the files and the JSON output.

Targets at 10k deployments: in-process load + desired + diff <= 1 s; the CLI <= 3x the parse
baseline; peak RSS of an in-process run <= 200 MB.
Baseline, measured in the same run: plain ``yaml.load`` (CSafeLoader, libyaml) of the same files.
Exit code: 0 all targets met, 1 a target missed, 3 the CLI failed.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modelfleet.state.actual import ObservedReplica
from modelfleet.state.desired import DesiredState, compute_desired
from modelfleet.state.loader import load_tree
from modelfleet.state.plan import Action, diff
from modelfleet.state.pool import Host, Pool

API = "apiVersion: modelfleet.dev/v1alpha1"
N_ENVIRONMENTS = 10
DEPLOYMENTS_PER_MODEL = 5
N_HOSTS = 100
LOCATIONS = [  # (name, country, continent)
    ("paris-1", "FR", "EU"), ("paris-2", "FR", "EU"), ("frankfurt-1", "DE", "EU"),
    ("amsterdam-1", "NL", "EU"), ("virginia-1", "US", "NA"), ("oregon-1", "US", "NA"),
    ("montreal-1", "CA", "NA"), ("tokyo-1", "JP", "AS"), ("singapore-1", "SG", "AS"),
    ("sydney-1", "AU", "OC"),
]
FLAVORS = ["intel-sapphire-rapids", "intel-icelake", "amd-genoa", "amd-milan"]


# --- synthetic inputs ---------------------------------------------------------------------------


def make_policies() -> dict[str, bytes]:
    """20 policies: 10 location (continent and country rules) and 10 flavor (subsets of FLAVORS)."""
    docs = []
    location_rules = [
        [("continent", "EU")], [("continent", "NA")], [("continent", "AS"), ("continent", "OC")],
        [("country", "US")], [("country", "FR"), ("country", "DE")], [("location", "paris-1")],
        [("continent", "EU"), ("country", "US")], [("country", "JP")], [("continent", "NA"), ("country", "NL")],
        [("location", "frankfurt-1"), ("location", "virginia-1")],
    ]
    for i, rules in enumerate(location_rules):
        items = "\n".join(f"    - {{type: {t}, name: {n}}}" for t, n in rules)
        docs.append(f"{API}\nkind: Policy\nmetadata: {{name: loc-{i}}}\nspec:\n  type: location\n"
                    f"  locations:\n{items}\n")
    for i in range(10):
        chosen = [FLAVORS[(i + k) % len(FLAVORS)] for k in range(1 + i % 3)]
        items = "\n".join(f"    - {{type: cpu, name: {f}}}" for f in chosen)
        docs.append(f"{API}\nkind: Policy\nmetadata: {{name: flv-{i}}}\nspec:\n  type: flavor\n"
                    f"  flavors:\n{items}\n")
    return {"policies/all.yaml": "---\n".join(docs).encode()}


def make_environments() -> dict[str, bytes]:
    files = {}
    for i in range(N_ENVIRONMENTS):
        # Most environments constrain both location and flavor; a few are open.
        policies = [] if i % 5 == 4 else [f"loc-{i % 3}", f"loc-{(i + 6) % 10}", f"flv-{i}"]
        files[f"environments/env-{i}.yaml"] = (
            f"{API}\nkind: Environment\nmetadata:\n  name: env-{i}\nspec:\n"
            f"  description: synthetic environment {i}\n  policies: [{', '.join(policies)}]\n"
        ).encode()
    return files


def make_model(index: int) -> bytes:
    lines = [
        API, "kind: Model", "metadata:", f"  name: model-{index}", f"  labels: {{team: team-{index % 17}}}",
        "spec:", f"  description: synthetic model {index}", "  deployments:",
    ]
    for d in range(DEPLOYMENTS_PER_MODEL):
        env = (index + d * 2) % N_ENVIRONMENTS
        lines += [f"    - environment: env-{env}", f"      enabled: {'false' if (index + d) % 23 == 0 else 'true'}"]
        if (index + d) % 4 == 0:
            lines.append("      policies: [loc-6]")  # narrows the environment
        kind = (index + d) % 3
        if kind == 0:
            lines += ["      origin:", f"        huggingface: {{model: org/model-{index}, revision: main}}",
                      "      runtime:", "        type: transformers",
                      "        resources: {cpus: 0.25, memory: 256Mi}"]
        elif kind == 1:
            digest = f"{index:032x}{d:032x}"
            lines += ["      origin:", f"        file: {{sha256: \"{digest}\"}}",
                      "      serverless: {minReplicas: 0, maxReplicas: 3, target: 4, scaleDownDelay: 5m}",
                      "      runtime:", "        type: torch", "        resources: {cpus: 0.25, memory: 256Mi}"]
        else:
            lines += ["      runtime:", "        type: custom", f"        image: registry.local/app-{index}:v{d}",
                      "        port: 8080", f"        env: {{VERSION: v{d}, MODEL: m{index}}}",
                      "        resources: {cpus: 0.1, memory: 64Mi}",
                      "        readinessProbe: {path: /ping, period: 200ms}"]
        lines.append(f"      replicas: {1 + (index + d) % 2}" if kind != 1 else "")
    return ("\n".join(line for line in lines if line) + "\n").encode()


def make_tree(n_deployments: int) -> dict[str, bytes]:
    tree = {**make_policies(), **make_environments()}
    for i in range(n_deployments // DEPLOYMENTS_PER_MODEL):
        tree[f"models/team-{i % 17}/model-{i}.yaml"] = make_model(i)
    tree["README.md"] = b"# synthetic manifest repo\n"
    return tree


def host_dicts() -> list[dict[str, object]]:
    """The pool as a config's ``pool.hosts`` (no host is ever contacted: addresses are made up)."""
    hosts: list[dict[str, object]] = []
    for i in range(N_HOSTS):
        name, country, continent = LOCATIONS[i % len(LOCATIONS)]
        hosts.append({
            "name": f"host-{i:03d}", "url": f"tcp://10.0.{i // 250}.{i % 250 + 1}:2375",
            "location": {"name": name, "country": country, "continent": continent},
            "flavors": [{"name": FLAVORS[i % len(FLAVORS)], "type": "cpu"}],
            "capacity": {"cpus": 512, "memory": "2Ti"},
        })
    return hosts


def make_hosts() -> list[Host]:
    return list(Pool.model_validate({"hosts": host_dicts()}).hosts)


def simulate_actual(desired: DesiredState) -> list[ObservedReplica]:
    """The pool as the last pass left it: every desired replica, but 1 % missing, 1 % stale."""
    actual = []
    for n, r in enumerate(desired.replicas):
        if n % 100 == 0:
            continue  # missing → create
        spec_hash = r.spec_hash if n % 100 != 1 else "0" * 16  # stale → replace
        actual.append(ObservedReplica(r.host, f"c{n:08d}", f"mf-{n}", r.model, r.environment, r.index,
                                      spec_hash, r.revision, r.running))
    return actual


# --- the measured pass --------------------------------------------------------------------------


class GcTimer:
    """Time spent in the cyclic garbage collector (it runs inside whichever step allocates)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start

    def __enter__(self) -> GcTimer:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


def plan_pass(tree: Mapping[str, bytes], hosts: list[Host],
              actual: list[ObservedReplica]) -> tuple[DesiredState, list[Action], dict[str, float]]:
    with GcTimer() as gc_timer:
        t0 = time.perf_counter()
        catalog = load_tree(tree)
        t1 = time.perf_counter()
        desired = compute_desired(catalog, hosts, "rev")
        t2 = time.perf_counter()
        actions = diff(desired, actual)
        t3 = time.perf_counter()
    return desired, actions, {"load": t1 - t0, "desired": t2 - t1, "diff": t3 - t2, "total": t3 - t0,
                              "gc": gc_timer.seconds}


def baseline_pass(tree: Mapping[str, bytes]) -> float:
    """Plain PyYAML (libyaml) parse of every manifest: the floor any loader pays."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    t0 = time.perf_counter()
    for path in sorted(tree):
        if path.endswith((".yaml", ".yml")):
            list(yaml.load_all(tree[path], Loader=loader))
    return time.perf_counter() - t0


def best_of(n: int, fn: Callable[[], dict[str, float]]) -> dict[str, float]:
    runs = []
    for _ in range(n):
        gc.collect()
        runs.append(fn())
    return min(runs, key=lambda r: r["total"])


def measure(n_deployments: int, repeats: int) -> dict[str, float]:
    tree = make_tree(n_deployments)
    hosts = make_hosts()
    desired, _, _ = plan_pass(tree, hosts, [])
    actual = simulate_actual(desired)
    n_dep, n_replicas = len(desired.deployments), len(desired.replicas)
    assert n_dep == n_deployments, (n_dep, n_deployments)
    assert not desired.errors, desired.errors[:3]
    del desired  # a pass keeps only what it observed, not the previous plan

    def once() -> dict[str, float]:
        _, actions, times = plan_pass(tree, hosts, actual)
        times["actions"] = len(actions)
        return times

    result = best_of(repeats, once)
    base = min(baseline_pass(tree) for _ in range(repeats))
    result.update(baseline=base, replicas=n_replicas, bytes=sum(len(v) for v in tree.values()))
    return result


# --- memory, in fresh subprocesses --------------------------------------------------------------


# Linux keeps ru_maxrss across exec, and subprocess spawns through vfork: a child started directly
# would report this (large) process's peak. A small launcher forks first, so the measured child
# starts from the launcher's few MiB.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable] + sys.argv[1:])
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def child_rss(mode: str, n_deployments: int) -> int:
    """ru_maxrss (KiB on Linux) of a fresh interpreter doing ``mode``."""
    argv = [sys.executable, "-c", _LAUNCHER, __file__, "--child", mode, "--size", str(n_deployments)]
    output = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return int(json.loads(output)["maxrss_kib"])


def run_child(mode: str, n_deployments: int) -> None:
    if mode == "plan":
        tree = make_tree(n_deployments)
        hosts = make_hosts()
        desired, _, _ = plan_pass(tree, hosts, [])
        plan_pass(tree, hosts, simulate_actual(desired))
    print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


# --- the CLI, as a subprocess -------------------------------------------------------------------


def write_repo(root: Path, tree: Mapping[str, bytes]) -> tuple[Path, Path]:
    """The tree as a manifest directory, and a daemon config with the pool (nothing is contacted)."""
    repo = root / "repo"
    for path, data in tree.items():
        target = repo / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    config = root / "modelfleet.yaml"
    config.write_text(yaml.safe_dump({"stateDir": str(root / "state"), "pool": {"hosts": host_dicts()}},
                                     sort_keys=False))
    return repo, config


def cli_argv(repo: Path, config: Path) -> list[str]:
    """`modelfleet plan` as users run it: the installed console script (else ``-m``)."""
    script = Path(sys.executable).with_name("modelfleet")
    head = [str(script)] if script.exists() else [sys.executable, "-m", "modelfleet.reconciler.cli"]
    return [*head, "plan", str(repo), "--config", str(config), "--offline", "--json"]


def wall(argv: list[str]) -> tuple[float, subprocess.CompletedProcess[bytes]]:
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, timeout=300, check=False)
    return time.perf_counter() - t0, done


def import_cost(argv: list[str], count: int = 6) -> list[tuple[str, float]]:
    """Import time of a command by top-level package (``-X importtime`` self times, summed; the
    standard library as one), in seconds, the largest first."""
    done = subprocess.run([sys.executable, "-X", "importtime", *argv], capture_output=True, text=True,
                          timeout=300, check=False)
    by_package: dict[str, float] = {}
    for line in done.stderr.splitlines():
        # "import time: self [us] | cumulative | name"
        parts = line.removeprefix("import time:").split("|")
        if len(parts) != 3 or not parts[0].strip().isdigit():
            continue
        root = parts[2].strip().split(".")[0]
        package = "stdlib" if root in sys.stdlib_module_names else root
        by_package[package] = by_package.get(package, 0.0) + int(parts[0]) / 1e6
    return sorted(by_package.items(), key=lambda item: -item[1])[:count]


@dataclass
class CliResult:
    seconds: list[float]  # wall time of each run
    parse: float  # median parse baseline, measured between the CLI runs
    imports: float  # median wall time of `python -c 'import modelfleet.reconciler.cli.main'`
    bare: float  # median wall time of `python -c pass`
    output_bytes: int
    deployments: int
    actions: int
    import_cost: list[tuple[str, float]]  # (package, seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


class CliFailed(Exception):
    pass


def measure_cli(tree: Mapping[str, bytes], runs: int) -> CliResult:
    """Median wall time of the CLI, and of the parse baseline measured between its runs."""
    with tempfile.TemporaryDirectory(prefix="bench-plan-") as tmp:
        repo, config = write_repo(Path(tmp), tree)
        argv = cli_argv(repo, config)
        _, first = wall(argv)  # warm-up: .pyc files, page cache
        if first.returncode != 0:
            raise CliFailed(f"exit code {first.returncode}:\n{first.stderr.decode(errors='replace')[-2000:]}")
        plan = json.loads(first.stdout)
        cli_times, parse_times, import_times, bare_times = [], [], [], []
        for _ in range(runs):
            parse_times.append(baseline_pass(tree))
            cli_times.append(wall(argv)[0])
            import_times.append(wall([sys.executable, "-c", "import modelfleet.reconciler.cli.main"])[0])
            bare_times.append(wall([sys.executable, "-c", "pass"])[0])
        plan_args = argv[argv.index("plan"):]
        imports = import_cost(["-c", "from modelfleet.reconciler.cli.main import main; "
                               f"main({plan_args!r})"])
    return CliResult(cli_times, statistics.median(parse_times), statistics.median(import_times),
                     statistics.median(bare_times), len(first.stdout), len(plan["deployments"]),
                     len(plan["actions"]), imports)


# --- main ---------------------------------------------------------------------------------------


def profile(n_deployments: int) -> None:
    tree = make_tree(n_deployments)
    hosts = make_hosts()
    desired, _, _ = plan_pass(tree, hosts, [])
    actual = simulate_actual(desired)
    prof = cProfile.Profile()
    prof.enable()
    plan_pass(tree, hosts, actual)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(35)
    print(buf.getvalue())
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
    print(buf.getvalue())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=["import", "plan"], help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=10_000, help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help="cProfile one 10k pass and exit")
    parser.add_argument("--quick", action="store_true", help="1k and 10k only")
    parser.add_argument("--cli-runs", type=int, default=5, help="runs of the CLI (median; default 5)")
    args = parser.parse_args()
    if args.child:
        run_child(args.child, args.size)
        return 0
    if args.profile:
        profile(args.size)
        return 0

    sizes = [(1_000, 3), (10_000, 3)] + ([] if args.quick else [(50_000, 1)])
    print(f"python {sys.version.split()[0]}, libyaml={'CSafeLoader' in dir(yaml)}, "
          f"{N_HOSTS} hosts, {N_ENVIRONMENTS} environments, 20 policies, "
          f"{DEPLOYMENTS_PER_MODEL} deployments per model; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    print(f"{'deployments':>11} {'replicas':>8} {'runs':>4} {'load s':>8} {'desired s':>9} {'diff s':>7} "
          f"{'total s':>8} {'(gc s)':>7} {'us/dep':>7} {'actions':>7} {'yaml s':>7} {'ours/yaml':>9}")
    results = {}
    for size, repeats in sizes:
        r = measure(size, repeats)
        results[size] = r
        print(f"{size:>11} {int(r['replicas']):>8} {repeats:>4} {r['load']:>8.3f} {r['desired']:>9.3f} "
              f"{r['diff']:>7.3f} {r['total']:>8.3f} {r['gc']:>7.3f} {r['total'] / size * 1e6:>7.1f} "
              f"{int(r['actions']):>7} "
              f"{r['baseline']:>7.3f} {r['total'] / r['baseline']:>9.2f}")
    print("(gc s) = time in the cyclic GC, already included in the steps (mostly in diff: the first"
          " collection after the paused load/desired walks every object the pass keeps)")
    if 50_000 in results:
        ratio = results[50_000]["total"] / results[10_000]["total"] / 5
        r50, r10 = results[50_000], results[10_000]
        no_gc = (r50["total"] - r50["gc"]) / (r10["total"] - r10["gc"]) / 5
        print(f"linearity: time(50k)/time(10k)/5 = {ratio:.2f} (1.00 = linear); without GC time {no_gc:.2f}")

    base_kib = child_rss("import", 10_000)
    plan_kib = child_rss("plan", 10_000)
    print(f"peak RSS (ru_maxrss, fresh subprocess): import only {base_kib / 1024:.1f} MiB; "
          f"10k plan (tree + two passes) {plan_kib / 1024:.1f} MiB "
          f"(+{(plan_kib - base_kib) / 1024:.1f} MiB, {plan_kib / base_kib:.2f}x import-only)")

    r10 = results[10_000]
    try:
        cli = measure_cli(make_tree(10_000), args.cli_runs)
    except CliFailed as exc:
        print(f"`modelfleet plan --offline --json` failed: {exc}")
        return 3
    print(f"\n10k deployments (2,000 models x 5 environments, {N_HOSTS} hosts):")
    print(f"  parse baseline, CSafeLoader over the same files: {r10['baseline']:.3f} s (best of "
          f"{sizes[1][1]}); {cli.parse:.3f} s (median, measured between the CLI runs)")
    print(f"  in-process: load {r10['load']:.3f} + desired {r10['desired']:.3f} + diff {r10['diff']:.3f} "
          f"= {r10['total']:.3f} s (gc {r10['gc']:.3f} of it), {r10['total'] / r10['baseline']:.2f}x parse")
    print(f"  CLI `modelfleet plan --offline --json`: median {cli.median:.3f} s of {len(cli.seconds)} "
          f"(min {min(cli.seconds):.3f}, max {max(cli.seconds):.3f}), {cli.median / cli.parse:.2f}x parse; "
          f"output {cli.output_bytes / 1e6:.1f} MB, {cli.deployments} deployments, {cli.actions} actions")
    print(f"    of which interpreter start {cli.bare:.3f} s (python -c pass) + imports "
          f"{cli.imports - cli.bare:.3f} s (python -c 'import modelfleet.reconciler.cli.main')")
    costly = ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, seconds in cli.import_cost)
    print(f"    what `plan --offline` imports (-X importtime, self time by package): {costly}")

    plan_mb = plan_kib * 1024 / 1e6
    checks = [
        ("10k in-process load + desired + diff <= 1 s", r10["total"] <= 1.0, f"{r10['total']:.3f} s"),
        ("10k CLI plan --offline --json <= 3x parse", cli.median <= 3 * cli.parse,
         f"{cli.median / cli.parse:.2f}x ({cli.median:.3f} s vs {cli.parse:.3f} s)"),
        ("10k peak RSS <= 200 MB", plan_mb <= 200, f"{plan_mb:.0f} MB"),
    ]
    print("\ntargets:")
    for label, ok, figure in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {label}: {figure}")
    print(f"load average {os.getloadavg()[0]:.1f} at end (timings on a busy machine are noisy)")
    return 0 if all(ok for _, ok, _ in checks) else 1

if __name__ == "__main__":
    sys.exit(main())
