"""Real TorchServe model archives for the tests, built with the real ``torch-model-archiver`` CLI.

Used by the unit tests, the integration tests and benchmarks/bench_runtimes.py.

- ``build_eager_mar``: state dict + model.py + a custom handler subclassing BaseHandler.
- ``build_torchscript_mar``: a TorchScript module + the same handler (no model file).
- ``build_function_mar``: a module-level ``handle(data, context)`` that describes its input.
- ``build_failing_mar``: a handler whose initialize() raises.
- ``build_batch_mar``: a handler that says which call and batch each request was answered in.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

MODEL_PY = textwrap.dedent('''\
    import torch
    from torch import nn


    class TinyNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(4, 16)
            self.fc2 = nn.Linear(16, 3)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))
    ''')

# A custom handler as users write them: subclass BaseHandler, override pre/post-processing.
HANDLER_PY = textwrap.dedent('''\
    import json

    import torch
    from ts.torch_handler.base_handler import BaseHandler


    class TinyHandler(BaseHandler):
        def initialize(self, context):
            super().initialize(context)
            self.batch_size = context.system_properties["batch_size"]
            self.gpu_id = context.system_properties["gpu_id"]

        def preprocess(self, data):
            rows = []
            for row in data:
                value = row.get("data")
                if value is None:
                    value = row.get("body")
                if isinstance(value, (bytes, bytearray)):
                    value = json.loads(value.decode("utf-8"))
                if isinstance(value, dict):
                    value = value["inputs"]
                if value == "boom":
                    raise ValueError("the test asked for a failure")
                rows.append(value)
            return torch.tensor(rows, dtype=torch.float32)

        def postprocess(self, data):
            return [{"logits": row, "batch_size": self.batch_size, "gpu_id": self.gpu_id}
                    for row in data.tolist()]
    ''')

# TorchServe's function contract: handle(None, context) initializes, handle(data, context) infers.
FUNCTION_HANDLER_PY = textwrap.dedent('''\
    import json

    _state = {}


    def handle(data, context):
        if data is None:
            _state["model_dir"] = context.system_properties["model_dir"]
            _state["manifest"] = context.manifest
            return None
        row = data[0]
        if row.get("body") == b"":
            raise ValueError("empty body")
        if row.get("body") == b"raw-please":
            return [b"\\x00\\x01raw bytes"]
        if row.get("body") == "say hello":
            return ["hello, text"]
        if row.get("body") == {"status": 418}:
            context.set_response_status(418, "teapot")
            context.set_response_content_type(0, "application/x-teapot")
            return [{"short": "stout"}]
        described = {}
        for key, value in row.items():
            described[key] = {"type": type(value).__name__,
                              "value": value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else value}
        return [{"input": described,
                 "header": context.get_request_header(0, "X-Test-Header"),
                 "content_types": {k: context.get_request_header(0, k) for k in row},
                 "model_name": context.model_name,
                 "model_dir_seen": _state.get("model_dir")}]
    ''')

FAILING_HANDLER_PY = textwrap.dedent('''\
    from ts.torch_handler.base_handler import BaseHandler


    class Broken(BaseHandler):
        def initialize(self, context):
            raise RuntimeError("weights are corrupt")
    ''')


# Batching: every answer says which handler call it came from and how many requests that call got;
# a request {"wrong": true} in a batch makes the handler return one answer too few.
BATCH_HANDLER_PY = textwrap.dedent('''\
    import itertools

    _calls = itertools.count(1)
    _state = {}


    def handle(data, context):
        if data is None:
            _state["batch_size"] = context.system_properties["batch_size"]
            return None
        call = next(_calls)
        bodies = [row.get("body") for row in data]
        answers = [{"call": call, "batch": len(data), "index": index, "body": body,
                    "context_batch_size": _state["batch_size"],
                    "request_id": context.get_request_id(index)}
                   for index, body in enumerate(bodies)]
        if any(isinstance(body, dict) and body.get("wrong") for body in bodies):
            return answers[:-1]
        return answers
    ''')


def archiver() -> str:
    exe = Path(sys.executable).with_name("torch-model-archiver")
    if exe.exists():
        return str(exe)
    found = shutil.which("torch-model-archiver")
    if not found:
        raise RuntimeError("torch-model-archiver is not installed (pip install torch-model-archiver==0.12.0)")
    return found


def _archive(work: Path, name: str, version: str, handler: Path, *, serialized: Path | None = None,
             model_file: Path | None = None, extra: list[Path] | None = None, export: Path,
             more_args: list[str] | None = None) -> Path:
    export.mkdir(parents=True, exist_ok=True)
    cmd = [archiver(), "--model-name", name, "--version", version, "--handler", str(handler),
           "--export-path", str(export), "--force"]
    if serialized is not None:
        cmd += ["--serialized-file", str(serialized)]
    if model_file is not None:
        cmd += ["--model-file", str(model_file)]
    if extra:
        cmd += ["--extra-files", ",".join(str(p) for p in extra)]
    cmd += more_args or []
    subprocess.run(cmd, check=True, cwd=work, capture_output=True, text=True)
    mar = export / f"{name}.mar"
    assert mar.is_file(), f"torch-model-archiver made no {mar}"
    return mar


def tiny_net(seed: int = 0) -> Any:
    """The model of MODEL_PY with deterministic weights, built here (not imported from the archive)."""
    import torch

    namespace: dict[str, Any] = {}
    exec(MODEL_PY, namespace)
    model = namespace["TinyNet"]()
    generator = torch.Generator().manual_seed(seed)  # not the global RNG: archives are built in threads
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.eval()
    return model


def build_eager_mar(directory: Path, name: str = "tiny", version: str = "1.0", *, warmup: bool = True) -> Path:
    """Eager model: state dict + model.py + custom handler; a warmup.json sample inside."""
    import torch

    work = directory / f"src-{name}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "model.py").write_text(MODEL_PY)
    (work / "handler.py").write_text(HANDLER_PY)
    torch.save(tiny_net().state_dict(), work / "tiny.pt")
    extra = []
    if warmup:
        (work / "warmup.json").write_text(json.dumps({"inputs": [[0.0, 0.0, 0.0, 0.0]]}))
        extra.append(work / "warmup.json")
    return _archive(work, name, version, work / "handler.py", serialized=work / "tiny.pt",
                    model_file=work / "model.py", extra=extra, export=directory / f"out-{name}")


def build_torchscript_mar(directory: Path, name: str = "tinyts", version: str = "2.0") -> Path:
    """TorchScript model (torch.jit.trace) + the same custom handler, no model file."""
    import torch

    work = directory / f"src-{name}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "handler.py").write_text(HANDLER_PY)
    torch.jit.trace(tiny_net(), torch.zeros(1, 4)).save(str(work / "tinyts.pt"))
    return _archive(work, name, version, work / "handler.py", serialized=work / "tinyts.pt",
                    export=directory / f"out-{name}")


def build_function_mar(directory: Path, name: str = "echo", version: str = "1.0") -> Path:
    work = directory / f"src-{name}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "echo_handler.py").write_text(FUNCTION_HANDLER_PY)
    return _archive(work, name, version, work / "echo_handler.py", export=directory / f"out-{name}")


def build_failing_mar(directory: Path, name: str = "broken") -> Path:
    work = directory / f"src-{name}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "broken_handler.py").write_text(FAILING_HANDLER_PY)
    return _archive(work, name, "1.0", work / "broken_handler.py", export=directory / f"out-{name}")


def build_batch_mar(directory: Path, name: str = "batch", *, config: dict[str, int] | None = None) -> Path:
    """BATCH_HANDLER_PY; ``config``: a model-config YAML in the archive (``batchSize``, ``maxBatchDelay``)."""
    work = directory / f"src-{name}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "batch_handler.py").write_text(BATCH_HANDLER_PY)
    cmd_extra: list[str] = []
    if config is not None:
        (work / "model-config.yaml").write_text("".join(f"{k}: {v}\n" for k, v in config.items()))
        cmd_extra = ["--config-file", str(work / "model-config.yaml")]
    return _archive(work, name, "1.0", work / "batch_handler.py", export=directory / f"out-{name}",
                    more_args=cmd_extra)
