"""Origins at plan time: resolve HuggingFace revisions to commits (and read the model's metadata),
and put models committed in the repository into the artifact store.

The pure core gets only facts (OriginFacts); the network and the disk stay here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from modelfleet.reconciler.artifacts.errors import InvalidArtifact, OriginError
from modelfleet.reconciler.artifacts.huggingface import HuggingFaceResolver
from modelfleet.reconciler.artifacts.mar import validate_mar
from modelfleet.reconciler.artifacts.store import ArtifactStore
from modelfleet.reconciler.config import Config
from modelfleet.reconciler.errors import ModelfleetError
from modelfleet.reconciler.secrets import read_secret
from modelfleet.state.desired import OriginFacts
from modelfleet.state.loader import Catalog

log = logging.getLogger("modelfleet.origins")


@dataclass
class _Resolved:
    commit: str | None
    error: str | None
    at: float
    unavailable: bool = False  # the error is the Hub's (unreachable, 5xx): retried, not the manifest's
    stale: bool = False  # the commit is the last resolution: the Hub did not answer this time


@dataclass
class _Call:
    hub_down: str | None = None  # why, once a request to the Hub failed during this call of facts()


def huggingface_resolver(config: Config) -> HuggingFaceResolver:
    """The daemon's HuggingFace access: its cache under stateDir, its token, its endpoint."""
    hf = config.integrations.huggingface
    return HuggingFaceResolver(Path(config.state_dir) / "huggingface", token=read_secret(hf.token_file),
                               endpoint=hf.endpoint)


class OriginResolver:
    def __init__(self, resolver: HuggingFaceResolver, store: ArtifactStore, ttl: float = 30.0,
                 prefer_official: bool = False) -> None:
        self.hf = resolver
        self.store = store
        self.ttl = ttl  # how long a branch → commit answer is trusted (about one poll interval)
        self.prefer_official = prefer_official
        self._revisions: dict[tuple[str, str], _Resolved] = {}
        self._metadata: dict[tuple[str, str], Mapping[str, object]] = {}  # (model, commit) -> metadata

    def facts(self, catalog: Catalog, file_errors: Mapping[str, str] | None = None) -> OriginFacts:
        """What the plan needs to know about the catalog's origins. When the Hub cannot be reached,
        a revision keeps the commit it resolved to last (in memory, else the cache's ``refs/``, which
        survive restarts), and one that never resolved is an error of its deployment only; the Hub
        is asked once per call, not once per model, while it does not answer."""
        commits: dict[tuple[str, str], str] = {}
        errors: dict[tuple[str, str], str] = {}
        unavailable: set[tuple[str, str]] = set()
        metadata: dict[tuple[str, str], Mapping[str, object]] = {}
        metadata_errors: dict[tuple[str, str], str] = {}
        missing: dict[str, str] = dict(file_errors or {})
        now = time.monotonic()
        call = _Call()  # per call: passes and review plans call this from their own threads
        for entry in catalog.deployments():
            origin = entry.spec.origin if entry.spec else None
            if origin is not None and origin.file is not None and origin.file.digest is not None:
                if not self.store.has(origin.file.digest):
                    missing[f"sha256:{origin.file.digest}"] = (
                        f"artifact sha256:{origin.file.digest} has not been uploaded to this daemon")
                continue
            if origin is None or origin.huggingface is None:
                continue
            key = (origin.huggingface.model, origin.huggingface.revision)
            if key in commits or key in errors:
                continue
            known = self._revisions.get(key)
            if known is None or now - known.at > self.ttl:
                known = self._resolve(*key, call)
                self._revisions[key] = known
            if known.commit is None:
                errors[key] = known.error or "cannot resolve"
                if known.unavailable:
                    unavailable.add(key)
                continue
            commits[key] = known.commit
            meta = self._metadata_of(key[0], known.commit, call)
            if meta is not None:
                metadata[key] = meta
            elif call.hub_down is not None:
                metadata_errors[key] = (f"cannot read the metadata of {key[0]}@{known.commit[:12]} to choose its "
                                        f"runtime: hub unreachable ({call.hub_down}); the running version keeps "
                                        "running")
        return OriginFacts(commits=commits, metadata=metadata, errors=errors, prefer_official=self.prefer_official,
                           file_errors=missing, unavailable=frozenset(unavailable), metadata_errors=metadata_errors)

    def _resolve(self, model: str, revision: str, call: _Call) -> _Resolved:
        try:
            if call.hub_down is not None:
                raise OriginError(call.hub_down)  # not asked again during this call
            return _Resolved(self.hf.resolve(model, revision), None, time.monotonic())
        except OriginError as exc:  # transient: the Hub is unreachable or failing
            call.hub_down = call.hub_down or str(exc)
            previous = self._revisions.get((model, revision))
            known = previous.commit if previous is not None and previous.commit is not None else \
                self.hf.last_resolved(model, revision)
            if known is not None:
                # Keep deploying the commit it resolved to last (say so in the log, once per outage).
                level = logging.DEBUG if previous is not None and previous.stale else logging.WARNING
                log.log(level, "resolving %s@%s failed (%s); keeping commit %s, its last resolution", model,
                        revision, exc, known[:12])
                return _Resolved(known, None, time.monotonic(), stale=True)
            return _Resolved(None, f"cannot resolve {model}@{revision}: hub unreachable ({exc}); the running "
                             "version keeps running", time.monotonic(), unavailable=True)
        except ModelfleetError as exc:  # terminal: no such model or revision, no access
            return _Resolved(None, f"cannot resolve revision {revision!r} of {model!r}: {exc}", time.monotonic())

    def _metadata_of(self, model: str, commit: str, call: _Call) -> Mapping[str, object] | None:
        key = (model, commit)
        if key not in self._metadata:
            if call.hub_down is not None:  # only what was kept from an earlier answer
                kept = self.hf.kept_metadata(model, commit)
                if kept is not None:
                    self._metadata[key] = kept
                return kept
            try:
                self._metadata[key] = self.hf.model_metadata(model, commit)
            except OriginError as exc:  # the Hub failed and no answer of it is kept
                call.hub_down = str(exc)
                log.info("no metadata for %s@%s: %s", model, commit[:12], exc)
                return None
            except ModelfleetError as exc:
                log.info("no metadata for %s@%s: %s", model, commit[:12], exc)
                return None
        return self._metadata[key]

    def ingest_repository_files(self, catalog: Catalog, tree: Mapping[str, bytes]) -> dict[str, str]:
        """Models committed in the repository (origin.file.path) go into the artifact store, so they
        ship like uploads. Returns path → error for archives that are not valid."""
        problems: dict[str, str] = {}
        for path, digest in sorted(catalog.artifact_digests.items()):
            if self.store.has(digest):
                continue
            def check(tmp: Path, name: str = path) -> None:
                validate_mar(tmp, display_name=name)

            try:
                self.store.ingest([tree[path]], expected=digest, validate=check)
            except InvalidArtifact as exc:
                problems[path] = exc.message
            except (ModelfleetError, KeyError, OSError) as exc:
                problems[path] = str(exc)
        return problems
