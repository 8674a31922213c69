"""The TorchServe-compatible runtime against real .mar archives made by torch-model-archiver.

The servers are real processes on 127.0.0.1 (the image's entry point); the expected numbers are
the same model computed directly in the test.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelfleet.runtimes import torch_server
from modelfleet.runtimes.contract import RuntimeEnvironment
from tests.runtimes import mar_builder
from tests.runtimes.conftest import TorchServer
from tests.state.helpers import examples

X = [0.5, -1.0, 2.0, 0.25]


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mar")
    builders = {"eager": mar_builder.build_eager_mar, "torchscript": mar_builder.build_torchscript_mar,
                "function": mar_builder.build_function_mar, "broken": mar_builder.build_failing_mar}
    with ThreadPoolExecutor(4) as pool:
        futures = {key: pool.submit(build, root) for key, build in builders.items()}
        return {key: future.result() for key, future in futures.items()}


@pytest.fixture(scope="module")
def servers(archives: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, TorchServer]]:
    """One server per archive, started together (each on a read-only-style model dir of its own)."""
    started: dict[str, TorchServer] = {}
    try:
        for key, mar in archives.items():
            model_dir = tmp_path_factory.mktemp(f"model-{key}")
            (model_dir / mar.name).symlink_to(mar)
            started[key] = TorchServer(model_dir, model_dir.parent / f"{key}.log")
        yield started
    finally:
        for server in started.values():
            server.stop()


def expected_logits(x: list[float]) -> list[float]:
    with torch.no_grad():
        return [float(v) for v in mar_builder.tiny_net()(torch.tensor([x])).tolist()[0]]


def test_eager_archive_answers_like_the_model(servers: dict[str, TorchServer]) -> None:
    server = servers["eager"]
    ping = server.wait()
    assert ping.json() == {"status": "Healthy"}
    # Where the start went, in one log line (the cold-start benchmark reads it).
    startup = next(line for line in server.log().splitlines() if "startup: ready" in line)
    for step in ("process start to loading", "import torch", "extract archive", "initialize handler", "warm-up"):
        assert f"{step} " in startup, startup
    response = httpx.post(f"{server.base}/predictions/tiny", json={"inputs": X})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["logits"] == pytest.approx(expected_logits(X), abs=1e-6)
    # The context was built like TorchServe's: batch size 1, no GPU.
    assert body["batch_size"] == 1 and body["gpu_id"] is None
    # The version in the path is checked against the manifest's.
    assert httpx.post(f"{server.base}/predictions/tiny/1.0", json={"inputs": X}).status_code == 200
    # TorchServe-compatible JSON formatting (indent 2).
    assert response.text.startswith("{\n  ")


def test_torchscript_archive(servers: dict[str, TorchServer]) -> None:
    server = servers["torchscript"]
    server.wait()
    response = httpx.post(f"{server.base}/predictions/tinyts/2.0", json={"inputs": X})
    assert response.status_code == 200, response.text
    assert response.json()["logits"] == pytest.approx(expected_logits(X), abs=1e-6)


def test_multipart_field_data(servers: dict[str, TorchServer]) -> None:
    server = servers["eager"]
    server.wait()
    files = {"data": ("input.json", json.dumps({"inputs": X}), "application/json")}
    response = httpx.post(f"{server.base}/predictions/tiny", files=files)
    assert response.status_code == 200, response.text
    assert response.json()["logits"] == pytest.approx(expected_logits(X), abs=1e-6)
    # A plain form field arrives as bytes (TorchServe's frontend sends it without a content type).
    response = httpx.post(f"{server.base}/predictions/tiny", data={"data": json.dumps(X)})
    assert response.status_code == 200, response.text


def test_errors_are_torchserve_shaped(servers: dict[str, TorchServer]) -> None:
    server = servers["eager"]
    server.wait()
    response = httpx.post(f"{server.base}/predictions/nosuchmodel", json={"inputs": X})
    assert response.status_code == 404
    assert response.json() == {"code": 404, "type": "ModelNotFoundException", "message": "Model not found: nosuchmodel"}
    response = httpx.post(f"{server.base}/predictions/tiny/9.9", json={"inputs": X})
    assert response.status_code == 404
    assert response.json()["type"] == "ModelVersionNotFoundException"
    assert response.json()["code"] == 404
    response = httpx.get(f"{server.base}/no/such/path")
    assert response.status_code == 404 and response.json()["type"] == "ResourceNotFoundException"


def test_handler_exception_is_503_and_the_server_stays_up(servers: dict[str, TorchServer]) -> None:
    server = servers["eager"]
    server.wait()
    response = httpx.post(f"{server.base}/predictions/tiny", json="boom")
    assert response.status_code == 503
    assert response.json() == {"code": 503, "type": "InternalServerException", "message": "Prediction failed"}
    # Still healthy, still answering.
    assert httpx.get(f"{server.base}/ping").json() == {"status": "Healthy"}
    again = httpx.post(f"{server.base}/predictions/tiny", json={"inputs": X})
    assert again.status_code == 200
    assert "the test asked for a failure" in server.log()


def test_function_handler_receives_torchserve_inputs(servers: dict[str, TorchServer]) -> None:
    server = servers["function"]
    server.wait()
    url = f"{server.base}/predictions/echo"

    # JSON body -> parsed; the request headers reach the context.
    body = httpx.post(url, json={"a": [1, 2]}, headers={"X-Test-Header": "yes"}).json()
    assert body["input"]["body"] == {"type": "dict", "value": {"a": [1, 2]}}
    assert body["header"] == "yes"
    assert body["content_types"]["body"] == {"content-type": "application/json"}
    assert body["model_name"] == "echo"
    assert body["model_dir_seen"]  # initialize ran as handle(None, context)

    # text/* -> str
    body = httpx.post(url, content="bonjour", headers={"content-type": "text/plain; charset=utf-8"}).json()
    assert body["input"]["body"] == {"type": "str", "value": "bonjour"}

    # anything else -> bytes; query parameters -> bytes too (as TorchServe's frontend sends them)
    body = httpx.post(url + "?k=v", content=b"\x01\x02", headers={"content-type": "application/octet-stream"}).json()
    assert body["input"]["body"] == {"type": "bytes", "value": "\x01\x02"}
    assert body["input"]["k"] == {"type": "bytes", "value": "v"}

    # invalid JSON is forwarded as bytes, not rejected
    body = httpx.post(url, content=b"{nope", headers={"content-type": "application/json"}).json()
    assert body["input"]["body"]["type"] == "bytes"

    # multipart: file parts decoded by their content type, plain fields as bytes
    files = {"data": ("x.txt", "some text", "text/plain"), "meta": ("m.json", '{"k": 1}', "application/json")}
    body = httpx.post(url, files=files, data={"field": "plain"}).json()
    assert body["input"]["data"] == {"type": "str", "value": "some text"}
    assert body["input"]["meta"] == {"type": "dict", "value": {"k": 1}}
    assert body["input"]["field"] == {"type": "bytes", "value": "plain"}


def test_function_handler_outputs(servers: dict[str, TorchServer]) -> None:
    server = servers["function"]
    server.wait()
    url = f"{server.base}/predictions/echo"
    raw = httpx.post(url, content=b"raw-please", headers={"content-type": "application/octet-stream"})
    assert raw.status_code == 200 and raw.content == b"\x00\x01raw bytes"
    text = httpx.post(url, content="say hello", headers={"content-type": "text/plain"})
    assert text.status_code == 200 and text.text == "hello, text"
    # The handler sets the status and content type through the context.
    teapot = httpx.post(url, json={"status": 418})
    assert teapot.status_code == 418
    assert teapot.headers["content-type"] == "application/x-teapot"
    assert teapot.json() == {"short": "stout"}


def test_load_failure_keeps_the_runtime_unready(servers: dict[str, TorchServer]) -> None:
    server = servers["broken"]
    ping = server.wait()
    assert ping.status_code == 500
    assert ping.json()["status"] == "Unhealthy"
    assert "weights are corrupt" in ping.json()["message"]
    response = httpx.post(f"{server.base}/predictions/broken", json={})
    assert response.status_code == 503
    assert response.json()["type"] == "ServiceUnavailableException"
    assert server.proc.poll() is None  # up, and saying why it is not ready


def test_models_listing(servers: dict[str, TorchServer]) -> None:
    server = servers["eager"]
    server.wait()
    assert httpx.get(f"{server.base}/models").json() == {"models": [{"modelName": "tiny", "modelUrl": "tiny.mar"}]}


def test_describe_is_torchserves_management_answer(servers: dict[str, TorchServer]) -> None:
    server = servers["eager"]
    server.wait()
    response = httpx.get(f"{server.base}/models/tiny")
    assert response.status_code == 200 and response.text.startswith("[\n  {\n    ")  # TorchServe's indent 2
    [description] = response.json()
    assert {k: description[k] for k in ("modelName", "modelVersion", "modelUrl", "batchSize", "minWorkers")} == {
        "modelName": "tiny", "modelVersion": "1.0", "modelUrl": "tiny.mar", "batchSize": 1, "minWorkers": 1}
    [worker] = description["workers"]
    assert worker["status"] == "READY" and worker["gpu"] is False and worker["memoryUsage"] > 10 * 2**20
    assert worker["pid"] == server.proc.pid
    assert description["jobQueueStatus"] == {"remainingCapacity": 100, "pendingRequests": 0}
    # Started by hand, not by the daemon: nothing to report about a deployment.
    assert set(description["modelfleet"].values()) == {None}
    [by_version] = httpx.get(f"{server.base}/models/tiny/1.0").json()
    by_version["workers"][0]["memoryUsage"] = worker["memoryUsage"]  # the only thing that moves
    assert by_version == description
    assert httpx.get(f"{server.base}/models/tiny/all").json()[0]["modelVersion"] == "1.0"
    missing = httpx.get(f"{server.base}/models/nope")
    assert missing.status_code == 404 and missing.json()["type"] == "ModelNotFoundException"
    wrong = httpx.get(f"{server.base}/models/tiny/9.9")
    assert wrong.status_code == 404 and wrong.json()["type"] == "ModelVersionNotFoundException"


def test_the_server_reads_what_the_daemon_sets(archives: dict[str, Path], tmp_path: Path) -> None:
    """The archive, name and provenance the daemon passes (runtime contract) are what it serves and
    reports; a manifest's runtime.env may still rename the model with the older MODEL_NAME."""
    (tmp_path / "tiny.mar").symlink_to(archives["eager"])
    (tmp_path / "echo.mar").symlink_to(archives["function"])  # two archives: the contract picks one
    told = RuntimeEnvironment(artifact="sha256:" + "b" * 64, model_archive="tiny.mar", model_name="tiny",
                              deployment_model="tiny-model", deployment_environment="staging")
    server = TorchServer(tmp_path, tmp_path / "server.log", env={"MODEL_NAME": "renamed"}, contract=told)
    try:
        assert server.wait().status_code == 200, server.log()
        assert httpx.post(f"{server.base}/predictions/renamed", json={"inputs": X}).status_code == 200
        assert httpx.post(f"{server.base}/predictions/tiny", json={"inputs": X}).status_code == 404
        [description] = httpx.get(f"{server.base}/models/renamed").json()
        assert description["modelfleet"] == {
            "model": "tiny-model", "environment": "staging", "artifact": "sha256:" + "b" * 64, "model_id": None,
            "model_name": "renamed", "hf_commit": None}
    finally:
        server.stop()


