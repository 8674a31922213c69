"""A BERT encoder in plain torch, loaded straight from a HuggingFace snapshot's ``model.safetensors``
and ``tokenizer.json`` (the ``tokenizers`` library), without importing ``transformers``.

Why: importing transformers and building ``AutoModel`` costs ~2.5 s of a MiniLM start on one CPU
(the module machinery, the config classes, the attention dispatch); this path loads the same
weights into the same computation in ~0.1 s. It serves only what it can reproduce exactly:
``bert`` encoders with absolute positions, erf GELU, one safetensors file and a tokenizer.json that
tokenizes as transformers' BertTokenizer would (transformers rebuilds the normalizer and the
[CLS]/[SEP] template from tokenizer_config.json; the two must agree). ``supported`` says why not
otherwise; then the runtime uses transformers as before. The embeddings equal
``transformers.BertModel``'s last hidden state (tested against it and sentence-transformers).

The tokenizer is called as transformers' ``PreTrainedTokenizerFast`` calls it: the truncation and
padding stored in tokenizer.json are replaced per call (``longest_first`` truncation at the given
length, padding to the longest with the configured pad token, on the configured sides).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
_ACTIVATIONS = ("gelu",)  # transformers' ACT2FN["gelu"]: the exact (erf) GELU


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json / special_tokens_map.json write it: a string or an
    AddedToken dict with ``content``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


@dataclass(frozen=True)
class BertSnapshot:
    """What the native path needs from a snapshot directory."""

    directory: Path
    config: dict[str, Any]
    pad_token: str
    padding_side: str
    truncation_side: str
    model_max_length: int | None


def supported(directory: Path) -> tuple[BertSnapshot | None, str]:
    """(the snapshot, "") when the native encoder reproduces this model, else (None, why not)."""
    config = _read_json(directory / "config.json")
    if not isinstance(config, dict):
        return None, "no readable config.json"
    if config.get("model_type") != "bert":
        return None, f"model_type {config.get('model_type')!r} is not bert"
    if config.get("position_embedding_type", "absolute") != "absolute":
        return None, f"position_embedding_type {config.get('position_embedding_type')!r}"
    if config.get("hidden_act", "gelu") not in _ACTIVATIONS:
        return None, f"hidden_act {config.get('hidden_act')!r}"
    if config.get("is_decoder") or config.get("add_cross_attention"):
        return None, "a decoder configuration"
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers"):
        if not isinstance(config.get(key), int) or config[key] <= 0:
            return None, f"config.json has no positive integer {key}"
    if config["hidden_size"] % config["num_attention_heads"]:
        return None, "hidden_size is not a multiple of num_attention_heads"
    if not (directory / WEIGHTS).is_file():
        return None, f"no single {WEIGHTS}"
    if not (directory / TOKENIZER).is_file():
        return None, f"no {TOKENIZER} (a fast tokenizer)"
    tok_config = _read_json(directory / "tokenizer_config.json") or {}
    special = _read_json(directory / "special_tokens_map.json") or {}
    if not isinstance(tok_config, dict) or not isinstance(special, dict):
        return None, "tokenizer_config.json or special_tokens_map.json is not an object"
    pad = _token_text(tok_config.get("pad_token")) or _token_text(special.get("pad_token"))
    if pad is None:
        return None, "no pad token"
    if mismatch := _tokenizer_mismatch(directory / TOKENIZER, tok_config):
        return None, mismatch
    sides = (tok_config.get("padding_side", "right"), tok_config.get("truncation_side", "right"))
    if any(side not in ("left", "right") for side in sides):
        return None, f"padding/truncation side {sides}"
    limit = tok_config.get("model_max_length")
    return BertSnapshot(directory, config, pad, str(sides[0]), str(sides[1]),
                        limit if isinstance(limit, int) and 0 < limit < 1_000_000 else None), ""


_BERT_TOKENIZER_CLASSES = (None, "BertTokenizer", "BertTokenizerFast")


def _tokenizer_mismatch(path: Path, tok_config: dict[str, Any]) -> str:
    """Why tokenizer.json alone would not tokenize as transformers does ("" when it would).

    transformers' BertTokenizer builds its normalizer from tokenizer_config.json (``do_lower_case``,
    ``tokenize_chinese_chars``, ``strip_accents``) and its template from the cls/sep tokens, whatever
    tokenizer.json says; the native path uses tokenizer.json as it is, so it serves only snapshots
    where the two agree (other tokenizer classes: transformers)."""
    if tok_config.get("tokenizer_class") not in _BERT_TOKENIZER_CLASSES:
        return f"tokenizer_class {tok_config.get('tokenizer_class')!r} is not BertTokenizer"
    data = _read_json(path)
    if not isinstance(data, dict):
        return f"{TOKENIZER} is not a JSON object"
    normalizer = data.get("normalizer") or {}
    wanted = {"type": "BertNormalizer", "clean_text": True,
              "lowercase": tok_config.get("do_lower_case", True),
              "handle_chinese_chars": tok_config.get("tokenize_chinese_chars", True),
              "strip_accents": tok_config.get("strip_accents")}
    differing = sorted(k for k, v in wanted.items() if not isinstance(normalizer, dict) or normalizer.get(k) != v)
    if differing:
        return f"{TOKENIZER}'s normalizer differs from tokenizer_config.json in {', '.join(differing)}"
    if (data.get("pre_tokenizer") or {}).get("type") != "BertPreTokenizer":
        return f"{TOKENIZER} has no BertPreTokenizer"
    model = data.get("model") or {}
    unk = _token_text(tok_config.get("unk_token")) or "[UNK]"
    if model.get("type") != "WordPiece" or model.get("unk_token") != unk:
        return f"{TOKENIZER} has no WordPiece model with unk token {unk!r}"
    cls = _token_text(tok_config.get("cls_token")) or "[CLS]"
    sep = _token_text(tok_config.get("sep_token")) or "[SEP]"
    post = data.get("post_processor") or {}
    if post.get("type") == "TemplateProcessing":
        single = [next(iter(piece.values())).get("id") for piece in post.get("single") or [] if isinstance(piece, dict)]
        if single != [cls, "A", sep]:
            return f"{TOKENIZER}'s template is not {cls} $A {sep}"
    elif post.get("type") == "BertProcessing":
        if [post.get("cls", [None])[0], post.get("sep", [None])[0]] != [cls, sep]:
            return f"{TOKENIZER}'s BertProcessing does not use {cls} and {sep}"
    else:
        return f"{TOKENIZER} adds no {cls}/{sep} (post_processor {post.get('type')!r})"
    return ""


class BertTokenizer:
    """tokenizer.json through the ``tokenizers`` library, called as transformers calls it."""

    def __init__(self, snapshot: BertSnapshot) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(snapshot.directory / TOKENIZER))
        pad_id = self._tok.token_to_id(snapshot.pad_token)
        if pad_id is None:
            raise ValueError(f"pad token {snapshot.pad_token!r} is not in {TOKENIZER}")
        self._pad_id = pad_id
        self._pad_token = snapshot.pad_token
        self._padding_side = snapshot.padding_side
        self._truncation_side = snapshot.truncation_side
        self.model_max_length = snapshot.model_max_length

    def lengths(self, texts: list[str]) -> list[int]:
        """Token counts without truncation (special tokens included)."""
        self._tok.no_truncation()
        self._tok.no_padding()
        return [len(e.ids) for e in self._tok.encode_batch(texts, add_special_tokens=True)]

    def batch(self, texts: list[str], max_length: int) -> dict[str, Any]:
        """input_ids, token_type_ids, attention_mask as int64 tensors, padded to the longest."""
        import torch

        self._tok.enable_truncation(max_length, stride=0, strategy="longest_first",
                                    direction=self._truncation_side)
        self._tok.enable_padding(direction=self._padding_side, pad_id=self._pad_id, pad_type_id=0,
                                 pad_token=self._pad_token)
        encodings = self._tok.encode_batch(texts, add_special_tokens=True)
        return {
            "input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.long),
            "token_type_ids": torch.tensor([e.type_ids for e in encodings], dtype=torch.long),
            "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.long),
        }


def _strip_prefix(weights: dict[str, Any]) -> dict[str, Any]:
    """``bert.``-prefixed checkpoints (saved from a task model) as the bare encoder's names."""
    if "embeddings.word_embeddings.weight" in weights:
        return weights
    return {key[len("bert."):]: value for key, value in weights.items() if key.startswith("bert.")}


