"""HuggingFace model server (the ``transformers`` runtime): embeddings, classification, generation,
and diffusers pipelines, from a model snapshot mounted read-only at ``MODELFLEET_MODEL_DIR``
(default /model; the older ``MODEL_DIR`` still works). What the daemon says about the model
(``MODELFLEET_MODEL_ID``, ``MODELFLEET_HF_COMMIT``, ...) comes through ``modelfleet.runtimes.contract``.

Run inside the runtime image as ``python -m modelfleet.runtimes.transformers_server``. Offline
only: HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1 are set and everything loads with
``local_files_only=True``; nothing is ever downloaded.

The task comes from ``MODELFLEET_TASK`` (``embeddings``/``feature-extraction``/``sentence-similarity``,
``classification``/``text-classification``, ``generation``/``text-generation``, ``text-to-image``),
else from the snapshot: ``model_index.json`` -> diffusers; ``modules.json`` (sentence-transformers
layout) -> embeddings; ``config.json`` architectures ``*ForSequenceClassification`` ->
classification, ``*ForCausalLM``/``*LMHeadModel`` -> generation; the model card's
``pipeline_tag``; else embeddings (a bare encoder).

Endpoints (all on one port, default 8080):

    GET  /health                 200 {"status": "ok"} once loaded AND warm; 503 before / on failure
    GET  /info                   model id, task, dtype, limits, pooling, labels, ...; TEI's "model_sha"
                                 (the commit) and "modelfleet": which deployment and artifact this is
    GET  /v1/models              OpenAI-style model list
    POST /v1/embeddings          OpenAI: {"input": str|[str], "model"?, "encoding_format"?: "float"|"base64",
                                 "dimensions"?} -> {"object": "list", "data": [{"object": "embedding",
                                 "index", "embedding"}], "model", "usage"}
    POST /embed                  TEI: {"inputs": str|[str], "normalize"?: true, "truncate"?: true} -> [[...]]
    POST /classify, /predict     TEI: {"inputs": str|[str]|[[a, b]], "raw_scores"?: false}
                                 -> [{"label", "score"}] (sorted), a list of those for a list input
    POST /generate               TGI: {"inputs": str, "parameters"?: {max_new_tokens, temperature,
                                 top_p, top_k, do_sample, seed, stop, repetition_penalty,
                                 return_full_text, details}} -> {"generated_text", "details"?}
    POST /v1/chat/completions    OpenAI chat (the tokenizer's chat template, or a plain
                                 "role: content" template), "stream": true as server-sent events
    POST /v1/completions         OpenAI completions ({"prompt": str})
    POST /v1/images/generations  diffusers: {"prompt", "n"?, "size"?: "WxH", "num_inference_steps"?,
                                 "guidance_scale"?, "seed"?} -> {"created", "data": [{"b64_json"}]}

Embeddings follow sentence-transformers exactly for its layout: tokenization with padding and
``longest_first`` truncation at ``max_seq_length`` (sentence_bert_config.json), the pooling of
``1_Pooling/config.json`` (mean: attention-masked mean with the 1e-9 clamp; cls, max,
mean_sqrt_len, lasttoken), then L2 normalization when modules.json has a Normalize module.
``/embed`` normalizes by its ``normalize`` field (default true, as TEI); ``/v1/embeddings`` applies
the model's own pipeline (normalized when it has no modules.json).

Errors: OpenAI routes answer ``{"error": {"message", "type", "code"}}``, TEI/TGI routes
``{"error", "error_type"}``. Readiness: ``/health`` is 200 only after a warm-up call through the
model (``MODELFLEET_WARMUP=0``: after loading). Model calls run one at a time on a dedicated
thread; the event loop stays responsive. Once ready, one ``startup:`` log line says how long after
the process started and where the time went (import torch, import transformers, the model, the
warm-up); the garbage collector is paused meanwhile and what was loaded frozen
(``MODELFLEET_GC_FREEZE=0`` keeps it running; see ``_common.collector_paused``).
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import io
import json
import logging
import os
import re
import struct
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from modelfleet.runtimes import RUNTIME_VERSION, bert
from modelfleet.runtimes._common import (
    ENV_WARMUP,
    BodyTooLarge,
    ModelThread,
    Phase,
    QueueFull,
    Readiness,
    check_health,
    check_readable,
    configure_torch_threads,
    contract_from_env,
    env_bool,
    env_int,
    json_response,
    load_then_warm,
    read_body,
    run_server,
    set_offline,
    setup_logging,
)
from modelfleet.runtimes.contract import RuntimeEnvironment

log = logging.getLogger("modelfleet.runtime.transformers")

ENV_TASK = "MODELFLEET_TASK"
ENV_DTYPE = "MODELFLEET_DTYPE"  # float32 (default on CPU), bfloat16, float16
ENV_MAX_INPUTS = "MODELFLEET_MAX_CLIENT_BATCH"  # inputs per embeddings/classify request; default 256
ENV_BATCH_SIZE = "MODELFLEET_BATCH_SIZE"  # inputs per forward pass; default 32
ENV_MAX_NEW_TOKENS = "MODELFLEET_MAX_NEW_TOKENS"  # cap on generated tokens per request; default 2048
ENV_MAX_REQUEST_SIZE = "MODELFLEET_MAX_REQUEST_SIZE"  # bytes; default 16 MiB
ENV_NATIVE_BERT = "MODELFLEET_NATIVE_BERT"  # "0": BERT embeddings through transformers, not modelfleet.runtimes.bert

TASK_ALIASES: dict[str, str] = {
    "embeddings": "embeddings", "embedding": "embeddings", "feature-extraction": "embeddings",
    "sentence-similarity": "embeddings",
    "classification": "classification", "text-classification": "classification",
    "sentiment-analysis": "classification",
    "generation": "generation", "text-generation": "generation", "conversational": "generation",
    "chat": "generation",
    "text-to-image": "text-to-image", "image-generation": "text-to-image", "diffusers": "text-to-image",
    "unconditional-image-generation": "text-to-image",
}
TASKS = ("embeddings", "classification", "generation", "text-to-image")


class ApiError(Exception):
    def __init__(self, status: int, message: str, error_type: str = "Validation") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type


# --------------------------------------------------------------------------- task detection


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _pipeline_tag(model_dir: Path) -> str | None:
    """``pipeline_tag`` from the model card's YAML front matter (README.md)."""
    try:
        text = (model_dir / "README.md").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    if not text.startswith("---"):
        return None
    front = text[3:].split("\n---", 1)[0]
    match = re.search(r"^pipeline_tag:\s*['\"]?([\w-]+)", front, re.MULTILINE)
    return match.group(1) if match else None


