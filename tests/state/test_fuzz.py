"""Fuzzing: whatever is in the repository, loading and planning never raise; they report
ManifestErrors that name a file of the tree (and a line when the file could be parsed)."""

from __future__ import annotations

import copy
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelfleet.reconciler.config import ConfigError, parse_config
from modelfleet.state.desired import compute_desired
from modelfleet.state.errors import ManifestError
from modelfleet.state.loader import load_tree
from modelfleet.state.plan import diff
from tests.state.helpers import examples, fixture_pool, mirror

FUZZ = settings(max_examples=examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow])
HOSTS = fixture_pool()
API = "modelfleet.dev/v1alpha1"

VALID: list[dict[str, Any]] = [
    {"apiVersion": API, "kind": "Policy", "metadata": {"name": "eu"},
     "spec": {"type": "location", "locations": [{"type": "continent", "name": "EU"}]}},
    {"apiVersion": API, "kind": "Policy", "metadata": {"name": "modern"},
     "spec": {"type": "flavor", "flavors": [{"type": "cpu", "name": "amd-genoa"}]}},
    {"apiVersion": API, "kind": "Environment", "metadata": {"name": "production"},
     "spec": {"policies": ["eu", "modern"]}},
    {"apiVersion": API, "kind": "Environment", "metadata": {"name": "development"}, "spec": {"policies": []}},
    {"apiVersion": API, "kind": "Model", "metadata": {"name": "echo", "labels": {"team": "a"}},
     "spec": {"deployments": [
         {"environment": "production", "replicas": 2, "flavors": ["amd-genoa"],
          "runtime": {"type": "custom", "image": "x:1", "port": 8080, "env": {"A": "1"},
                      "resources": {"cpus": 0.5, "memory": "256Mi"},
                      "readinessProbe": {"path": "/ping", "period": "200ms"}}},
         {"environment": "development", "enabled": False, "policies": ["eu"],
          "origin": {"huggingface": {"model": "org/name", "revision": "main"}}},
     ]}},
    {"apiVersion": API, "kind": "Model", "metadata": {"name": "sentiment"},
     "spec": {"deployments": [
         {"environment": "development", "origin": {"file": {"path": "m.mar"}},
          "serverless": {"minReplicas": 0, "maxReplicas": 2, "scaleDownDelay": "5m"}}]}},
]
KEYS = sorted({"apiVersion", "kind", "metadata", "name", "labels", "spec", "type", "locations", "flavors",
               "policies", "deployments", "environment", "enabled", "origin", "huggingface", "file", "path",
               "sha256", "runtime", "image", "args", "env", "port", "resources", "cpus", "memory", "replicas",
               "serverless", "minReplicas", "maxReplicas", "readinessProbe", "maxTokens", "<<"})
WORDS = ["Model", "Policy", "Environment", API, "production", "development", "eu", "modern", "custom", "torch",
         "location", "flavor", "maxToken", "country", "continent", "cpu", "gpu", "EU", "amd-genoa", "512Mi",
         "9" * 400 + "Gi", "1e999", "-1", "0.1", "500m", "30s", "1h30m", "", " ", "m.mar", "../x", "/abs",
         "sha256:" + "a" * 64, "Bad_Name", "a" * 70, "\x00", "\u2028", "caf\u00e9"]

leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(WORDS),
)
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=3),
                      max_leaves=10)


def check(files: dict[str, bytes]) -> None:
    """The invariant: load, resolve, place and diff without raising; every error is located."""
    catalog = load_tree(files)
    desired = compute_desired(catalog, HOSTS, "rev")
    for error in desired.errors:
        assert isinstance(error, ManifestError)
        assert error.file in files
        assert isinstance(error.line, int) and error.line >= 0
        assert str(error).startswith(error.file)
    # Whatever the repo holds, planning the desired state against itself is a fixed point.
    assert diff(desired, mirror(desired)) == []
    # The frozen deployments get nothing; the others are placed on eligible hosts only.
    for replica in desired.replicas:
        state = desired.deployments[replica.key]
        assert not state.errors and replica.host in state.eligible_hosts


