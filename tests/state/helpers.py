"""Small builders shared by the state/ tests: manifest trees, hosts, and observed replicas."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterable
from pathlib import Path

import yaml

from modelfleet.state.actual import ObservedReplica
from modelfleet.state.desired import DesiredReplica, DesiredState, compute_desired
from modelfleet.state.loader import Catalog, load_tree
from modelfleet.state.pool import Host, Pool

FIXTURES = Path(__file__).parent / "fixtures"


def examples(n: int) -> int:
    """Hypothesis examples for a property: ``n`` keeps the unit suite fast; MODELFLEET_HYPOTHESIS_SCALE=20
    runs a longer hunt."""
    return max(1, int(n * float(os.environ.get("MODELFLEET_HYPOTHESIS_SCALE", "1"))))
API = "apiVersion: modelfleet.dev/v1alpha1"


def fixture_tree(name: str) -> dict[str, bytes]:
    """A fixture repository (tests/state/fixtures/<name>/) as ``relative path -> bytes``."""
    root = FIXTURES / name
    assert root.is_dir(), f"no fixture {root}"
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def tree(**files: str | bytes) -> dict[str, bytes]:
    """An inline tree: ``tree(**{"models/a.yaml": "...yaml..."})``; str values are dedented."""
    return {path: body if isinstance(body, bytes) else textwrap.dedent(body).lstrip("\n").encode()
            for path, body in files.items()}


def fixture_pool() -> list[Host]:
    data = yaml.safe_load((FIXTURES / "pool.yaml").read_text())
    return list(Pool.model_validate(data).hosts)


def host(name: str, *, location: str = "paris-1", country: str = "FR", continent: str = "EU",
         flavors: Iterable[str] = ("amd-genoa",), cpus: float = 8, memory: str | int = "32Gi") -> Host:
    return Host.model_validate({
        "name": name,
        "location": {"name": location, "country": country, "continent": continent},
        "flavors": [{"name": f, "type": "gpu" if f.startswith("nvidia") else "cpu"} for f in flavors],
        "capacity": {"cpus": cpus, "memory": memory},
    })


def environment(name: str, *policies: str) -> str:
    return f"{API}\nkind: Environment\nmetadata: {{name: {name}}}\nspec:\n  policies: [{', '.join(policies)}]\n"


def custom_model(name: str, *deployments: str) -> str:
    """A Model whose deployments are given as YAML snippets (without the leading '- ')."""
    body = "".join("    - " + textwrap.indent(textwrap.dedent(d).strip(), "      ")[6:] + "\n"
                   for d in deployments)
    return f"{API}\nkind: Model\nmetadata: {{name: {name}}}\nspec:\n  deployments:\n{body}"


def echo_deployment(env: str, *, replicas: int = 1, image: str = "example/echo:1", extra: str = "") -> str:
    return (f"environment: {env}\nreplicas: {replicas}\n{extra}"
            f"runtime: {{type: custom, image: {image}, resources: {{cpus: 0.5, memory: 256Mi}}}}")


def observed(replica: DesiredReplica, *, container_id: str | None = None, host: str | None = None,
             spec_hash: str | None = None, running: bool | None = None,
             paused: bool | None = None) -> ObservedReplica:
    """What the pool reports for a container created from ``replica`` (optionally drifted); a
    standby of ``serverless.standby: paused`` is paused unless said otherwise."""
    where = host or replica.host
    cid = container_id or f"c-{replica.model}-{replica.environment}-{replica.index}-{where}"
    return ObservedReplica(
        host=where, container_id=cid, name=f"mf-{replica.environment}-{replica.model}-{replica.index}",
        model=replica.model, environment=replica.environment, index=replica.index,
        spec_hash=spec_hash or replica.spec_hash, revision=replica.revision,
        running=replica.running if running is None else running,
        paused=(not replica.running and replica.standby == "paused") if paused is None else paused,
    )


def mirror(desired: DesiredState) -> list[ObservedReplica]:
    """A pool that matches the plan exactly."""
    return [observed(r) for r in desired.replicas]


def desired_of(files: dict[str, bytes], hosts: list[Host], revision: str = "rev-1",
               **kwargs: object) -> tuple[Catalog, DesiredState]:
    catalog = load_tree(files)
    return catalog, compute_desired(catalog, hosts, revision, **kwargs)  # type: ignore[arg-type]
