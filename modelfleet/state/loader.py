"""Load a manifest tree (path → bytes, from a directory or a Git commit) into a Catalog.

Every problem of the whole tree is collected, each with ``file:line: field: message (hint)``.
Errors stay local: a broken deployment invalidates that deployment, a broken Model that model;
everything else still loads.
"""

from __future__ import annotations

import difflib
import gc
import hashlib
import types
import typing
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from modelfleet.state.errors import ManifestError
from modelfleet.state.manifests import (
    API_VERSION,
    KINDS,
    MANIFEST_CLASSES,
    Deployment,
    Environment,
    ModelEnvelope,
    Policy,
)
from modelfleet.state.yaml_source import Document, Path, YamlSyntaxError, parse_documents

MANIFEST_SUFFIXES = (".yaml", ".yml")
MAX_MANIFEST_BYTES = 2**20  # a manifest larger than this is a mistake (e.g. a model file named .yaml)


class UnreadableFile(Exception):
    """Raised by a tree for a file it will not read (larger than a manifest may be, checked before
    reading): the loader reports it as that file's error, like a file that does not parse."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message, self.hint = message, hint


@dataclass(frozen=True)
class Source:
    """Where an object was declared: its file, its YAML document, and its path inside that."""

    file: str
    doc: Document
    base: Path = ()

    def line(self, *path: str | int) -> int:
        return self.doc.line_of((*self.base, *path))

    def error(self, path: tuple[str | int, ...], message: str, hint: str = "") -> ManifestError:
        return ManifestError(self.file, self.line(*path), format_path((*self.base, *path)), message, hint)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line()}"


@dataclass
class DeploymentEntry:
    model: str
    environment: str
    index: int
    source: Source
    spec: Deployment | None  # None when the deployment itself failed validation
    errors: list[ManifestError] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str]:
        return (self.model, self.environment)

    @property
    def valid(self) -> bool:
        return self.spec is not None and not self.errors


@dataclass
class ModelEntry:
    name: str
    source: Source
    labels: dict[str, str]
    deployments: list[DeploymentEntry]
    errors: list[ManifestError] = field(default_factory=list)


@dataclass
class Catalog:
    environments: dict[str, tuple[Environment, Source]] = field(default_factory=dict)
    policies: dict[str, tuple[Policy, Source]] = field(default_factory=dict)
    models: dict[str, ModelEntry] = field(default_factory=dict)
    # Errors we cannot pin on one model (syntax errors, unknown kinds, broken environments...).
    errors: list[ManifestError] = field(default_factory=list)
    # False when some file could not be read at all: then we cannot know which models it held,
    # so nothing may be pruned as "removed from Git" in this pass.
    complete: bool = True
    # Environments/policies that failed validation: their names are known, their content is not.
    broken_environments: set[str] = field(default_factory=set)
    broken_policies: set[str] = field(default_factory=set)
    # sha256 of each model file that an origin.file.path names and the tree holds.
    artifact_digests: dict[str, str] = field(default_factory=dict)

    def all_errors(self) -> list[ManifestError]:
        found = list(self.errors)
        for model in self.models.values():
            found.extend(model.errors)
            for deployment in model.deployments:
                found.extend(deployment.errors)
        return sorted(set(found))

    def deployments(self) -> list[DeploymentEntry]:
        return [d for name in sorted(self.models) for d in self.models[name].deployments]


def format_path(path: tuple[str | int, ...]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


# --- pydantic errors → ManifestError ------------------------------------------------------------


def _unwrap(annotation: Any) -> list[Any]:
    """The classes an annotation may hold (through Optional, list[], dict[], Annotated)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [c for arg in typing.get_args(annotation) for c in _unwrap(arg)]
    if origin in (list, tuple, set):
        return [c for arg in typing.get_args(annotation) for c in _unwrap(arg)]
    if origin is dict:
        return _unwrap(typing.get_args(annotation)[1])
    return [annotation]


