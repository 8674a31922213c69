"""HuggingFace origins: branch/tag → commit, commit → local snapshot, and facts for runtime choice.

An adapter over ``huggingface_hub`` (``HfApi.model_info`` and ``snapshot_download``) that
translates its errors into ours: ``InvalidOrigin`` (terminal: unknown model or revision, no access
with the configured token) and ``OriginError`` (transient: network, Hub 5xx, timeouts).

- Only the token given to the resolver is used (``integrations.huggingface.tokenFile``), never an
  ambient one from ``HF_TOKEN`` or ``~/.cache/huggingface``; it is never logged and never appears
  in an exception's text (messages are built here, scrubbed, and not chained).
- Offline (``HF_HUB_OFFLINE=1`` or ``offline=True``): revisions resolve from the cache's
  ``refs/<revision>`` files and snapshots come from the cache only.
- The cache is huggingface_hub's layout under ``cache_dir`` (``models--org--name/{refs,blobs,
  snapshots}``), e.g. ``<stateDir>/huggingface``. A snapshot that was downloaded completely is
  marked (``.modelfleet/complete/...``) so that asking again costs no network call.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import threading
from pathlib import Path
from typing import Any

from modelfleet.reconciler.artifacts.errors import InvalidOrigin, OriginError

log = logging.getLogger("modelfleet.artifacts.huggingface")

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_REF = re.compile(r"^[A-Za-z0-9._/-]{1,255}$")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


class HuggingFaceResolver:
    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        token: str | None = None,
        endpoint: str | None = None,
        *,
        offline: bool | None = None,
        timeout: float = 30.0,
        max_workers: int = 4,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.endpoint = endpoint.rstrip("/") if endpoint else None
        self.timeout = timeout
        self.max_workers = max_workers
        self._token = token or None
        self._offline = offline
        self._lock = threading.Lock()
        self._snapshot_locks: dict[tuple[str, str], threading.Lock] = {}

    def __repr__(self) -> str:  # never show the token
        return (f"HuggingFaceResolver(cache_dir={str(self.cache_dir)!r}, endpoint={self.endpoint!r}, "
                f"token={'set' if self._token else None}, offline={self.offline})")

    @property
    def offline(self) -> bool:
        if self._offline is not None:
            return self._offline
        return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))

    # --- public API -------------------------------------------------------------------------

    def resolve(self, model: str, revision: str = "main") -> str:
        """The 40-hex commit sha that ``revision`` (branch, tag or sha) of ``model`` points to now."""
        self._check_repo(model)
        revision = revision or "main"
        if _COMMIT.match(revision):
            return revision
        if not _REF.match(revision) or ".." in revision.split("/"):
            raise InvalidOrigin(f"HuggingFace revision {revision!r} of {model} is not a valid branch, tag or commit")
        if self.offline:
            commit = self._cached_ref(model, revision)
            if commit is None:
                raise InvalidOrigin(
                    f"HuggingFace model {model} revision {revision!r} is not in the cache ({self.cache_dir}) and "
                    "the Hub is offline (HF_HUB_OFFLINE=1): download it once online, or pin a commit sha")
            return commit
        info = self._call(model, revision, "resolve", lambda: self._api().model_info(
            model, revision=revision, timeout=self.timeout))
        sha = getattr(info, "sha", None)
        if not isinstance(sha, str) or not _COMMIT.match(sha):
            raise OriginError(f"the Hub answered no commit sha for {model} revision {revision!r}")
        self._write_ref(model, revision, sha)
        return sha

    def last_resolved(self, model: str, revision: str) -> str | None:
        """The commit ``revision`` of ``model`` resolved to the last time the Hub answered (kept in
        the cache's ``refs/``, so it survives a restart); None if never. No network."""
        if _COMMIT.match(revision or ""):
            return revision
        if not _REF.match(revision or "") or ".." in revision.split("/") or not _REPO_ID.match(model or ""):
            return None
        return self._cached_ref(model, revision)

    def snapshot(self, model: str, commit: str) -> Path:
        """Local directory with every file of ``model`` at ``commit`` (downloaded once, then cached)."""
        self._check_repo(model)
        if not _COMMIT.match(commit or ""):
            raise InvalidOrigin(f"snapshot of {model} needs a 40-hex commit sha, got {commit!r} (resolve it first)")
        marker = self._complete_marker(model, commit)
        folder = self._snapshot_dir(model, commit)
        if marker.exists() and folder.is_dir():
            return folder
        with self._snapshot_lock(model, commit):
            if marker.exists() and folder.is_dir():
                return folder
            from huggingface_hub import snapshot_download

            if not self.offline:
                # One plain request first: a Hub that is down (or a token without access) fails
                # here at once, where snapshot_download's listing would retry for ~25 s.
                self._call(model, commit, "download", lambda: self._api().model_info(
                    model, revision=commit, timeout=self.timeout))
            path = self._call(model, commit, "download", lambda: snapshot_download(
                model, revision=commit, cache_dir=str(self.cache_dir), token=self._token or False,
                endpoint=self.endpoint, local_files_only=self.offline, max_workers=self.max_workers,
                tqdm_class=_silent_tqdm()))
            result = Path(path)
            if not self.offline:  # a cache-only answer may be partial: don't mark it complete
                marker.parent.mkdir(parents=True, exist_ok=True)
                _atomic_write(marker, commit + "\n")
            return result

    def model_metadata(self, model: str, commit: str) -> dict[str, Any]:
        """Facts to suggest a runtime: ``pipeline_tag``, ``library_name``, ``architectures``,
        ``model_type``, ``tags``, ``sentence_transformers`` (and ``source``: hub or cache)."""
        self._check_repo(model)
        return self._with_local_files(self._hub_metadata(model, commit) if not self.offline else {}, model, commit)

    def kept_metadata(self, model: str, commit: str) -> dict[str, Any] | None:
        """``model_metadata`` from the Hub's answer kept on disk, without any network; None if none is kept."""
        if not _REPO_ID.match(model or "") or not _COMMIT.match(commit or ""):
            return None
        kept = self._kept_metadata(model, commit)
        return self._with_local_files(kept, model, commit) if kept is not None else None

    def _with_local_files(self, hub: dict[str, Any], model: str, commit: str) -> dict[str, Any]:
        meta: dict[str, Any] = {"pipeline_tag": None, "library_name": None, "architectures": [],
                                "model_type": None, "tags": [], "sentence_transformers": False, "source": "cache"}
        meta.update(hub)
        folder = self._snapshot_dir(model, commit) if _COMMIT.match(commit or "") else None
        if folder is not None and folder.is_dir():
            config_file = folder / "config.json"
            if config_file.is_file():
                try:
                    config = json.loads(config_file.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    config = {}
                if isinstance(config, dict):
                    meta["architectures"] = meta["architectures"] or list(config.get("architectures") or [])
                    meta["model_type"] = meta["model_type"] or config.get("model_type")
            if (folder / "modules.json").is_file() or (folder / "config_sentence_transformers.json").is_file():
                meta["sentence_transformers"] = True
                meta["library_name"] = meta["library_name"] or "sentence-transformers"
        if "sentence-transformers" in meta["tags"] or meta["library_name"] == "sentence-transformers":
            meta["sentence_transformers"] = True
        return meta

    # --- helpers ----------------------------------------------------------------------------

    def _hub_metadata(self, model: str, commit: str) -> dict[str, Any]:
        """What the Hub says about ``model`` at ``commit``, kept on disk: when the Hub cannot be
        reached later (a restart during an outage) the answer kept is used, so that the runtime
        chosen from it, hence the spec hash, does not change with the Hub's availability."""
        kept = self._metadata_file(model, commit) if _COMMIT.match(commit or "") else None
        try:
            info = self._call(model, commit, "read metadata of", lambda: self._api().model_info(
                model, revision=commit, timeout=self.timeout))
        except OriginError:
            data = self._kept_metadata(model, commit) if kept is not None else None
            if data is None:
                raise
            log.info("the Hub is unreachable: using the metadata of %s@%s kept from its last answer",
                     model, commit[:12])
            return data
        config = getattr(info, "config", None) or {}
        answer: dict[str, Any] = {"source": "hub", "pipeline_tag": getattr(info, "pipeline_tag", None),
                                  "library_name": getattr(info, "library_name", None),
                                  "tags": list(getattr(info, "tags", None) or [])}
        if isinstance(config, dict):
            answer["architectures"] = list(config.get("architectures") or [])
            answer["model_type"] = config.get("model_type")
        if kept is not None:
            try:
                kept.parent.mkdir(parents=True, exist_ok=True)
                _atomic_write(kept, json.dumps(answer, default=str))
            except (OSError, TypeError, ValueError) as exc:
                log.warning("cannot keep the metadata of %s@%s: %s", model, commit[:12], exc)
        return answer

    def _kept_metadata(self, model: str, commit: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self._metadata_file(model, commit).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _metadata_file(self, model: str, commit: str) -> Path:
        return self.cache_dir / ".modelfleet" / "metadata" / model.replace("/", "--") / f"{commit}.json"

    def _api(self) -> Any:
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=self._token or False,
                     library_name="modelfleet", library_version="0.1")

    def _check_repo(self, model: str) -> None:
        if not isinstance(model, str) or not _REPO_ID.match(model) or ".." in model:
            raise InvalidOrigin(f"{model!r} is not a HuggingFace model id (use org/name)")

    def _repo_dir(self, model: str) -> Path:
        return self.cache_dir / ("models--" + model.replace("/", "--"))

    def _snapshot_dir(self, model: str, commit: str) -> Path:
        return self._repo_dir(model) / "snapshots" / commit

    def _complete_marker(self, model: str, commit: str) -> Path:
        return self.cache_dir / ".modelfleet" / "complete" / model.replace("/", "--") / commit

    def _cached_ref(self, model: str, revision: str) -> str | None:
        try:
            value = (self._repo_dir(model) / "refs" / revision).read_text(encoding="utf-8").strip()
        except OSError:
            return None
        return value if _COMMIT.match(value) else None

    def _write_ref(self, model: str, revision: str, commit: str) -> None:
        """Remember the answer like huggingface_hub does, for offline resolution later."""
        if self._cached_ref(model, revision) == commit:
            return
        path = self._repo_dir(model) / "refs" / revision
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(path, commit)
        except OSError as exc:
            log.warning("cannot record %s@%s in the HuggingFace cache: %s", model, revision, exc.strerror)

    def _snapshot_lock(self, model: str, commit: str) -> threading.Lock:
        with self._lock:
            return self._snapshot_locks.setdefault((model, commit), threading.Lock())

    def _scrub(self, text: str) -> str:
        if self._token:
            text = text.replace(self._token, "***")
        return text

    def _call(self, model: str, revision: str, what: str, fn: Any) -> Any:
        """Run a huggingface_hub call; translate its errors (never chained: no token can leak)."""
        try:
            return fn()
        except Exception as exc:  # the adapter boundary: every library error becomes one of ours
            error = self._translate(exc, model, revision, what)
        raise error

    def _translate(self, exc: Exception, model: str, revision: str, what: str) -> Exception:
        from huggingface_hub.utils import (
            GatedRepoError,
            HfHubHTTPError,
            HFValidationError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        where = f"HuggingFace model {model} revision {revision!r}"
        detail = self._scrub(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
        token_hint = ("the configured token has no access" if self._token else
                      "private or gated models need integrations.huggingface.tokenFile")
        if isinstance(exc, GatedRepoError):
            return InvalidOrigin(f"{where}: gated model, access not granted ({token_hint})")
        if isinstance(exc, RepositoryNotFoundError):
            return InvalidOrigin(f"{where}: model not found or not accessible ({token_hint})")
        if isinstance(exc, RevisionNotFoundError):
            return InvalidOrigin(f"{where}: no such branch, tag or commit")
        if isinstance(exc, HFValidationError):
            return InvalidOrigin(f"{where}: invalid reference: {detail}")
        if isinstance(exc, HfHubHTTPError):
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status in (401, 403):
                return InvalidOrigin(f"{where}: the Hub refused access (HTTP {status}; {token_hint})")
            return OriginError(f"cannot {what} {where}: the Hub answered HTTP {status}: {detail}")
        if isinstance(exc, LocalEntryNotFoundError | OfflineModeIsEnabled) and self.offline:
            return InvalidOrigin(f"{where} is not (completely) in the cache {self.cache_dir} and the Hub is "
                                 "offline (HF_HUB_OFFLINE=1)")
        return OriginError(f"cannot {what} {where}: {detail}")


def _atomic_write(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


def _silent_tqdm() -> Any:
    """A tqdm class that never prints (a daemon's stderr is not a terminal for progress bars)."""
    from tqdm.auto import tqdm

    class Silent(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent
