"""Model origins and artifact shipping.

- ``store.ArtifactStore``: content-addressed files under ``<stateDir>/artifacts/sha256/<hex>``.
- ``mar.validate_mar``: TorchServe model archive checks (zip safety, manifest, handler).
- ``uploads.UploadManager``: resumable upload sessions (HTTP routes in reconciler/api_artifacts.py).
- ``huggingface.HuggingFaceResolver``: branch/tag → commit, snapshots, metadata for runtime choice.
- ``shipping.ArtifactShipper``: one read-only volume per host and content, mounted at /model.
"""

from modelfleet.reconciler.artifacts.errors import (
    ArtifactNotFound,
    InvalidArtifact,
    InvalidOrigin,
    OriginError,
    ShippingError,
)
from modelfleet.reconciler.artifacts.huggingface import HuggingFaceResolver
from modelfleet.reconciler.artifacts.mar import DEFAULT_LIMITS, MarInfo, MarLimits, validate_mar
from modelfleet.reconciler.artifacts.shipping import ArtifactShipper, artifact_id, model_binds, volume_name
from modelfleet.reconciler.artifacts.store import ArtifactStore, StoredArtifact, normalize_digest, reference
from modelfleet.reconciler.artifacts.uploads import UploadManager

__all__ = [
    "DEFAULT_LIMITS",
    "ArtifactNotFound",
    "ArtifactShipper",
    "ArtifactStore",
    "HuggingFaceResolver",
    "InvalidArtifact",
    "InvalidOrigin",
    "MarInfo",
    "MarLimits",
    "OriginError",
    "ShippingError",
    "StoredArtifact",
    "UploadManager",
    "artifact_id",
    "model_binds",
    "normalize_digest",
    "reference",
    "validate_mar",
    "volume_name",
]