def detect_task(model_dir: Path, explicit: str | None = None) -> tuple[str, str]:
    """(task, why) for the snapshot in ``model_dir``."""
    if explicit:
        task = TASK_ALIASES.get(explicit.strip().lower())
        if task is None:
            raise ValueError(f"{ENV_TASK}={explicit!r}: unknown task (one of {', '.join(sorted(TASK_ALIASES))})")
        return task, f"{ENV_TASK}={explicit}"
    if (model_dir / "model_index.json").is_file():
        return "text-to-image", "model_index.json (diffusers pipeline)"
    if (model_dir / "modules.json").is_file():
        return "embeddings", "modules.json (sentence-transformers layout)"
    config = _read_json(model_dir / "config.json") or {}
    for arch in config.get("architectures") or []:
        if arch.endswith("ForSequenceClassification"):
            return "classification", f"architecture {arch}"
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "generation", f"architecture {arch}"
    tag = _pipeline_tag(model_dir)
    if tag and tag in TASK_ALIASES:
        return TASK_ALIASES[tag], f"pipeline_tag {tag}"
    if not config:
        raise ValueError(f"{model_dir}: no config.json, model_index.json or modules.json: not a HuggingFace "
                         f"model snapshot (set {ENV_TASK} to force a task)")
    return "embeddings", "bare encoder (feature extraction)"


def _torch_dtype(name: str | None) -> Any:
    import torch

    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    key = (name or "float32").lower()
    if key not in names:
        raise ValueError(f"{ENV_DTYPE}={name!r}: one of {', '.join(names)}")
    return names[key]


def _dtype_kwargs(dtype: Any) -> dict[str, Any]:
    """transformers >= 4.56 calls it ``dtype``; older releases ``torch_dtype``."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _max_positions(config: Any) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _tokenizer_limit(tokenizer: Any) -> int | None:
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 1_000_000 else None


# --------------------------------------------------------------------------- embeddings


@dataclass
class PoolingConfig:
    mode: str = "mean"  # mean | cls | max | mean_sqrt_len | lasttoken
    normalize: bool = True


def read_sentence_transformers_layout(model_dir: Path) -> tuple[Path, PoolingConfig, int | None, bool]:
    """(transformer dir, pooling, max_seq_length, do_lower_case) from a sentence-transformers snapshot.

    Without modules.json: the model dir, mean pooling, normalized (OpenAI-style embeddings).
    """
    modules = _read_json(model_dir / "modules.json")
    if not isinstance(modules, list):
        return model_dir, PoolingConfig("mean", True), None, False
    transformer_dir = model_dir
    pooling = PoolingConfig("mean", False)
    for module in sorted(modules, key=lambda m: int(m.get("idx", 0))):
        kind = str(module.get("type", ""))
        path = model_dir / str(module.get("path", ""))
        if kind.endswith(".Transformer"):
            transformer_dir = path
        elif kind.endswith(".Pooling"):
            cfg = _read_json(path / "config.json") or {}
            if cfg.get("pooling_mode_cls_token"):
                pooling.mode = "cls"
            elif cfg.get("pooling_mode_max_tokens"):
                pooling.mode = "max"
            elif cfg.get("pooling_mode_mean_sqrt_len_tokens"):
                pooling.mode = "mean_sqrt_len"
            elif cfg.get("pooling_mode_lasttoken"):
                pooling.mode = "lasttoken"
            elif cfg.get("pooling_mode") in ("cls", "max", "mean", "lasttoken", "mean_sqrt_len_tokens"):
                pooling.mode = str(cfg["pooling_mode"]).replace("_tokens", "")
            else:
                pooling.mode = "mean"
        elif kind.endswith(".Normalize"):
            pooling.normalize = True
        elif kind:
            log.warning("sentence-transformers module %s is not applied by this runtime", kind)
    st_config = _read_json(transformer_dir / "sentence_bert_config.json") or _read_json(
        model_dir / "sentence_bert_config.json") or {}
    max_seq = st_config.get("max_seq_length")
    return transformer_dir, pooling, int(max_seq) if max_seq else None, bool(st_config.get("do_lower_case"))


def pool(token_embeddings: Any, attention_mask: Any, mode: str) -> Any:
    """sentence-transformers' Pooling, for one mode."""
    import torch

    mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
    if mode == "cls":
        return token_embeddings[:, 0]
    if mode == "max":
        masked = token_embeddings.masked_fill(mask == 0, -1e9)
        return torch.max(masked, 1)[0]
    if mode == "lasttoken":
        # last non-padding token; right padding assumed, as the tokenizers here pad right
        last = attention_mask.sum(dim=1) - 1
        return token_embeddings[torch.arange(token_embeddings.size(0)), last]
    summed = torch.sum(token_embeddings * mask, 1)
    counts = torch.clamp(mask.sum(1), min=1e-9)
    if mode == "mean_sqrt_len":
        return summed / torch.sqrt(counts)
    return summed / counts


