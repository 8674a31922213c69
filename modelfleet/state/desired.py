"""Desired state: from a Catalog and the pool to the replicas that should run, and where.

Each deployment is resolved on its own (policies, flavors, runtime, spec hash), then all are placed
together. A deployment that has errors is *frozen*: it gets no desired replicas and the plan
leaves whatever it has running alone (the last good state stays).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from modelfleet.state.artifacts import known_artifact
from modelfleet.state.errors import ManifestError
from modelfleet.state.loader import Catalog, DeploymentEntry, gc_paused
from modelfleet.state.manifests import Deployment
from modelfleet.state.placement import Key, PlacementRequest, place
from modelfleet.state.policy import PolicyLayer, allowed_flavors, exclusion_reason
from modelfleet.state.pool import Host
from modelfleet.state.runtimes import ResolvedRuntime, resolve_runtime
from modelfleet.state.token_limits import TokenLimits, token_limits
from modelfleet.state.units import format_cpus, format_memory

STANDBY_STOPPED = "stopped"  # serverless.standby: a created container, no process
STANDBY_PAUSED = "paused"  # serverless.standby: started, loaded, frozen (docker pause)


@dataclass(frozen=True)
class DesiredReplica:
    model: str
    environment: str
    index: int
    host: str
    spec_hash: str
    revision: str
    running: bool
    runtime: ResolvedRuntime
    origin: dict[str, object] | None  # resolved origin (digest / HF commit), for the artifact shipper
    # What the replica is kept as while not running (serverless.standby): "stopped" (no process) or
    # "paused" (started, loaded, then frozen: docker pause). Not in the spec hash: switching only
    # stops or pauses the container, it is not replaced.
    standby: str = STANDBY_STOPPED

    @property
    def key(self) -> Key:
        return (self.model, self.environment)


@dataclass
class DeploymentState:
    """Everything plan/status need to explain one deployment."""

    model: str
    environment: str
    enabled: bool
    source: str  # file:line
    replicas: int = 0
    serverless: bool = False
    runtime: ResolvedRuntime | None = None
    spec_hash: str | None = None
    # Both may be shared between deployments that see the same hosts: treat them as read-only.
    eligible_hosts: list[str] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)  # host -> reason
    hosts: list[str] = field(default_factory=list)
    errors: list[ManifestError] = field(default_factory=list)
    # Scheduling problems are not manifest errors: the next pass may succeed (a host comes back).
    unschedulable: str | None = None
    # The origin as deployed: the HuggingFace commit a revision resolved to, the archive's sha256.
    origin: dict[str, object] | None = None
    # The maxToken policies of its environment and its own (None: no token limit).
    token_limits: TokenLimits | None = None

    @property
    def key(self) -> Key:
        return (self.model, self.environment)

    @property
    def frozen(self) -> bool:
        return bool(self.errors)


@dataclass
class DesiredState:
    revision: str
    replicas: list[DesiredReplica]
    deployments: dict[Key, DeploymentState]
    # Keys whose running replicas must not be touched (invalid manifests).
    frozen: set[Key]
    # Whether "absent from the catalog" can be trusted to mean "removed from Git".
    complete: bool
    errors: list[ManifestError]


_UNHASHED_RUNTIME_FIELDS = ("reason", "extra")
# Hashed only when set: a manifest without them keeps the hash it had before they existed.
_HASHED_WHEN_SET = ("batch_size", "max_batch_delay_ms")


def spec_hash(runtime: ResolvedRuntime, origin: Mapping[str, object] | None) -> str:
    """Hash of what changes the container: not replicas, placement, revision or policies.

    The material is the JSON of ``asdict(runtime)`` minus reason/extra (built by hand: ``asdict``
    deep-copies and was a fifth of compute_desired). It labels running containers, so it must
    never change by accident: tests pin the hashes of the examples.
    """
    # Every field of the runtime but reason/extra, and every field of its probe, read from the
    # instances' __dict__ (a frozen dataclass holds exactly its fields there): 3x getattr's speed.
    runtime_material: dict[str, object] = dict(vars(runtime))
    for name in _UNHASHED_RUNTIME_FIELDS:
        del runtime_material[name]
    for name in _HASHED_WHEN_SET:
        if runtime_material[name] is None:
            del runtime_material[name]
    runtime_material["probe"] = vars(runtime.probe)
    material = {"runtime": runtime_material, "origin": origin}
    blob = _HASH_ENCODER.encode(material).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# What json.dumps(material, sort_keys=True, separators=(",", ":"), default=str) uses, built once:
# json.dumps builds an encoder per call when given options (a tenth of spec_hash).
_HASH_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class OriginFacts:
    """Facts about HuggingFace origins, keyed by (model id, revision as written in the manifest)."""

    commits: Mapping[tuple[str, str], str] = field(default_factory=dict)
    metadata: Mapping[tuple[str, str], Mapping[str, object]] = field(default_factory=dict)
    errors: Mapping[tuple[str, str], str] = field(default_factory=dict)
    prefer_official: bool = False
    # Models committed in the repository (origin.file.path) that are not valid archives: path -> why.
    file_errors: Mapping[str, str] = field(default_factory=dict)
    # Keys of ``errors`` that are the Hub's (unreachable, failing), not the manifest's: retried every pass.
    unavailable: frozenset[tuple[str, str]] = frozenset()
    # The metadata a runtime is chosen from could not be read (the Hub is unreachable and no earlier
    # answer is kept): an error only for deployments that name no runtime type (their runtime, hence
    # spec hash, would change with the Hub's availability).
    metadata_errors: Mapping[tuple[str, str], str] = field(default_factory=dict)


_RETRIED = "the daemon asks the Hub again every pass"


def resolved_origin(
    deployment: Deployment,
    artifact_digests: Mapping[str, str],
    hf_commits: Mapping[tuple[str, str], str],
) -> dict[str, object] | None:
    origin = deployment.origin
    if origin is None:
        return None
    if origin.huggingface is not None:
        hf = origin.huggingface
        commit = hf_commits.get((hf.model, hf.revision))
        return {"huggingface": {"model": hf.model, "revision": hf.revision, "commit": commit}}
    assert origin.file is not None
    digest = origin.file.digest or artifact_digests.get(origin.file.path or "")
    return {"file": {"sha256": digest, "path": origin.file.path}}


def compute_desired(
    catalog: Catalog,
    hosts: Sequence[Host],
    revision: str,
    *,
    down_hosts: frozenset[str] = frozenset(),
    previous: Mapping[Key, Mapping[int, str]] | None = None,
    demand: Mapping[Key, int] | None = None,
    hf_commits: Mapping[tuple[str, str], str] | None = None,
    origin_facts: OriginFacts | None = None,
    artifacts: Mapping[str, frozenset[str]] | None = None,
) -> DesiredState:
    """Pure: catalog + pool (+ where replicas run now, + serverless demand) → desired replicas.

    ``hf_commits``/``origin_facts``: what the shell learnt about HuggingFace origins (the commit a
    revision resolves to, the model's metadata, or why it could not be resolved).
    ``artifacts``: the artifact ids each host holds (state/artifacts.py), for locality.
    """
    facts = origin_facts or OriginFacts(commits=dict(hf_commits or {}))
    with gc_paused():  # an allocation burst without cycles, like loading (see gc_paused)
        return _compute_desired(catalog, hosts, revision, down_hosts, previous, demand, facts, artifacts or {})


def _compute_desired(
    catalog: Catalog,
    hosts: Sequence[Host],
    revision: str,
    down_hosts: frozenset[str],
    previous: Mapping[Key, Mapping[int, str]] | None,
    demand: Mapping[Key, int] | None,
    facts: OriginFacts,
    artifacts: Mapping[str, frozenset[str]],
) -> DesiredState:
    states: dict[Key, DeploymentState] = {}
    requests: list[PlacementRequest] = []
    frozen: set[Key] = set()
    demand = demand or {}
    # Deployments with the same environment, policies, flavors and size see the same hosts:
    # evaluate the policies once per combination, not once per deployment and host.
    eligibility: dict[tuple[object, ...], tuple[list[str], dict[str, str]]] = {}
    policy_layers: dict[tuple[str, tuple[str, ...]], _Layers] = {}
    specs: dict[Key, Deployment] = {}  # of the deployments to place
    # The eligible hosts as a tuple, per shared eligible list (by id: the states keep them alive).
    eligible_tuples: dict[int, tuple[str, ...]] = {}
    holders = _holders(artifacts)
    for entry in catalog.deployments():
        state = _resolve(entry, catalog, hosts, down_hosts, facts, demand.get(entry.key, 0), eligibility,
                         policy_layers, len(previous.get(entry.key, ())) if previous else 0)
        states[state.key] = state
        if state.frozen:
            frozen.add(state.key)
            continue
        if state.runtime is None or not state.enabled:
            continue
        assert entry.spec is not None
        specs.setdefault(state.key, entry.spec)
        eligible = eligible_tuples.get(id(state.eligible_hosts))
        if eligible is None:
            eligible = eligible_tuples[id(state.eligible_hosts)] = tuple(state.eligible_hosts)
        requests.append(PlacementRequest(state.key, state.replicas, state.runtime.cpus,
                                         state.runtime.memory, eligible,
                                         warm=holders.get(known_artifact(state.origin) or "", frozenset()),
                                         prefer_warm=entry.spec.serverless is not None))
    for name, model in catalog.models.items():
        if model.errors:
            for dep in model.deployments:
                frozen.add((name, dep.environment))
            if not model.deployments:
                # We cannot tell which environments it had: freeze the whole model.
                frozen.add((name, "*"))

    placement = place(requests, hosts, previous)
    replicas: list[DesiredReplica] = []
    for key, assignment in sorted(placement.assignments.items()):
        state = states[key]
        state.hosts = [assignment[i] for i in sorted(assignment)]
        state.unschedulable = placement.unschedulable.get(key)
        spec = specs[key]
        assert state.runtime is not None and state.spec_hash is not None
        origin = state.origin  # resolved_origin(spec, ...), as _resolve computed it
        active = _active_replicas(spec, demand.get(key, 0))
        standby = spec.serverless.standby if spec.serverless is not None else STANDBY_STOPPED
        model_name, environment = key
        for index in sorted(assignment):
            replicas.append(DesiredReplica(model_name, environment, index, assignment[index], state.spec_hash,
                                           revision, index < active, state.runtime, origin, standby))
    # Errors found while resolving (a flavor the policies do not allow, a missing artifact) are
    # errors of the repository as much as syntax errors are: they make the plan invalid.
    errors = set(catalog.all_errors())
    for state in states.values():
        errors.update(state.errors)
    return DesiredState(revision, replicas, states, frozen, catalog.complete, sorted(errors))


def _holders(artifacts: Mapping[str, frozenset[str]]) -> dict[str, frozenset[str]]:
    """host -> artifact ids, inverted: artifact id -> the hosts that hold it."""
    holders: dict[str, set[str]] = {}
    for host, held in artifacts.items():
        for artifact in held:
            holders.setdefault(artifact, set()).add(host)
    return {artifact: frozenset(hosts) for artifact, hosts in holders.items()}


def _active_replicas(spec: Deployment, demand: int) -> int:
    if spec.serverless is None:
        return spec.desired_replicas
    return max(spec.serverless.min_replicas, min(demand, spec.serverless.max_replicas))


def _slots(spec: Deployment, placed: int = 0) -> int:
    """Containers to place. A serverless deployment keeps at least one (stopped) standby so a
    cold start is a container start, not an image pull and an artifact transfer; the ``placed``
    replicas it has now (up to maxReplicas) stay, stopped when not needed."""
    if spec.serverless is None:
        return spec.desired_replicas
    return max(spec.serverless.min_replicas, 1, min(placed, spec.serverless.max_replicas))


def _resolve(
    entry: DeploymentEntry,
    catalog: Catalog,
    hosts: Sequence[Host],
    down_hosts: frozenset[str],
    facts: OriginFacts,
    demand: int = 0,
    eligibility: dict[tuple[object, ...], tuple[list[str], dict[str, str]]] | None = None,
    policy_layers: dict[tuple[str, tuple[str, ...]], _Layers] | None = None,
    placed: int = 0,
) -> DeploymentState:
    spec = entry.spec
    # Errors of the Model itself (e.g. two deployments on one environment) invalidate, and so
    # freeze, each of its deployments: none may be changed from a manifest we could not read.
    state = DeploymentState(entry.model, entry.environment, bool(spec.enabled) if spec else False,
                            entry.source.where,
                            errors=[*entry.errors, *catalog.models[entry.model].errors])
    if spec is None or state.errors:
        if not state.errors:
            state.errors.append(entry.source.error((), "deployment is invalid"))
        return state
    layers_key = (entry.environment, tuple(spec.policies))
    found = policy_layers.get(layers_key) if policy_layers is not None else None
    if found is None:
        found = _policy_layers(catalog, entry.environment, spec.policies)
        if policy_layers is not None:
            policy_layers[layers_key] = found
    layers, dep_layer, allowed, state.token_limits = found

    # Requested flavors must be allowed by the policies: an error, never a silent fallback.
    for i, flavor in enumerate(spec.flavors):
        if allowed is not None and flavor not in allowed:
            owner = f'environment "{entry.environment}"'
            if dep_layer.of_type("flavor"):
                owner += " and the deployment"
            state.errors.append(entry.source.error(
                ("flavors", i), f'flavor "{flavor}" is not allowed by policies of {owner}',
                "allowed: " + ", ".join(sorted(allowed)) if allowed else "no flavor is allowed"))
    origin = spec.origin
    if origin is not None and origin.file is not None and origin.file.path is not None \
            and origin.file.path not in catalog.artifact_digests:
        state.errors.append(entry.source.error(("origin", "file", "path"),
                                               f"file {origin.file.path!r} is not in the repository",
                                               "commit the .mar or upload it and use sha256"))
    hf_commits = facts.commits
    hf_commit, metadata = None, None
    if origin is not None and origin.huggingface is not None:
        hf_key = (origin.huggingface.model, origin.huggingface.revision)
        hf_commit, metadata = hf_commits.get(hf_key), facts.metadata.get(hf_key)
        if hf_key in facts.errors:
            state.errors.append(entry.source.error(("origin", "huggingface"), facts.errors[hf_key],
                                                   _RETRIED if hf_key in facts.unavailable else
                                                   "check the model id, the revision and the daemon's HF token"))
        elif hf_key in facts.metadata_errors and (spec.runtime is None or spec.runtime.type is None):
            state.errors.append(entry.source.error(("origin", "huggingface"), facts.metadata_errors[hf_key],
                                                   _RETRIED + ", or name runtime.type"))
    if origin is not None and origin.file is not None:
        if origin.file.path is not None and origin.file.path in facts.file_errors:
            state.errors.append(entry.source.error(("origin", "file", "path"), facts.file_errors[origin.file.path],
                                                   "commit a valid .mar (torch-model-archiver) or upload one"))
        digest_key = f"sha256:{origin.file.digest}"
        if origin.file.digest is not None and digest_key in facts.file_errors:
            state.errors.append(entry.source.error(("origin", "file", "sha256"), facts.file_errors[digest_key],
                                                   "upload it with `modelfleet upload FILE.mar`"))
    if state.errors:
        return state
    runtime = resolve_runtime(spec, hf_commit, metadata, facts.prefer_official)
    state.runtime = runtime
    state.serverless = spec.serverless is not None
    # Serverless under demand needs more than its standby slot: place what should run. Replicas
    # that scaled down stay as stopped standbys (up to maxReplicas): the next scale-up is a start.
    state.replicas = max(_slots(spec, placed), _active_replicas(spec, demand)) if spec.enabled else 0
    state.origin = resolved_origin(spec, catalog.artifact_digests, hf_commits)
    state.spec_hash = spec_hash(runtime, state.origin)
    requested = frozenset(spec.flavors)
    cache_key = (*layers_key, requested, runtime.cpus, runtime.memory)
    cached = eligibility.get(cache_key) if eligibility is not None else None
    if cached is None:
        cached = _eligible_hosts(layers, requested, runtime, hosts, down_hosts)
        if eligibility is not None:
            eligibility[cache_key] = cached
    # Shared by every deployment with the same inputs (read-only; copying them cost ~20 MB at 10k).
    state.eligible_hosts, state.excluded = cached
    return state


# The policy layers of an (environment, deployment policies) pair, the deployment's layer alone,
# the flavors they allow (None: any) and their token limits (None: none).
_Layers = tuple[tuple[PolicyLayer, PolicyLayer], PolicyLayer, frozenset[str] | None, TokenLimits | None]


def _policy_layers(catalog: Catalog, environment: str, policies: Sequence[str]) -> _Layers:
    env, _ = catalog.environments[environment]
    env_layer = PolicyLayer(f'environment "{environment}"', tuple(catalog.policies[p][0] for p in env.spec.policies))
    dep_layer = PolicyLayer("the deployment", tuple(catalog.policies[p][0] for p in policies))
    layers = (env_layer, dep_layer)
    return layers, dep_layer, allowed_flavors(layers), token_limits(layers)


def _eligible_hosts(
    layers: Sequence[PolicyLayer],
    requested: frozenset[str],
    runtime: ResolvedRuntime,
    hosts: Sequence[Host],
    down_hosts: frozenset[str],
) -> tuple[list[str], dict[str, str]]:
    """Hosts that may run the deployment, and why each other host may not."""
    eligible: list[str] = []
    excluded: dict[str, str] = {}
    for host in hosts:
        reason = exclusion_reason(layers, host)
        if reason is None and requested and not (requested & host.flavor_names):
            reason = "does not offer requested flavor " + ", ".join(sorted(requested))
        if reason is None and host.name in down_hosts:
            reason = "host is down"
        if reason is None and (host.capacity.cpus < runtime.cpus or host.capacity.memory < runtime.memory):
            reason = (f"too small: needs {format_cpus(runtime.cpus)} cpus / {format_memory(runtime.memory)}, "
                      f"host has {host.capacity.describe()}")
        if reason is None:
            eligible.append(host.name)
        else:
            excluded[host.name] = reason
    return eligible, excluded


def reserved_capacity(desired: DesiredState, hosts: Sequence[Host]) -> dict[str, tuple[float, int]]:
    """Per host, the CPUs and memory (bytes) the placement reserves there: the runtime resources of
    every desired replica placed on it, running or a stopped standby (a standby keeps its room so
    that starting it never fails for capacity). Every host of the pool is in the result (0 when
    nothing is placed there). Replicas of frozen deployments are not desired, so not counted: the
    placement does not count them either."""
    cpus = {h.name: 0.0 for h in hosts}
    memory = {h.name: 0 for h in hosts}
    for replica in desired.replicas:
        if replica.host in cpus:
            cpus[replica.host] += replica.runtime.cpus
            memory[replica.host] += replica.runtime.memory
    return {name: (round(cpus[name], 6), memory[name]) for name in cpus}
