"""Artifact identity: which model content a resolved origin is, as hosts label their copies.

A host keeps a model in a Docker volume labelled ``modelfleet.artifact=<id>``. The id is
``sha256:<hex>`` for a file origin and ``hf:<org/name>@<commit>`` for a HuggingFace snapshot, so
two deployments of the same content (the same .mar in two environments) share one copy per host.
Placement uses it to prefer hosts that already hold a model (no transfer before a start).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

LABEL_ARTIFACT = "modelfleet.artifact"

_DIGEST = re.compile(r"^(?:sha256:)?([0-9a-f]{64})$")


class UnresolvedArtifact(ValueError):
    """The origin does not (yet) name a content: no digest, no resolved commit, unknown kind."""


def normalize_digest(digest: str) -> str:
    """``sha256:<hex>`` or ``<hex>`` → ``<hex>`` (64 lowercase hex digits); ValueError otherwise."""
    match = _DIGEST.match(digest.strip()) if isinstance(digest, str) else None
    if match is None:
        raise ValueError(f"{digest!r} is not a sha256 digest (64 lowercase hex digits, optionally sha256:)")
    return match.group(1)


def artifact_id(origin: Mapping[str, object]) -> str:
    """The content id of a resolved origin: ``sha256:<hex>`` or ``hf:<org/name>@<commit>``."""
    file = origin.get("file")
    if isinstance(file, Mapping):
        digest = file.get("sha256")
        if not isinstance(digest, str):
            raise UnresolvedArtifact("file origin without a sha256 (commit the .mar or upload it and use sha256)")
        try:
            return "sha256:" + normalize_digest(digest)
        except ValueError as exc:
            raise UnresolvedArtifact(str(exc)) from None
    hf = origin.get("huggingface")
    if isinstance(hf, Mapping):
        commit = hf.get("commit")
        model = hf.get("model")
        if not isinstance(model, str) or not isinstance(commit, str) or len(commit) != 40:
            raise UnresolvedArtifact(f"HuggingFace origin {model!r} has no resolved commit yet")
        return f"hf:{model}@{commit}"
    raise UnresolvedArtifact(f"unknown origin {dict(origin)!r}: expected file or huggingface")


def known_artifact(origin: Mapping[str, object] | None) -> str | None:
    """``artifact_id``, or None for no origin or one that does not name a content yet."""
    if not origin:
        return None
    try:
        return artifact_id(origin)
    except UnresolvedArtifact:
        return None