class Embedder:
    """Sentence embeddings: tokenizer -> encoder -> pooling (-> L2). BERT encoders run on the native
    path (``modelfleet.runtimes.bert``: torch + tokenizers + safetensors, no transformers import);
    any other model, or ``MODELFLEET_NATIVE_BERT=0``, through transformers' AutoModel."""

    def __init__(self, model_dir: Path, dtype: Any, *, native: bool = True) -> None:
        transformer_dir, self.pooling, max_seq, self.lowercase = read_sentence_transformers_layout(model_dir)
        snapshot, why = bert.supported(transformer_dir) if native else (None, f"{ENV_NATIVE_BERT}=0")
        self.backend = "native-bert" if snapshot is not None else "transformers"
        self.backend_reason = why
        positions: int | None
        if snapshot is not None:
            tokenizer = bert.BertTokenizer(snapshot)
            encoder = bert.BertEncoder(snapshot, dtype)
            self._lengths: Callable[[list[str]], list[int]] = tokenizer.lengths
            self._features: Callable[[list[str], int], dict[str, Any]] = tokenizer.batch
            self._forward: Callable[[dict[str, Any]], Any] = lambda features: encoder(**features)
            tokenizer_limit, positions = tokenizer.model_max_length, encoder.max_positions
            self.dimensions = encoder.hidden
        else:
            from transformers import AutoModel, AutoTokenizer

            hf_tokenizer = AutoTokenizer.from_pretrained(str(transformer_dir), local_files_only=True)
            model = AutoModel.from_pretrained(str(transformer_dir), local_files_only=True, **_dtype_kwargs(dtype))
            model.eval()
            self._lengths = lambda batch: [len(ids) for ids in hf_tokenizer(batch)["input_ids"]]
            self._features = lambda batch, limit: dict(hf_tokenizer(
                batch, padding=True, truncation="longest_first", max_length=limit, return_tensors="pt"))
            self._forward = lambda features: model(**features)[0]
            tokenizer_limit, positions = _tokenizer_limit(hf_tokenizer), _max_positions(model.config)
            self.dimensions = int(getattr(model.config, "hidden_size", 0) or 0)
        limits = [v for v in (max_seq, tokenizer_limit, positions) if v]
        self.max_length = min(limits) if limits else 512

    def encode(self, texts: list[str], *, normalize: bool, truncate: bool = True,
               batch_size: int = 32) -> tuple[list[list[float]], int]:
        """Embeddings (in input order) and the number of tokens they took."""
        import torch

        if self.lowercase:
            texts = [t.lower() for t in texts]
        # Longest first, as sentence-transformers does: less padding per batch.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out: list[list[float]] = [[] for _ in texts]
        tokens = 0
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = [texts[i] for i in chunk]
            if not truncate:
                too_long = [n for n in self._lengths(batch) if n > self.max_length]
                if too_long:
                    raise ApiError(413, f"input has {max(too_long)} tokens, more than the model's maximum "
                                        f"{self.max_length} (send \"truncate\": true)")
            features = self._features(batch, self.max_length)
            with torch.inference_mode():
                token_embeddings = self._forward(features)
            pooled = pool(token_embeddings, features["attention_mask"], self.pooling.mode)
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            tokens += int(features["attention_mask"].sum())
            for i, row in zip(chunk, pooled.float().tolist(), strict=True):
                out[i] = row
        return out, tokens


# --------------------------------------------------------------------------- classification


class Classifier:
    def __init__(self, model_dir: Path, dtype: Any) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            str(model_dir), local_files_only=True, **_dtype_kwargs(dtype))
        self.model.eval()
        config = self.model.config
        self.labels = {int(k): str(v) for k, v in (config.id2label or {}).items()}
        self.multi_label = getattr(config, "problem_type", None) == "multi_label_classification"
        limits = [v for v in (_tokenizer_limit(self.tokenizer), _max_positions(config)) if v]
        self.max_length = min(limits) if limits else 512

    def classify(self, inputs: list[str | tuple[str, str]], *, raw_scores: bool,
                 batch_size: int = 32) -> tuple[list[list[dict[str, Any]]], int]:
        import torch

        results: list[list[dict[str, Any]]] = []
        tokens = 0
        for start in range(0, len(inputs), batch_size):
            batch = inputs[start:start + batch_size]
            if all(isinstance(x, tuple) for x in batch):
                firsts = [x[0] for x in batch]
                seconds = [x[1] for x in batch]
                features = self.tokenizer(firsts, seconds, padding=True, truncation=True,
                                          max_length=self.max_length, return_tensors="pt")
            else:
                features = self.tokenizer([str(x) for x in batch], padding=True, truncation=True,
                                          max_length=self.max_length, return_tensors="pt")
            with torch.inference_mode():
                logits = self.model(**features).logits.float()
            tokens += int(features["attention_mask"].sum())
            if raw_scores:
                scores = logits
            elif self.multi_label or logits.size(-1) == 1:
                scores = torch.sigmoid(logits)
            else:
                scores = torch.softmax(logits, dim=-1)
            for row in scores.tolist():
                ranked = sorted(
                    ({"label": self.labels.get(i, f"LABEL_{i}"), "score": s} for i, s in enumerate(row)),
                    key=lambda r: -r["score"],
                )
                results.append(ranked)
        return results, tokens


