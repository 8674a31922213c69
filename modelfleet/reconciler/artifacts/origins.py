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

from modelfleet.reconciler.artifacts.errors import InvalidArtifact
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
        commits: dict[tuple[str, str], str] = {}
        errors: dict[tuple[str, str], str] = {}
        metadata: dict[tuple[str, str], Mapping[str, object]] = {}
        missing: dict[str, str] = dict(file_errors or {})
        now = time.monotonic()
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
                known = self._resolve(*key)
                self._revisions[key] = known
            if known.commit is None:
                errors[key] = known.error or "cannot resolve"
                continue
            commits[key] = known.commit
            meta = self._metadata_of(key[0], known.commit)
            if meta is not None:
                metadata[key] = meta
        return OriginFacts(commits=commits, metadata=metadata, errors=errors, prefer_official=self.prefer_official,
                           file_errors=missing)

    def _resolve(self, model: str, revision: str) -> _Resolved:
        try:
            return _Resolved(self.hf.resolve(model, revision), None, time.monotonic())
        except ModelfleetError as exc:
            previous = self._revisions.get((model, revision))
            if previous is not None and previous.commit is not None:
                # The Hub is unreachable: keep deploying the commit we knew (say so in the log).
                log.warning("resolving %s@%s failed (%s); keeping commit %s", model, revision, exc,
                            previous.commit[:12])
                return _Resolved(previous.commit, None, time.monotonic())
            return _Resolved(None, f"cannot resolve revision {revision!r} of {model!r}: {exc}", time.monotonic())

    def _metadata_of(self, model: str, commit: str) -> Mapping[str, object] | None:
        key = (model, commit)
        if key not in self._metadata:
            try:
                self._metadata[key] = self.hf.model_metadata(model, commit)
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