class BertEncoder:
    """transformers' BertModel in inference (no dropout): embeddings -> N layers; ``__call__``
    returns the last hidden state."""

    def __init__(self, snapshot: BertSnapshot, dtype: Any) -> None:
        from safetensors.torch import load_file

        config = snapshot.config
        self.hidden = int(config["hidden_size"])
        self.heads = int(config["num_attention_heads"])
        self.head_size = self.hidden // self.heads
        self.layers = int(config["num_hidden_layers"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        self.max_positions = int(config.get("max_position_embeddings", 512))
        weights = _strip_prefix(load_file(str(snapshot.directory / WEIGHTS)))
        names = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                 "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight",
                 "embeddings.LayerNorm.bias"]
        for i in range(self.layers):
            for part in ("attention.self.query", "attention.self.key", "attention.self.value",
                         "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense",
                         "output.dense", "output.LayerNorm"):
                names += [f"encoder.layer.{i}.{part}.weight", f"encoder.layer.{i}.{part}.bias"]
        missing = [name for name in names if name not in weights]
        if missing:
            raise ValueError(f"{WEIGHTS} lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        self.w = {name: weights[name].to(dtype).contiguous() for name in names}
        self.dtype = dtype
        # Fused query/key/value per layer: one matmul instead of three (the separate ones dropped).
        self.qkv: list[tuple[Any, Any]] = []
        import torch

        for i in range(self.layers):
            p = f"encoder.layer.{i}.attention.self."
            parts = [p + n for n in ("query", "key", "value")]
            self.qkv.append((torch.cat([self.w.pop(n + ".weight") for n in parts]),
                             torch.cat([self.w.pop(n + ".bias") for n in parts])))

    def __call__(self, input_ids: Any, token_type_ids: Any, attention_mask: Any) -> Any:
        import torch
        import torch.nn.functional as F

        w = self.w
        batch, length = input_ids.shape
        positions = torch.arange(length, dtype=torch.long).unsqueeze(0)
        x = (F.embedding(input_ids, w["embeddings.word_embeddings.weight"])
             + F.embedding(token_type_ids, w["embeddings.token_type_embeddings.weight"])
             + F.embedding(positions, w["embeddings.position_embeddings.weight"]))
        x = F.layer_norm(x, (self.hidden,), w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"],
                         self.eps)
        # Additive mask as transformers builds it: 0 where attended, the dtype's minimum on padding.
        mask = (1.0 - attention_mask[:, None, None, :].to(self.dtype)) * torch.finfo(self.dtype).min
        scale = 1.0 / math.sqrt(self.head_size)
        for i in range(self.layers):
            p = f"encoder.layer.{i}."
            qkv = F.linear(x, *self.qkv[i]).view(batch, length, 3, self.heads, self.head_size)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            context = context.transpose(1, 2).reshape(batch, length, self.hidden)
            attended = F.linear(context, w[p + "attention.output.dense.weight"], w[p + "attention.output.dense.bias"])
            x = F.layer_norm(attended + x, (self.hidden,), w[p + "attention.output.LayerNorm.weight"],
                             w[p + "attention.output.LayerNorm.bias"], self.eps)
            inner = F.gelu(F.linear(x, w[p + "intermediate.dense.weight"], w[p + "intermediate.dense.bias"]))
            out = F.linear(inner, w[p + "output.dense.weight"], w[p + "output.dense.bias"])
            x = F.layer_norm(out + x, (self.hidden,), w[p + "output.LayerNorm.weight"],
                             w[p + "output.LayerNorm.bias"], self.eps)
        return x