def _model_at(root: type[BaseModel], loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    current: type[BaseModel] | None = root
    for part in loc:
        if current is None:
            return None
        if isinstance(part, int):
            continue
        by_alias = {(f.alias or name): f for name, f in current.model_fields.items()}
        info = by_alias.get(part)
        if info is None:
            return None
        nested = [c for c in _unwrap(info.annotation) if isinstance(c, type) and issubclass(c, BaseModel)]
        current = nested[0] if nested else None
    return current


def _field_names(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def pydantic_errors(
    exc: ValidationError, model: type[BaseModel], source: Source
) -> list[ManifestError]:
    found = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if isinstance(p, str | int))
        kind = err["type"]
        message = str(err["msg"])
        hint = ""
        if kind == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            allowed = _field_names(parent) if parent else []
            message = f"unknown field {loc[-1]!r}"
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            if close:
                hint = f"did you mean {close[0]!r}?"
            elif allowed:
                hint = "allowed: " + ", ".join(allowed)
        elif kind == "missing":
            message = "required field is missing"
        elif kind == "literal_error":
            expected = err.get("ctx", {}).get("expected", "")
            message = f"{err.get('input')!r} is not allowed"
            hint = f"use one of {expected}"
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        found.append(source.error(loc, message, hint))
    return found


# --- loading ------------------------------------------------------------------------------------


def is_manifest_path(path: str) -> bool:
    parts = path.split("/")
    return path.endswith(MANIFEST_SUFFIXES) and not any(p.startswith(".") for p in parts[:-1])


def _looks_like_manifest(data: Any) -> bool:
    """Documents that are not ours (CI files, the daemon config...) are skipped, not rejected."""
    if not isinstance(data, dict):
        return False
    api = data.get("apiVersion")
    if isinstance(api, str):
        return api.split("/")[0] == API_VERSION.split("/")[0]
    return data.get("kind") in KINDS


def load_tree(files: Mapping[str, bytes]) -> Catalog:
    """Load every manifest of a tree. Pure: the caller reads the files (disk or Git)."""
    catalog = Catalog()
    with gc_paused():
        for path in sorted(files):
            if is_manifest_path(path):
                try:
                    raw = files[path]
                except UnreadableFile as exc:
                    catalog.errors.append(ManifestError(path, 0, "", exc.message, exc.hint))
                    catalog.complete = False
                    continue
                _load_file(catalog, path, raw)
    _check_references(catalog)
    _digest_artifacts(catalog, files)
    return catalog


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector around an allocation burst that creates no cycles.

    Parsing allocates millions of small containers (YAML nodes, dicts, path tuples); meanwhile the
    collector would run full passes over the whole heap and free nothing: ~40 % of load_tree at
    10k deployments. Reference counting still frees everything as usual.

    What the burst keeps (a catalog, a desired state) is long-lived: at the end it moves to the
    oldest generation at once. Left young, it would be walked by a generation-0, then a
    generation-1, then a full collection soon after (~0.3 s at 10k deployments, freeing nothing);
    in the oldest generation it is walked by full collections only, like any long-lived data.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            _promote_young_objects()
            gc.enable()


def _promote_young_objects() -> None:
    """Move every object of the young generations to the oldest one, without walking them.

    gc.freeze() moves all tracked objects to the permanent generation and gc.unfreeze() moves
    them back into the oldest one (both O(1)). Skipped when something else keeps objects frozen
    (a pre-fork server): unfreezing would release them.
    """
    if gc.get_freeze_count() == 0:
        gc.freeze()
        gc.unfreeze()


def _digest_artifacts(catalog: Catalog, files: Mapping[str, bytes]) -> None:
    for dep in catalog.deployments():
        origin = dep.spec.origin if dep.spec else None
        path = origin.file.path if origin and origin.file else None
        if path and path in files and path not in catalog.artifact_digests:
            catalog.artifact_digests[path] = hashlib.sha256(files[path]).hexdigest()


def _load_file(catalog: Catalog, path: str, raw: bytes) -> None:
    if len(raw) > MAX_MANIFEST_BYTES:
        catalog.errors.append(ManifestError(path, 0, "", "file is too large to be a manifest",
                                            f"keep manifests under {MAX_MANIFEST_BYTES // 2**20} MiB"))
        catalog.complete = False
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1  # the line of the first offending byte
        catalog.errors.append(ManifestError(path, line, "", f"not UTF-8 text ({exc.reason})",
                                            "save the file as UTF-8"))
        catalog.complete = False
        return
    try:
        documents = list(parse_documents(text))
    except YamlSyntaxError as exc:
        catalog.errors.append(ManifestError(path, exc.line, "", exc.message, "fix the YAML syntax"))
        catalog.complete = False
        return
    for doc in documents:
        if _looks_like_manifest(doc.data):
            _load_document(catalog, Source(path, doc))
        # Validated now: the catalog keeps the models and each Source its line index, not a
        # second copy of every manifest as plain data (a third of a loaded tree's objects).
        doc.data = None


def _load_document(catalog: Catalog, source: Source) -> None:
    data: dict[str, Any] = source.doc.data
    for dup_path, line in source.doc.duplicate_keys:
        catalog.errors.append(ManifestError(source.file, line, format_path(dup_path),
                                            "key appears twice", "keep one"))
    api, kind = data.get("apiVersion"), data.get("kind")
    if api != API_VERSION:
        catalog.errors.append(source.error(("apiVersion",), f"unsupported apiVersion {api!r}",
                                           f"use {API_VERSION}"))
        catalog.complete = False
        return
    if not isinstance(kind, str) or kind not in MANIFEST_CLASSES:
        close = difflib.get_close_matches(str(kind), KINDS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "use one of " + ", ".join(KINDS)
        catalog.errors.append(source.error(("kind",), f"unknown kind {kind!r}", hint))
        catalog.complete = False
        return
    cls = MANIFEST_CLASSES[kind]
    name = _name_of(data)
    try:
        obj = cls.model_validate(data)
    except ValidationError as exc:
        errors = pydantic_errors(exc, cls, source)
        if kind == "Model" and name is not None and name not in catalog.models:
            # Keep a shell of the model so its running deployments are known to be "invalid",
            # not "removed" (removal would tear down the last good state).
            catalog.models[name] = ModelEntry(name, source, {}, _raw_deployments(name, data, source),
                                              errors)
        else:
            catalog.errors.extend(errors)
            if kind == "Environment" and name:
                catalog.broken_environments.add(name)
            elif kind == "Policy" and name:
                catalog.broken_policies.add(name)
            elif name is None:
                catalog.complete = False
        return
    if isinstance(obj, Environment):
        _add_unique(catalog, catalog.environments, obj.metadata.name, (obj, source), source)
    elif isinstance(obj, Policy):
        _add_unique(catalog, catalog.policies, obj.metadata.name, (obj, source), source)
    elif isinstance(obj, ModelEnvelope):
        _add_model(catalog, obj, source)


def _name_of(data: dict[str, Any]) -> str | None:
    metadata = data.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    return name if isinstance(name, str) else None


def _raw_deployments(model: str, data: dict[str, Any], source: Source) -> list[DeploymentEntry]:
    """Best-effort (model, environment) pairs of an invalid Model, all marked invalid."""
    spec = data.get("spec")
    items = spec.get("deployments") if isinstance(spec, dict) else None
    entries = []
    for i, item in enumerate(items if isinstance(items, list) else []):
        env = item.get("environment") if isinstance(item, dict) else None
        if isinstance(env, str):
            entries.append(DeploymentEntry(model, env, i, Source(source.file, source.doc,
                                                                  ("spec", "deployments", i)), None))
    return entries


def _add_unique(catalog: Catalog, table: dict[str, Any], name: str, value: Any, source: Source) -> None:
    if name in table:
        first: Source = table[name][1]
        kind = source.doc.data.get("kind")
        catalog.errors.append(source.error(("metadata", "name"), f"duplicate {kind} {name!r}",
                                           f"first defined at {first.where}; rename or remove one"))
        return
    table[name] = value


def _add_model(catalog: Catalog, envelope: ModelEnvelope, source: Source) -> None:
    name = envelope.metadata.name
    if name in catalog.models:
        first = catalog.models[name].source
        catalog.errors.append(source.error(("metadata", "name"), f"duplicate Model {name!r}",
                                           f"first defined at {first.where}; rename or remove one"))
        return
    entry = ModelEntry(name, source, dict(envelope.metadata.labels), [])
    seen: dict[str, DeploymentEntry] = {}
    for i, raw in enumerate(envelope.spec.deployments):
        dep_source = Source(source.file, source.doc, ("spec", "deployments", i))
        env_name = raw.get("environment")
        try:
            spec: Deployment | None = Deployment.model_validate(raw)
            errors: list[ManifestError] = []
        except ValidationError as exc:
            spec, errors = None, pydantic_errors(exc, Deployment, dep_source)
        if not isinstance(env_name, str):
            entry.errors.extend(errors)
            continue
        deployment = DeploymentEntry(name, env_name, i, dep_source, spec, errors)
        if env_name in seen:
            first = seen[env_name].source
            entry.errors.append(dep_source.error(
                ("environment",), f"model {name!r} already has a deployment on environment {env_name!r}",
                f"first at {first.where}; a model has at most one deployment per environment"))
            continue
        seen[env_name] = deployment
        entry.deployments.append(deployment)
    catalog.models[name] = entry


def _check_references(catalog: Catalog) -> None:
    known_policies = sorted(set(catalog.policies) | catalog.broken_policies)
    known_envs = sorted(set(catalog.environments) | catalog.broken_environments)
    # Environments whose policies cannot all be resolved: their deployments cannot be placed.
    unresolved: dict[str, str] = {}
    for name, (env, source) in catalog.environments.items():
        for i, policy in enumerate(env.spec.policies):
            if policy in catalog.policies:
                continue
            unresolved.setdefault(name, policy)
            if policy not in catalog.broken_policies:
                catalog.errors.append(source.error(("spec", "policies", i), f"unknown policy {policy!r}",
                                                   _choices(policy, known_policies)))
    for model in catalog.models.values():
        for dep in model.deployments:
            if dep.spec is None:
                continue
            if dep.environment in unresolved:
                policy = unresolved[dep.environment]
                state = "invalid" if policy in catalog.broken_policies else "unknown"
                dep.errors.append(dep.source.error(
                    ("environment",), f"environment {dep.environment!r} refers to {state} policy {policy!r}",
                    "fix the Environment or Policy manifest first"))
            elif dep.environment not in catalog.environments:
                if dep.environment in catalog.broken_environments:
                    dep.errors.append(dep.source.error(
                        ("environment",), f"environment {dep.environment!r} is invalid",
                        "fix the Environment manifest first"))
                else:
                    dep.errors.append(dep.source.error(
                        ("environment",), f"unknown environment {dep.environment!r}",
                        _choices(dep.environment, known_envs)))
            for i, policy in enumerate(dep.spec.policies):
                if policy in catalog.broken_policies:
                    dep.errors.append(dep.source.error(("policies", i), f"policy {policy!r} is invalid",
                                                       "fix the Policy manifest first"))
                elif policy not in catalog.policies:
                    dep.errors.append(dep.source.error(("policies", i), f"unknown policy {policy!r}",
                                                       _choices(policy, known_policies)))


def _choices(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    return "known: " + ", ".join(known) if known else "none is defined"