def test_required_warmup_failure_is_unready(archives: dict[str, Path], tmp_path: Path) -> None:
    """A warm-up sample the model cannot answer: loaded, but not ready."""
    (tmp_path / "tiny.mar").symlink_to(archives["eager"])
    server = TorchServer(tmp_path, tmp_path / "server.log", env={"MODELFLEET_WARMUP_BODY": '"boom"'})
    try:
        ping = server.wait()
        assert ping.status_code == 500
        assert "warm-up request failed" in ping.json()["message"]
    finally:
        server.stop()


# --------------------------------------------------------------------------- archive handling (in-process)


def test_find_archive(tmp_path: Path) -> None:
    with pytest.raises(torch_server.ArchiveError, match=r"no \*\.mar archive"):
        torch_server.find_archive(tmp_path)
    (tmp_path / "a.mar").write_bytes(b"x")
    assert torch_server.find_archive(tmp_path) == tmp_path / "a.mar"
    (tmp_path / "b.mar").write_bytes(b"x")
    with pytest.raises(torch_server.ArchiveError, match="MODEL_FILE"):
        torch_server.find_archive(tmp_path)
    assert torch_server.find_archive(tmp_path, "b.mar") == tmp_path / "b.mar"
    assert torch_server.find_archive(tmp_path / "a.mar") == tmp_path / "a.mar"
    with pytest.raises(torch_server.ArchiveError, match="does not exist"):
        torch_server.find_archive(tmp_path / "missing")


