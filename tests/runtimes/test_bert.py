"""The native BERT encoder (modelfleet.runtimes.bert) against transformers on the same snapshots:
the real all-MiniLM-L6-v2 and a random BERT saved from a task model (``bert.``-prefixed weights)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelfleet.runtimes import bert
from modelfleet.runtimes.transformers_server import Embedder
from tests.runtimes import hf_builder

TEXTS = ["A man is eating food.", "hi", "", "Ünïcode ÀCCENTS and 中文 characters!",
         "Docker hosts in network namespaces run the models. " * 40]


def reference(directory: Path, texts: list[str], max_length: int) -> tuple[dict[str, Any], Any]:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    model = AutoModel.from_pretrained(str(directory), local_files_only=True).eval()
    features = tokenizer(texts, padding=True, truncation="longest_first", max_length=max_length,
                         return_tensors="pt")
    with torch.inference_mode():
        return dict(features), model(**features)[0]


def native(directory: Path, texts: list[str], max_length: int) -> tuple[dict[str, Any], Any]:
    snapshot, why = bert.supported(directory)
    assert snapshot is not None, why
    features = bert.BertTokenizer(snapshot).batch(texts, max_length)
    with torch.inference_mode():
        return features, bert.BertEncoder(snapshot, torch.float32)(**features)


def assert_same(directory: Path, texts: list[str], max_length: int) -> None:
    want_features, want = reference(directory, texts, max_length)
    got_features, got = native(directory, texts, max_length)
    for name in ("input_ids", "token_type_ids", "attention_mask"):
        assert torch.equal(got_features[name], want_features[name]), name
    mask = want_features["attention_mask"].bool()
    assert got.shape == want.shape
    assert torch.allclose(got[mask], want[mask], atol=1e-5)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hf_builder.build_tiny_classifier(tmp_path_factory.mktemp("bert"))


def test_minilm_equals_transformers_bert_model() -> None:
    assert_same(hf_builder.minilm_dir(), TEXTS, 256)
    assert_same(hf_builder.minilm_dir(), TEXTS, 12)  # truncated


def test_token_counts_without_truncation_equal_transformers() -> None:
    from transformers import AutoTokenizer

    snapshot, _ = bert.supported(hf_builder.minilm_dir())
    assert snapshot is not None
    tokenizer = AutoTokenizer.from_pretrained(str(hf_builder.minilm_dir()), local_files_only=True)
    assert bert.BertTokenizer(snapshot).lengths(TEXTS) == [len(ids) for ids in tokenizer(TEXTS)["input_ids"]]


def test_bert_prefixed_weights_of_a_task_model(tiny_bert: Path) -> None:
    assert any(k.startswith("bert.") for k in load_file(str(tiny_bert / bert.WEIGHTS)))
    assert_same(tiny_bert, TEXTS, 64)


def test_left_padding_and_truncation_sides_are_honoured(tiny_bert: Path, tmp_path: Path) -> None:
    directory = Path(shutil.copytree(tiny_bert, tmp_path / "left"))
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(padding_side="left", truncation_side="left")
    config_path.write_text(json.dumps(config))
    snapshot, _ = bert.supported(directory)
    assert snapshot is not None and (snapshot.padding_side, snapshot.truncation_side) == ("left", "left")
    features, _ = native(directory, TEXTS, 16)
    assert features["attention_mask"][1].tolist()[0] == 0  # "hi" is padded on the left
    assert_same(directory, TEXTS, 16)


def _edit_config(directory: Path, **changes: Any) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_tokenizer_config(directory: Path, **changes: Any) -> None:
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(("edit", "reason"), [
    (lambda d: _edit_tokenizer_config(d, do_lower_case=False),
     "tokenizer.json's normalizer differs from tokenizer_config.json in lowercase"),
    (lambda d: _edit_tokenizer_config(d, strip_accents=True, tokenize_chinese_chars=False),
     "tokenizer.json's normalizer differs from tokenizer_config.json in handle_chinese_chars, strip_accents"),
    (lambda d: _edit_tokenizer_config(d, tokenizer_class="DistilBertTokenizer"),
     "tokenizer_class 'DistilBertTokenizer' is not BertTokenizer"),
    (lambda d: _edit_tokenizer_config(d, cls_token="<s>"), "tokenizer.json's template is not <s> $A [SEP]"),
    (lambda d: _edit_config(d, model_type="roberta"), "model_type 'roberta' is not bert"),
    (lambda d: _edit_config(d, position_embedding_type="relative_key"), "position_embedding_type 'relative_key'"),
    (lambda d: _edit_config(d, hidden_act="relu"), "hidden_act 'relu'"),
    (lambda d: _edit_config(d, is_decoder=True), "a decoder configuration"),
    (lambda d: _edit_config(d, num_attention_heads=5), "hidden_size is not a multiple of num_attention_heads"),
    (lambda d: (d / "tokenizer.json").unlink(), "no tokenizer.json (a fast tokenizer)"),
    (lambda d: (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors"),
     "no single model.safetensors"),
    (lambda d: (d / "config.json").unlink(), "no readable config.json"),
])
def test_unsupported_snapshots_say_why(tiny_bert: Path, tmp_path: Path, edit: Any, reason: str) -> None:
    directory = Path(shutil.copytree(tiny_bert, tmp_path / "snap"))
    edit(directory)
    assert bert.supported(directory) == (None, reason)


def test_no_pad_token_is_unsupported(tiny_bert: Path, tmp_path: Path) -> None:
    directory = Path(shutil.copytree(tiny_bert, tmp_path / "snap"))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = directory / name
        if path.exists():
            data = json.loads(path.read_text())
            data.pop("pad_token", None)
            path.write_text(json.dumps(data))
    assert bert.supported(directory) == (None, "no pad token")


def test_missing_weights_name_the_tensor(tiny_bert: Path, tmp_path: Path) -> None:
    directory = Path(shutil.copytree(tiny_bert, tmp_path / "snap"))
    weights = load_file(str(directory / bert.WEIGHTS))
    del weights["bert.encoder.layer.1.output.dense.weight"]
    save_file(weights, str(directory / bert.WEIGHTS))
    snapshot, _ = bert.supported(directory)
    assert snapshot is not None
    with pytest.raises(ValueError, match=r"lacks encoder\.layer\.1\.output\.dense\.weight"):
        bert.BertEncoder(snapshot, torch.float32)


def test_where_transformers_would_tokenize_differently_the_native_path_steps_aside(tmp_path: Path) -> None:
    """do_lower_case false over an uncased tokenizer.json: transformers rebuilds the normalizer from
    tokenizer_config.json (and gets other ids); the embedder then uses transformers and agrees."""
    from transformers import AutoTokenizer

    directory = hf_builder.copy_minilm(tmp_path / "cased")
    _edit_tokenizer_config(directory, do_lower_case=False)
    embedder = Embedder(directory, torch.float32)
    assert embedder.backend == "transformers" and "lowercase" in embedder.backend_reason
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    assert tokenizer(["Hello"])["input_ids"] != AutoTokenizer.from_pretrained(
        str(hf_builder.minilm_dir()), local_files_only=True)(["Hello"])["input_ids"]


def test_embedder_native_and_transformers_paths_agree() -> None:
    fast = Embedder(hf_builder.minilm_dir(), torch.float32)
    slow = Embedder(hf_builder.minilm_dir(), torch.float32, native=False)
    assert (fast.backend, slow.backend, slow.backend_reason) == ("native-bert", "transformers",
                                                                "MODELFLEET_NATIVE_BERT=0")
    assert (fast.max_length, fast.dimensions) == (slow.max_length, slow.dimensions) == (256, 384)
    got, got_tokens = fast.encode(TEXTS, normalize=True, batch_size=2)
    want, want_tokens = slow.encode(TEXTS, normalize=True, batch_size=2)
    assert got_tokens == want_tokens
    for a, b in zip(got, want, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