# --------------------------------------------------------------------------- generation


@dataclass
class GenerationRequest:
    prompt: str
    max_new_tokens: int = 100
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    do_sample: bool = False
    seed: int | None = None
    repetition_penalty: float | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    seed: int | None = None


class Generator:
    def __init__(self, model_dir: Path, dtype: Any) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True,
                                                          **_dtype_kwargs(dtype))
        self.model.eval()
        self.max_positions = _max_positions(self.model.config) or _tokenizer_limit(self.tokenizer) or 2048
        self.eos_token_ids: set[int] = set()
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if isinstance(eos, int):
            self.eos_token_ids.add(eos)
        elif isinstance(eos, list):
            self.eos_token_ids.update(int(e) for e in eos)
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = next(iter(self.eos_token_ids), 0)

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return str(prompt)
        lines = [f"{m.get('role', 'user')}: {_message_text(m.get('content'))}" for m in messages]
        return "\n".join([*lines, "assistant:"])

    def _stop_at(self, text: str, stops: list[str]) -> int | None:
        positions = [text.find(s) for s in stops if s and s in text]
        return min(positions) if positions else None

    def generate(self, request: GenerationRequest, on_text: Callable[[str], None] | None = None,
                 cancel: threading.Event | None = None) -> GenerationResult:
        """Generate; ``on_text`` receives text deltas as they are produced (streaming); ``cancel``
        set (the client went away) stops at the next token."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        features = self.tokenizer(request.prompt, return_tensors="pt")
        prompt_tokens = int(features["input_ids"].shape[1])
        if prompt_tokens >= self.max_positions:
            raise ApiError(422, f"the prompt has {prompt_tokens} tokens; the model takes at most {self.max_positions}")
        max_new = max(1, min(request.max_new_tokens, self.max_positions - prompt_tokens))
        generated: list[int] = []
        tokenizer = self.tokenizer
        stops = request.stop
        hold_back = max((len(s) for s in stops), default=1) - 1

        class Collector(BaseStreamer):
            def __init__(self) -> None:
                self.first = True
                self.emitted = 0

            def put(self, value: Any) -> None:
                if self.first:  # the prompt
                    self.first = False
                    return
                generated.extend(int(t) for t in value.reshape(-1).tolist())
                if on_text is not None:
                    text = str(tokenizer.decode(generated, skip_special_tokens=True))
                    if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more
                        return
                    safe = len(text) - hold_back if stops else len(text)
                    if safe > self.emitted:
                        on_text(text[self.emitted:safe])
                        self.emitted = safe

            def end(self) -> None:
                pass

        class StopOnStrings(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                text = str(tokenizer.decode(input_ids[0, prompt_tokens:], skip_special_tokens=True))
                done = any(s and s in text for s in stops)
                return torch.full((input_ids.shape[0],), done, dtype=torch.bool)

        kwargs: dict[str, Any] = {"max_new_tokens": max_new, "pad_token_id": self.pad_token_id}
        if request.do_sample:
            kwargs["do_sample"] = True
            if request.temperature is not None:
                kwargs["temperature"] = request.temperature
            if request.top_p is not None:
                kwargs["top_p"] = request.top_p
            if request.top_k is not None:
                kwargs["top_k"] = request.top_k
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if request.repetition_penalty is not None:
            kwargs["repetition_penalty"] = request.repetition_penalty
        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                done = cancel is not None and cancel.is_set()
                return torch.full((input_ids.shape[0],), done, dtype=torch.bool)

        criteria = ([StopOnStrings()] if stops else []) + ([Cancelled()] if cancel is not None else [])
        if criteria:
            kwargs["stopping_criteria"] = StoppingCriteriaList(criteria)
        seed = request.seed
        if request.do_sample:
            seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
            torch.manual_seed(seed)
        collector = Collector()
        with torch.inference_mode():
            self.model.generate(**features, streamer=collector, **kwargs)
        text = str(tokenizer.decode(generated, skip_special_tokens=True))
        cut = self._stop_at(text, stops)
        if cut is not None:
            text, finish = text[:cut], "stop"
        elif generated and generated[-1] in self.eos_token_ids:
            finish = "stop"
        else:
            finish = "length" if len(generated) >= max_new else "stop"
        if on_text is not None and len(text) > collector.emitted:
            on_text(text[collector.emitted:])
        return GenerationResult(text, prompt_tokens, len(generated), finish, seed)


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


# --------------------------------------------------------------------------- diffusers


class ImageGenerator:
    def __init__(self, model_dir: Path, dtype: Any) -> None:
        try:
            import diffusers
        except ImportError as exc:
            raise RuntimeError("this is a diffusers pipeline (model_index.json) but the diffusers package is "
                               "not installed in the runtime image") from exc
        # Recent diffusers call it ``dtype`` (``torch_dtype`` deprecated); older ones only know torch_dtype.
        try:
            from diffusers.utils import deprecation_utils

            new_style = hasattr(deprecation_utils, "_resolve_dtype")
        except ImportError:
            new_style = False
        dtype_kwarg = {"dtype": dtype} if new_style else {"torch_dtype": dtype}
        self.pipeline = diffusers.DiffusionPipeline.from_pretrained(str(model_dir), local_files_only=True,
                                                                    **dtype_kwarg)
        self.pipeline.set_progress_bar_config(disable=True)
        self.parameters = set(inspect.signature(self.pipeline.__call__).parameters)

    def generate(self, prompt: str | None, *, n: int = 1, width: int | None = None, height: int | None = None,
                 steps: int | None = None, guidance_scale: float | None = None, seed: int | None = None) -> list[bytes]:
        import torch

        kwargs: dict[str, Any] = {}
        if "prompt" in self.parameters:
            kwargs["prompt"] = [prompt or ""] * n
            if "num_images_per_prompt" in self.parameters:
                kwargs["prompt"] = prompt or ""
                kwargs["num_images_per_prompt"] = n
        elif "batch_size" in self.parameters:
            kwargs["batch_size"] = n
        for name, value in (("width", width), ("height", height), ("num_inference_steps", steps),
                            ("guidance_scale", guidance_scale)):
            if value is not None and name in self.parameters:
                kwargs[name] = value
        if "generator" in self.parameters:
            kwargs["generator"] = torch.Generator().manual_seed(seed if seed is not None else
                                                                 int.from_bytes(os.urandom(4), "little"))
        if "output_type" in self.parameters:
            kwargs["output_type"] = "pil"
        with torch.inference_mode():
            result = self.pipeline(**kwargs)
        images = getattr(result, "images", None)
        if images is None and isinstance(result, tuple):
            images = result[0]
        pngs = []
        for image in images or []:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            pngs.append(buf.getvalue())
        return pngs


# --------------------------------------------------------------------------- the server


def _openai_error(status: int, message: str, error_type: str = "invalid_request_error") -> Response:
    return json_response({"error": {"message": message, "type": error_type, "param": None, "code": status}},
                         status)


def _tei_error(status: int, message: str, error_type: str = "Validation") -> Response:
    return json_response({"error": message, "error_type": error_type}, status)


def _as_inputs(value: Any, field_name: str) -> tuple[list[str], bool]:
    """(texts, was_single) from a str or a list of str."""
    if isinstance(value, str):
        return [value], True
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value), False
    if isinstance(value, list) and not value:
        raise ApiError(422, f"\"{field_name}\" is an empty list")
    raise ApiError(422, f"\"{field_name}\" must be a string or a list of strings")


class TransformersRuntime:
    def __init__(self, model_dir: Path | None = None, *, task: str | None = None, warmup: bool | None = None,
                 model_id: str | None = None, environment: RuntimeEnvironment | None = None) -> None:
        """Settings from ``environment`` (default: this process's, through the contract); the
        keyword arguments override them (tests)."""
        set_offline()
        self.environment = environment if environment is not None else contract_from_env()
        self.model_dir = model_dir or Path(self.environment.model_path)
        self.explicit_task = task if task is not None else (os.environ.get(ENV_TASK) or None)
        self.model_id = model_id or self.environment.model_id or self.model_dir.name or "model"
        self.warmup = env_bool(ENV_WARMUP, True) if warmup is None else warmup
        self.max_inputs = env_int(ENV_MAX_INPUTS, 256)
        self.batch_size = env_int(ENV_BATCH_SIZE, 32)
        self.max_new_tokens_cap = env_int(ENV_MAX_NEW_TOKENS, 2048)
        self.max_request_size = env_int(ENV_MAX_REQUEST_SIZE, 16 * 2**20)
        self.readiness = Readiness()
        self.thread = ModelThread.from_env()
        self.task: str | None = None
        self.task_reason = ""
        self.dtype_name = os.environ.get(ENV_DTYPE) or "float32"
        self.embedder: Embedder | None = None
        self.classifier: Classifier | None = None
        self.generator: Generator | None = None
        self.images: ImageGenerator | None = None

    # -- loading

    def _load(self) -> None:
        times = self.readiness.startup
        with times.step("import torch"):
            configure_torch_threads()
        check_readable(self.model_dir)
        task, reason = detect_task(self.model_dir, self.explicit_task)
        log.info("task %s (%s), model %s", task, reason, self.model_dir)
        dtype = _torch_dtype(self.dtype_name)
        native = env_bool(ENV_NATIVE_BERT, True)
        if task == "embeddings" and native:
            transformer_dir = read_sentence_transformers_layout(self.model_dir)[0]
            needs_transformers = bert.supported(transformer_dir)[0] is None
        else:
            needs_transformers = task != "text-to-image"
        if needs_transformers:
            with times.step("import transformers"):
                import transformers  # noqa: F401
        with times.step(f"load the {task} model"):
            if task == "embeddings":
                self.embedder = Embedder(self.model_dir, dtype, native=native)
                log.info("embeddings encoder: %s%s", self.embedder.backend,
                         f" ({self.embedder.backend_reason})" if self.embedder.backend_reason else "")
            elif task == "classification":
                self.classifier = Classifier(self.model_dir, dtype)
            elif task == "generation":
                self.generator = Generator(self.model_dir, dtype)
            else:
                self.images = ImageGenerator(self.model_dir, dtype)
        self.task, self.task_reason = task, reason

    def _warm(self, _loaded: None) -> None:
        if self.embedder is not None:
            self.embedder.encode(["warm-up"], normalize=True)
        elif self.classifier is not None:
            self.classifier.classify(["warm-up"], raw_scores=False)
        elif self.generator is not None:
            self.generator.generate(GenerationRequest("warm-up", max_new_tokens=1))
        elif self.images is not None:
            self.images.generate("warm-up", steps=1, width=64, height=64, seed=0)

    async def load(self) -> None:
        """Load, then warm up; readiness follows. Never raises: failures make the runtime unready."""
        await load_then_warm(self.thread, self.readiness, self._load, self._warm if self.warmup else None)

    # -- helpers

    async def _json(self, request: Request) -> dict[str, Any]:
        try:
            body = await read_body(request, self.max_request_size)
        except BodyTooLarge as exc:
            raise ApiError(413, str(exc)) from None
        try:
            payload = json.loads(body or b"null")
        except ValueError as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise ApiError(422, "the body must be a JSON object")
        return payload

    def _check_ready(self) -> None:
        if self.readiness.phase is Phase.FAILED:
            raise ApiError(503, f"the model is not available: {self.readiness.message}", "Unhealthy")
        if self.task is None:
            raise ApiError(503, "the model is loading", "Unhealthy")

    def _require(self, obj: Any, what: str) -> Any:
        self._check_ready()
        if obj is None:
            raise ApiError(400, f"this model serves {self.task}, not {what}", "Validation")
        return obj

    async def _call(self, fn: Callable[[], Any]) -> Any:
        try:
            return await self.thread.run(fn)
        except QueueFull as exc:
            raise ApiError(503, f"overloaded: {exc}", "Overloaded") from None

    # -- routes

    async def health(self, request: Request) -> Response:
        health = check_health(self.readiness, self.thread)
        if health.healthy:
            return json_response({"status": "ok"})
        return json_response({"status": health.phase.value, "message": health.message}, 503)

    async def info(self, request: Request) -> Response:
        info: dict[str, Any] = {
            "model_id": self.model_id,
            "model_sha": self.environment.hf_commit,  # TEI/TGI's name for the commit
            "model_dir": str(self.model_dir),
            "runtime": "modelfleet-transformers",
            "version": RUNTIME_VERSION,
            "task": self.task,
            "task_reason": self.task_reason,
            "dtype": self.dtype_name,
            "status": self.readiness.phase.value,
            "load_seconds": self.readiness.load_seconds,
            "max_client_batch_size": self.max_inputs,
            "modelfleet": self.environment.provenance(),
        }
        if self.embedder is not None:
            info.update(max_input_length=self.embedder.max_length, pooling=self.embedder.pooling.mode,
                        normalize=self.embedder.pooling.normalize, dimensions=self.embedder.dimensions,
                        encoder=self.embedder.backend)
        if self.classifier is not None:
            info.update(max_input_length=self.classifier.max_length,
                        labels=[self.classifier.labels[k] for k in sorted(self.classifier.labels)])
        if self.generator is not None:
            info.update(max_total_tokens=self.generator.max_positions,
                        chat_template=bool(getattr(self.generator.tokenizer, "chat_template", None)))
        return json_response(info)

    async def models(self, request: Request) -> Response:
        return json_response({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": 0, "owned_by": "modelfleet"}]})

    async def openai_embeddings(self, request: Request) -> Response:
        try:
            payload = await self._json(request)
            embedder: Embedder = self._require(self.embedder, "embeddings")
            texts, _ = _as_inputs(payload.get("input"), "input")
            if len(texts) > self.max_inputs:
                raise ApiError(413, f"{len(texts)} inputs; at most {self.max_inputs} per request")
            encoding = payload.get("encoding_format") or "float"
            if encoding not in ("float", "base64"):
                raise ApiError(422, "encoding_format must be \"float\" or \"base64\"")
            dimensions = payload.get("dimensions")
            if dimensions is not None and (
                    not isinstance(dimensions, int) or not 0 < dimensions <= embedder.dimensions):
                raise ApiError(422, f"dimensions must be an integer in 1..{embedder.dimensions}")
            normalize = embedder.pooling.normalize
            vectors, tokens = await self._call(
                lambda: embedder.encode(texts, normalize=normalize, batch_size=self.batch_size))
        except ApiError as exc:
            return _openai_error(exc.status, exc.message)
        if dimensions is not None:  # Matryoshka-style truncation, renormalized
            vectors = [_renormalize(v[:dimensions]) if normalize else v[:dimensions] for v in vectors]
        data = []
        for index, vector in enumerate(vectors):
            embedding: Any = vector
            if encoding == "base64":
                embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        return json_response({"object": "list", "data": data, "model": payload.get("model") or self.model_id,
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def tei_embed(self, request: Request) -> Response:
        try:
            payload = await self._json(request)
            embedder: Embedder = self._require(self.embedder, "embeddings")
            texts, _ = _as_inputs(payload.get("inputs"), "inputs")
            if len(texts) > self.max_inputs:
                raise ApiError(413, f"batch size {len(texts)} > maximum allowed batch size {self.max_inputs}")
            normalize = bool(payload.get("normalize", True))
            truncate = bool(payload.get("truncate", True))
            vectors, _tokens = await self._call(
                lambda: embedder.encode(texts, normalize=normalize, truncate=truncate, batch_size=self.batch_size))
        except ApiError as exc:
            return _tei_error(exc.status, exc.message, exc.error_type)
        return json_response(vectors)

    async def classify(self, request: Request) -> Response:
        try:
            payload = await self._json(request)
            classifier: Classifier = self._require(self.classifier, "classification")
            raw = payload.get("inputs")
            single = isinstance(raw, str)
            items: list[str | tuple[str, str]]
            if isinstance(raw, str):
                items = [raw]
            elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
                items = list(raw)
            elif isinstance(raw, list) and raw and all(
                    isinstance(x, list) and len(x) == 2 and all(isinstance(y, str) for y in x) for x in raw):
                items = [(x[0], x[1]) for x in raw]
            else:
                raise ApiError(422, "\"inputs\" must be a string, a list of strings or a list of [text, text] pairs")
            if len(items) > self.max_inputs:
                raise ApiError(413, f"batch size {len(items)} > maximum allowed batch size {self.max_inputs}")
            raw_scores = bool(payload.get("raw_scores", False))
            results, _ = await self._call(
                lambda: classifier.classify(items, raw_scores=raw_scores, batch_size=self.batch_size))
        except ApiError as exc:
            return _tei_error(exc.status, exc.message, exc.error_type)
        return json_response(results[0] if single else results)

    def _generation_request(self, prompt: str, *, max_new_tokens: Any, temperature: Any, top_p: Any, top_k: Any,
                            do_sample: Any, seed: Any, stop: Any, repetition_penalty: Any,
                            default_max: int) -> GenerationRequest:
        def number(value: Any, name: str, kind: type) -> Any:
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ApiError(422, f"{name} must be a number")
            return kind(value)

        max_new = number(max_new_tokens, "max_new_tokens", int) or default_max
        if max_new < 1:
            raise ApiError(422, "max_new_tokens must be at least 1")
        max_new = min(max_new, self.max_new_tokens_cap)
        temp = number(temperature, "temperature", float)
        if temp is not None and temp < 0:
            raise ApiError(422, "temperature must be >= 0")
        top_p_v = number(top_p, "top_p", float)
        sample = bool(do_sample) if do_sample is not None else (temp is not None and temp > 0)
        if temp == 0:
            sample = False
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if not all(isinstance(s, str) for s in stops) or len(stops) > 8:
            raise ApiError(422, "stop must be a string or a list of at most 8 strings")
        return GenerationRequest(prompt=prompt, max_new_tokens=max_new, temperature=temp, top_p=top_p_v,
                                 top_k=number(top_k, "top_k", int), do_sample=sample,
                                 seed=number(seed, "seed", int), stop=stops,
                                 repetition_penalty=number(repetition_penalty, "repetition_penalty", float))

    async def tgi_generate(self, request: Request) -> Response:
        try:
            payload = await self._json(request)
            generator: Generator = self._require(self.generator, "text generation")
            prompt = payload.get("inputs")
            if not isinstance(prompt, str):
                raise ApiError(422, "\"inputs\" must be a string")
            params = payload.get("parameters") or {}
            if not isinstance(params, dict):
                raise ApiError(422, "\"parameters\" must be an object")
            gen = self._generation_request(
                prompt, max_new_tokens=params.get("max_new_tokens"), temperature=params.get("temperature"),
                top_p=params.get("top_p"), top_k=params.get("top_k"), do_sample=params.get("do_sample"),
                seed=params.get("seed"), stop=params.get("stop"),
                repetition_penalty=params.get("repetition_penalty"), default_max=100)
            result: GenerationResult = await self._call(lambda: generator.generate(gen))
        except ApiError as exc:
            return _tei_error(exc.status, exc.message, exc.error_type)
        text = (prompt + result.text) if params.get("return_full_text") else result.text
        body: dict[str, Any] = {"generated_text": text}
        if params.get("details"):
            body["details"] = {"finish_reason": "eos_token" if result.finish_reason == "stop" else "length",
                               "generated_tokens": result.completion_tokens, "seed": result.seed}
        return json_response(body)

    async def chat_completions(self, request: Request) -> Response:
        return await self._openai_generation(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._openai_generation(request, chat=False)

    async def _openai_generation(self, request: Request, *, chat: bool) -> Response:
        try:
            payload = await self._json(request)
            generator: Generator = self._require(self.generator, "text generation")
            if chat:
                messages = payload.get("messages")
                if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
                    raise ApiError(422, "\"messages\" must be a non-empty list of {role, content} objects")
                prompt = generator.chat_prompt(messages)
            else:
                raw_prompt = payload.get("prompt")
                if isinstance(raw_prompt, list) and len(raw_prompt) == 1 and isinstance(raw_prompt[0], str):
                    raw_prompt = raw_prompt[0]
                if not isinstance(raw_prompt, str):
                    raise ApiError(422, "\"prompt\" must be a string")
                prompt = raw_prompt
            if payload.get("n", 1) != 1:
                raise ApiError(422, "only n=1 is supported")
            gen = self._generation_request(
                prompt, max_new_tokens=payload.get("max_completion_tokens") or payload.get("max_tokens"),
                temperature=payload.get("temperature"), top_p=payload.get("top_p"), top_k=None, do_sample=None,
                seed=payload.get("seed"), stop=payload.get("stop"),
                repetition_penalty=None, default_max=256 if chat else 16)
        except ApiError as exc:
            return _openai_error(exc.status, exc.message)
        model_name = payload.get("model") or self.model_id
        completion_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if payload.get("stream"):
            return StreamingResponse(self._stream(generator, gen, completion_id, created, model_name, chat),
                                     media_type="text/event-stream", headers={"cache-control": "no-cache"})
        try:
            result: GenerationResult = await self._call(lambda: generator.generate(gen))
        except ApiError as exc:
            return _openai_error(exc.status, exc.message)
        usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                 "total_tokens": result.prompt_tokens + result.completion_tokens}
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": result.text},
                                      "logprobs": None, "finish_reason": result.finish_reason}
            return json_response({"id": completion_id, "object": "chat.completion", "created": created,
                                  "model": model_name, "choices": [choice], "usage": usage})
        return json_response({"id": completion_id, "object": "text_completion", "created": created,
                              "model": model_name, "usage": usage,
                              "choices": [{"index": 0, "text": result.text, "logprobs": None,
                                           "finish_reason": result.finish_reason}]})

    async def _stream(self, generator: Generator, gen: GenerationRequest, completion_id: str, created: int,
                      model_name: str, chat: bool) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()

        def on_text(delta: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, delta)

        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None, role: bool = False) -> bytes:
            if chat:
                content: dict[str, Any] = {}
                if role:
                    content["role"] = "assistant"
                if delta is not None:
                    content["content"] = delta
                choice: dict[str, Any] = {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            data = {"id": completion_id, "object": obj, "created": created, "model": model_name, "choices": [choice]}
            return b"data: " + json.dumps(data, ensure_ascii=False).encode("utf-8") + b"\n\n"

        cancel = threading.Event()

        async def run() -> GenerationResult:
            try:
                return await self.thread.run(lambda: generator.generate(gen, on_text, cancel))
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        task = asyncio.create_task(run())
        try:
            if chat:
                yield chunk("", None, role=True)
            while True:
                delta = await queue.get()
                if delta is None:
                    break
                yield chunk(delta, None)
        except BaseException:  # the client disconnected (cancelled): stop generating for nobody
            cancel.set()
            raise
        try:
            result = await task
        except (ApiError, QueueFull) as exc:
            message = exc.message if isinstance(exc, ApiError) else str(exc)
            yield b"data: " + json.dumps({"error": {"message": message, "type": "server_error"}}).encode() + b"\n\n"
            return
        yield chunk(None, result.finish_reason)
        yield b"data: [DONE]\n\n"

    async def image_generations(self, request: Request) -> Response:
        try:
            payload = await self._json(request)
            images: ImageGenerator = self._require(self.images, "image generation")
            prompt = payload.get("prompt")
            if prompt is not None and not isinstance(prompt, str):
                raise ApiError(422, "\"prompt\" must be a string")
            n = payload.get("n", 1)
            if not isinstance(n, int) or not 1 <= n <= 4:
                raise ApiError(422, "n must be an integer in 1..4")
            width = height = None
            if payload.get("size"):
                match = re.fullmatch(r"(\d+)x(\d+)", str(payload["size"]))
                if not match:
                    raise ApiError(422, "size must look like 512x512")
                width, height = int(match.group(1)), int(match.group(2))
            if payload.get("response_format", "b64_json") != "b64_json":
                raise ApiError(422, "only response_format \"b64_json\" is supported (no URL hosting here)")
            steps, guidance, seed = (payload.get("num_inference_steps"), payload.get("guidance_scale"),
                                     payload.get("seed"))
            pngs: list[bytes] = await self._call(lambda: images.generate(
                prompt, n=n, width=width, height=height, steps=steps, guidance_scale=guidance, seed=seed))
        except ApiError as exc:
            return _openai_error(exc.status, exc.message)
        return json_response({"created": int(time.time()),
                              "data": [{"b64_json": base64.b64encode(p).decode("ascii")} for p in pngs]})

    async def not_found(self, request: Request, exc: Exception) -> Response:
        return _tei_error(404, f"no route {request.method} {request.url.path}", "NotFound")

    def app(self) -> Starlette:
        @asynccontextmanager
        async def lifespan(app: Starlette) -> Any:
            task = asyncio.create_task(self.load())
            try:
                yield
            finally:
                task.cancel()
                self.thread.shutdown()

        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/info", self.info, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/embeddings", self.openai_embeddings, methods=["POST"]),
            Route("/embed", self.tei_embed, methods=["POST"]),
            Route("/classify", self.classify, methods=["POST"]),
            Route("/predict", self.classify, methods=["POST"]),
            Route("/generate", self.tgi_generate, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/images/generations", self.image_generations, methods=["POST"]),
        ]
        app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: self.not_found})
        app.state.runtime = self
        return app


def _renormalize(vector: list[float]) -> list[float]:
    norm = sum(x * x for x in vector) ** 0.5
    return [x / norm for x in vector] if norm > 0 else vector


def create_app(model_dir: Path | None = None, **kwargs: Any) -> Starlette:
    """The ASGI app (for tests: ``httpx.ASGITransport`` or uvicorn)."""
    return TransformersRuntime(model_dir, **kwargs).app()


def main() -> None:
    setup_logging()
    set_offline()
    log.info("modelfleet transformers runtime %s", RUNTIME_VERSION)
    environment = contract_from_env()
    run_server(create_app(environment=environment), "transformers runtime", environment.listen_port)


if __name__ == "__main__":
    main()
