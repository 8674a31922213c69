"""Benchmark of the pure planning path: load_tree + compute_desired + diff.

Run on demand (not part of the test suite):

    .venv/bin/python benchmarks/bench_plan.py            # 1k / 10k / 50k deployments
    .venv/bin/python benchmarks/bench_plan.py --profile  # cProfile of one 10k run

A synthetic manifest tree is generated in memory (``path -> bytes``): 10 environments, 20 policies
(location and flavor), models of 5 deployments each (one per environment they use), and a pool of
100 hosts in 10 locations with 4 CPU flavors. The "actual" state given to ``diff`` is the desired
state itself, minus a few replicas and with a few stale ones (a realistic steady-state pass).

Targets: 10k deployments in <= 1 s; peak RSS of a 10k run <= 200 MB.
Baseline, measured in the same run: plain ``yaml.load`` (CSafeLoader) of the same tree.
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
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
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


def make_hosts() -> list[Host]:
    hosts = []
    for i in range(N_HOSTS):
        name, country, continent = LOCATIONS[i % len(LOCATIONS)]
        hosts.append({
            "name": f"host-{i:03d}", "url": f"tcp://10.0.{i // 250}.{i % 250 + 1}:2375",
            "location": {"name": name, "country": country, "continent": continent},
            "flavors": [{"name": FLAVORS[i % len(FLAVORS)], "type": "cpu"}],
            "capacity": {"cpus": 512, "memory": "2Ti"},
        })
    return list(Pool.model_validate({"hosts": hosts}).hosts)


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
    t10k = results[10_000]["total"]
    plan_mb = plan_kib * 1024 / 1e6
    print(f"targets: 10k in <= 1 s: {'OK' if t10k <= 1.0 else 'MISSED'} ({t10k:.3f} s); "
          f"peak RSS <= 200 MB: {'OK' if plan_mb <= 200 else 'MISSED'} ({plan_mb:.0f} MB)")
    print(f"load average {os.getloadavg()[0]:.1f} at end (timings on a busy machine are noisy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