@FUZZ
@given(st.binary(max_size=400))
def test_arbitrary_bytes(raw: bytes) -> None:
    check({"models/x.yaml": raw})


@FUZZ
@given(st.text(max_size=400))
def test_arbitrary_text(text: str) -> None:
    check({"models/x.yaml": text.encode("utf-8", "surrogatepass")})


TOKENS = ["apiVersion: modelfleet.dev/v1alpha1\n", "kind: Model\n", "kind: Policy\n", "kind: Environment\n",
          "metadata:", " {name: m}", "name: x\n", "spec:", "deployments:", "\n", "  ", "- ", "environment: ",
          "production", "[", "]", "{", "}", ", ", ": ", "&a ", "*a", "*b", "<<: ", "!!binary ", "!!int ",
          "!!python/object:os.system ", "!!set ", "? ", "|\n", ">\n", "'", '"', "#", "---\n", "...\n", "%YAML 1.1\n",
          "\t", ".inf", ".nan", "~", "2001-12-14", "0x1F", "1e999", "9" * 30, "yes", "replicas: ", "runtime: "]


@FUZZ
@given(st.lists(st.sampled_from(TOKENS), max_size=40).map("".join))
def test_yaml_shaped_noise(text: str) -> None:
    check({"m.yaml": text.encode()})


def _mutate(data: st.DataObject, doc: Any) -> Any:
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, 3))):
        parent: Any = None
        key: Any = None
        node = doc
        while isinstance(node, dict | list) and node and data.draw(st.booleans()):
            parent = node
            key = data.draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
            node = node[key]
        op = data.draw(st.sampled_from(["set", "delete", "add"]))
        if parent is None:
            if op == "set":
                doc = data.draw(values)
            continue
        if op == "set":
            parent[key] = data.draw(values)
        elif op == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[data.draw(st.sampled_from(KEYS))] = data.draw(values)
        else:
            parent.append(data.draw(values))
    return doc


@FUZZ
@given(st.data())
def test_mutated_manifests(data: st.DataObject) -> None:
    docs = [_mutate(data, d) if data.draw(st.booleans()) else d for d in VALID]
    split = data.draw(st.integers(0, len(docs)))
    files = {
        "a.yaml": yaml.safe_dump_all(docs[:split]).encode(),
        "b.yaml": yaml.safe_dump_all(docs[split:]).encode(),
        "m.mar": b"PK\x03\x04",
    }
    check(files)


def test_the_unmutated_fuzz_base_is_valid() -> None:
    catalog = load_tree({"a.yaml": yaml.safe_dump_all(VALID).encode(), "m.mar": b"PK"})
    assert catalog.all_errors() == []
    assert compute_desired(catalog, HOSTS, "rev").errors == []


CONFIG = {"repo": {"url": ".", "pollInterval": "30s"}, "stateDir": "/tmp/x",
          "pool": {"hosts": [{"name": "par-1", "url": "tcp://10.0.0.1:2375",
                              "location": {"name": "paris-1", "country": "FR", "continent": "EU"},
                              "flavors": [{"name": "amd-genoa", "type": "cpu"}],
                              "capacity": {"cpus": 8, "memory": "32Gi"}}]},
          "gateway": {"listen": "127.0.0.1:8080"}}


@settings(FUZZ, max_examples=examples(100))
@given(st.data())
def test_mutated_daemon_config(data: st.DataObject) -> None:
    text = yaml.safe_dump(_mutate(data, CONFIG))
    try:
        parse_config(text, "modelfleet.yaml")
    except ConfigError as exc:
        assert exc.errors and all(isinstance(e, ManifestError) and e.file == "modelfleet.yaml"
                                  for e in exc.errors)


def test_alias_expansion_bomb_is_an_error_not_a_hang() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]  # 10^9 leaves
    catalog = load_tree({"bomb.yaml": "\n".join(lines).encode()})
    [error] = catalog.all_errors()
    assert error.file == "bomb.yaml" and "alias" in error.message
    assert not catalog.complete


def test_recursive_alias_is_an_error() -> None:
    catalog = load_tree({"r.yaml": b"a: &a [*a]\n"})
    assert [e.file for e in catalog.all_errors()] == ["r.yaml"]
