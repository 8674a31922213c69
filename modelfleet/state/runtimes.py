"""Which inference server runs a deployment, with what image, port, probe and resources.

Pure: from the manifest (and, when known, facts about the model) to a ResolvedRuntime.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from modelfleet.state.manifests import Deployment, Origin, ReadinessProbe, Runtime, RuntimeType

RUNTIME_IMAGE_VERSION = "0.1.0"

# Images of the runtimes we build ourselves (`modelfleet runtimes build`) and the official ones.
DEFAULT_IMAGES: dict[str, str] = {
    "torch": f"modelfleet/runtime-torch:{RUNTIME_IMAGE_VERSION}",
    "transformers": f"modelfleet/runtime-transformers:{RUNTIME_IMAGE_VERSION}",
    "tei": "ghcr.io/huggingface/text-embeddings-inference:cpu-1.5",
    "tgi": "ghcr.io/huggingface/text-generation-inference:2.4.0",
}
DEFAULT_PORTS: dict[str, int] = {"torch": 8080, "transformers": 8080, "tei": 80, "tgi": 80, "custom": 8080}
DEFAULT_PROBE_PATHS: dict[str, str] = {
    "torch": "/ping", "transformers": "/health", "tei": "/health", "tgi": "/health", "custom": "/",
}
# (cpus, memory bytes) when the manifest does not say.
DEFAULT_RESOURCES: dict[str, tuple[float, int]] = {
    "torch": (1.0, 2 * 2**30),
    "transformers": (1.0, 2 * 2**30),
    "tei": (1.0, 2 * 2**30),
    "tgi": (2.0, 8 * 2**30),
    "custom": (0.5, 256 * 2**20),
}
MODEL_MOUNT = "/model"


@dataclass(frozen=True)
class ResolvedProbe:
    path: str
    port: int
    initial_delay: float = 0.0
    period: float = 1.0
    timeout: float = 2.0
    failure_threshold: int = 3


@dataclass(frozen=True)
class ResolvedRuntime:
    type: RuntimeType
    image: str
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    port: int
    cpus: float
    memory: int
    probe: ResolvedProbe
    reason: str  # why this runtime (named in the manifest, or suggested from the origin)
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    # The torch runtime's batching (runtime.batchSize, runtime.maxBatchDelay in ms); None: not set in
    # the manifest (then not in the spec hash either, so existing deployments keep their hash).
    batch_size: int | None = None
    max_batch_delay_ms: int | None = None


EMBEDDING_TAGS = frozenset({"feature-extraction", "sentence-similarity"})
GENERATION_TAGS = frozenset({"text-generation", "text2text-generation", "conversational"})
DIFFUSION_TAGS = frozenset({"text-to-image", "image-to-image"})


def suggest_runtime(
    origin: Origin | None,
    metadata: Mapping[str, object] | None = None,
    prefer_official: bool = False,
) -> tuple[RuntimeType, str]:
    """The runtime for a manifest that names none, and why (shown by `plan`).

    ``metadata``: what the Hub says about the model (pipeline_tag, library_name). The official TEI/TGI
    images are suggested only when ``prefer_official`` (they must be reachable from the hosts);
    otherwise our transformers runtime serves the same APIs.
    """
    if origin is None:
        return "custom", "no origin"
    if origin.file is not None:
        return "torch", "origin is a model archive (.mar): TorchServe-compatible torch runtime"
    meta = metadata or {}
    tag, library = str(meta.get("pipeline_tag") or ""), str(meta.get("library_name") or "")
    what = ", ".join(f"{k} {v}" for k, v in (("library_name", library), ("pipeline_tag", tag)) if v)
    if library == "sentence-transformers" or tag in EMBEDDING_TAGS:
        if prefer_official:
            return "tei", f"embeddings model ({what}): text-embeddings-inference"
        return "transformers", f"embeddings model ({what}): transformers runtime (TEI-compatible /embed)"
    if tag in GENERATION_TAGS:
        if prefer_official:
            return "tgi", f"text-generation model ({what}): text-generation-inference"
        return "transformers", f"text-generation model ({what}): transformers runtime (/generate, /v1/chat)"
    if library == "diffusers" or tag in DIFFUSION_TAGS:
        return "transformers", f"diffusers model ({what}): transformers runtime (diffusers pipeline)"
    if what:
        return "transformers", f"HuggingFace model ({what}): transformers runtime"
    return "transformers", "origin is a HuggingFace model: transformers runtime"


def resolve_runtime(
    deployment: Deployment,
    hf_revision: str | None = None,
    metadata: Mapping[str, object] | None = None,
    prefer_official: bool = False,
) -> ResolvedRuntime:
    # A runtime block without a type (e.g. only resources) gets the suggestion an omitted block gets:
    # the same kind, reason and defaults, hence the same spec hash.
    runtime = deployment.runtime or Runtime()
    kind: RuntimeType
    if runtime.type is None:
        kind, reason = suggest_runtime(deployment.origin, metadata, prefer_official)
    else:
        kind, reason = runtime.type, "named in the manifest"
    port = runtime.port or DEFAULT_PORTS[kind]
    default_cpus, default_memory = DEFAULT_RESOURCES[kind]
    probe = runtime.readiness_probe or ReadinessProbe(path=DEFAULT_PROBE_PATHS[kind])
    args = tuple(runtime.args) if runtime.args is not None else _default_args(kind, deployment, hf_revision, port)
    return ResolvedRuntime(
        type=kind,
        image=runtime.image or DEFAULT_IMAGES[kind],
        args=args,
        env=tuple(sorted(runtime.env.items())),
        port=port,
        cpus=runtime.resources.cpus or default_cpus,
        memory=runtime.resources.memory or default_memory,
        probe=ResolvedProbe(
            path=probe.path,
            port=probe.port or port,
            initial_delay=probe.initial_delay,
            period=probe.period,
            timeout=probe.timeout,
            failure_threshold=probe.failure_threshold,
        ),
        reason=reason,
        batch_size=runtime.batch_size if kind == "torch" else None,
        max_batch_delay_ms=runtime.max_batch_delay_ms if kind == "torch" else None,
    )


def _default_args(kind: str, deployment: Deployment, hf_revision: str | None, port: int) -> tuple[str, ...]:
    origin = deployment.origin
    if kind in ("tei", "tgi") and origin is not None and origin.huggingface is not None:
        revision = hf_revision or origin.huggingface.revision
        return ("--model-id", MODEL_MOUNT, "--revision", revision, "--port", str(port))
    return ()