def test_extract_rejects_path_traversal(tmp_path: Path) -> None:
    evil = tmp_path / "evil.mar"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("MAR-INF/MANIFEST.json", "{}")
        zf.writestr("../../escaped.py", "x")
    with pytest.raises(torch_server.ArchiveError, match="outside"):
        torch_server.extract_archive(evil, tmp_path / "work")
    assert not (tmp_path / "escaped.py").exists()


def test_extract_tgz_with_top_level_directory(tmp_path: Path) -> None:
    manifest = json.dumps({"model": {"modelName": "m", "handler": "h.py"}}).encode()
    archive = tmp_path / "m.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo("m/MAR-INF/MANIFEST.json")
        info.size = len(manifest)
        tf.addfile(info, io.BytesIO(manifest))
    extracted = torch_server.extract_archive(archive, tmp_path / "work")
    assert torch_server.read_manifest(extracted)["model"]["modelName"] == "m"


def test_manifest_without_handler_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "MAR-INF").mkdir()
    (tmp_path / "MAR-INF" / "MANIFEST.json").write_text(json.dumps({"model": {"modelName": "m"}}))
    with pytest.raises(torch_server.ArchiveError, match="handler"):
        torch_server.read_manifest(tmp_path)


def test_decode_value_rules() -> None:
    assert torch_server.decode_value(b'{"a": 1}', "application/json") == {"a": 1}
    assert torch_server.decode_value(b"hi", "text/plain; charset=utf-8") == "hi"
    assert torch_server.decode_value(b"hi", "image/png") == b"hi"
    assert torch_server.decode_value(b"hi", None) == b"hi"
    assert torch_server.decode_value(b"{bad", "application/json") == b"{bad"


def test_extraction_cleans_up_after_an_earlier_run_of_the_same_container(archives: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    work = tmp_path / "work"
    first = torch_server.extract_archive(archives["eager"], work)
    foreign = work / "mar-foreign"  # another container's
    foreign.mkdir()
    (foreign / torch_server.OWNER_FILE).write_text("another-container\n1\n")
    live = work / "mar-live"  # another server on this host, still running (our parent process)
    live.mkdir()
    (live / torch_server.OWNER_FILE).write_text(f"{os.uname().nodename}\n{os.getppid()}\n")
    dead = work / "mar-dead"  # an earlier run of this container
    dead.mkdir()
    (dead / torch_server.OWNER_FILE).write_text(f"{os.uname().nodename}\n{2**22 + 1}\n")
    second = torch_server.extract_archive(archives["eager"], work)
    assert not first.exists() and not dead.exists()
    assert second.is_dir() and foreign.is_dir() and live.is_dir()
    assert (second / "MAR-INF" / "MANIFEST.json").is_file()


_JSON_LEAVES = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
                | st.text(max_size=8))
_JSON_VALUES = st.recursive(_JSON_LEAVES, lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
                            | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=20)


@settings(max_examples=examples(300), deadline=None)
@given(_JSON_VALUES)
def test_outputs_are_encoded_exactly_as_torchserve_does(value: object) -> None:
    assert torch_server.dumps_indent2(value) == json.dumps(value, indent=2)


def test_unusual_outputs_fall_back_to_json_dumps() -> None:
    assert torch_server.dumps_indent2({1: [2.5]}) == json.dumps({1: [2.5]}, indent=2)  # a non-str key
    assert torch_server.dumps_indent2([torch.tensor([1.5])]) == '[\n  [\n    1.5\n  ]\n]'  # via tolist()
    assert torch_server.dumps_indent2({"x": True.__class__(1)}) == '{\n  "x": true\n}'
