"""TorchServe-compatible inference server for ``.mar`` model archives (the ``torch`` runtime).

Run inside the runtime image as ``python -m modelfleet.runtimes.torch_server``. It serves the
TorchServe inference API on one port (default 8080) without TorchServe's Java frontend:

    GET  /ping                                -> 200 {"status": "Healthy"} once the model answers
                                                 500 {"status": "Unhealthy", "message": ...} before
    POST /predictions/<model>[/<version>]     -> the handler's per-request output
    POST /explanations/<model>[/<version>]    -> same, with the "explain" request header set
    GET  /models                              -> the model this server holds (management API's list)
    GET  /models/<model>[/<version>|/all]     -> the management API's describe: a list of one
                                                 {"modelName", "modelVersion", "modelUrl", "workers",
                                                 "jobQueueStatus", ...} plus "modelfleet": which
                                                 deployment and artifact this is (from the daemon)

What the daemon says about the model comes through ``modelfleet.runtimes.contract``. The
archive is ``MODELFLEET_MODEL_ARCHIVE`` when set (absolute, or relative to the model directory),
else the single ``*.mar`` under ``MODELFLEET_MODEL_DIR`` (default ``/model``, mounted read-only;
it may also be the archive itself or an already extracted archive); ``MODELFLEET_MODEL_NAME``
renames the model (default: the manifest's ``modelName``). The older ``MODEL_DIR``,
``MODEL_FILE`` and ``MODEL_NAME`` still work. It is extracted into a writable temporary directory
(``MODELFLEET_WORK_DIR``, default the system temp dir), ``MAR-INF/MANIFEST.json`` is read, and the
handler is loaded with TorchServe's own contract, reusing the ``ts`` package of the PyPI
``torchserve`` wheel: a custom handler module from the archive (a class with
``initialize(context)``/``handle(data, context)``, or a module-level ``handle(data, context)``
function, or ``module:function``) or one of TorchServe's default handlers by name
(``image_classifier``, ``text_classifier``, ...), with a ``ts.context.Context`` built as the
TorchServe worker builds it (model_dir, manifest, gpu_id None, the batch size, the model's
``configFile`` YAML, the metrics cache).

Request data reaches the handler as TorchServe's frontend passes it: one dict per request with
the query parameters (as bytes), then either ``"body"`` (a JSON body parsed, ``text/*`` as str,
anything else as bytes) or one entry per multipart/form field (file parts decoded by their
content type, plain fields as bytes). Output items: bytes as is, str as UTF-8 text, a tensor
``torch.save``d, anything else as JSON (indent 2, as TorchServe). Errors are
``{"code", "type", "message"}``: unknown model 404 ``ModelNotFoundException``, unknown version 404
``ModelVersionNotFoundException``, a handler exception 503 ``InternalServerException``
"Prediction failed" (the server stays up), a ``PredictionException`` its own code.

Readiness: ``/ping`` says Healthy only when the handler loaded AND answered a warm-up call. The
warm-up input is ``MODELFLEET_WARMUP_FILE`` (a path, relative ones inside the extracted archive;
default ``warmup.json`` when the archive carries one, added with ``--extra-files``), or
``MODELFLEET_WARMUP_BODY`` (+ ``MODELFLEET_WARMUP_CONTENT_TYPE``, default application/json):
then the handler must return a valid answer. Without a sample the warm-up sends an empty body:
the handler must run to completion or raise an ordinary exception (a crash, a hang beyond
``MODELFLEET_WARMUP_TIMEOUT`` seconds or a load failure keep the runtime unready).
``MODELFLEET_WARMUP=0`` skips the call. The start is timed: once ready, one ``startup:`` log line
says how long after the process started and where the time went (import torch, extraction, the
handler, the warm-up); Python's garbage collector is paused while loading and warming up, and what
was loaded is then frozen (``MODELFLEET_GC_FREEZE=0`` keeps it running; see ``_common.collector_paused``).
Batching is TorchServe's (``Batcher``): at most ``batchSize`` requests per handler call (the
context says that size), a batch handed over once that many wait or ``maxBatchDelay`` ms after it
started forming; the settings come from the manifest (``MODELFLEET_BATCH_SIZE``,
``MODELFLEET_MAX_BATCH_DELAY``), else the archive's model-config YAML, else 1 and 100 ms. A handler
answering a batch with a list of the wrong length fails each of its requests (503). Inference
requests with a plain body are answered straight on ASGI (``FastPath``: starlette's Request and
Response cost ~40 % of a small model's request); forms and the other routes go through starlette.
Not implemented: streaming responses (``send_intermediate_predict_response``), continuous batching,
the management API (port 8081) and gRPC.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import importlib
import io
import json
import logging
import math
import mimetypes
import os
import shutil
import sys
import tarfile
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as _json_string  # json.dumps' (the C one when built)
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from modelfleet.runtimes import RUNTIME_VERSION
from modelfleet.runtimes._common import (
    ENV_WARMUP,
    BodyTooLarge,
    ModelThread,
    Phase,
    QueueFull,
    Readiness,
    StartupTimes,
    WarmupRejected,
    check_health,
    check_readable,
    configure_torch_threads,
    contract_from_env,
    env_bool,
    env_float,
    env_int,
    env_str,
    json_response,
    load_then_warm,
    read_body,
    reject_declared_oversize,
    run_server,
    setup_logging,
)
from modelfleet.runtimes.contract import (
    ENV_MODEL_ARCHIVE,
    LEGACY_NAMES,
    MAX_BATCH_DELAY_MS,
    MAX_BATCH_SIZE,
    RuntimeEnvironment,
)

log = logging.getLogger("modelfleet.runtime.torch")

ENV_WORK_DIR = "MODELFLEET_WORK_DIR"
ENV_WARMUP_FILE = "MODELFLEET_WARMUP_FILE"
ENV_WARMUP_BODY = "MODELFLEET_WARMUP_BODY"
ENV_WARMUP_CONTENT_TYPE = "MODELFLEET_WARMUP_CONTENT_TYPE"
ENV_WARMUP_TIMEOUT = "MODELFLEET_WARMUP_TIMEOUT"
ENV_MAX_REQUEST_SIZE = "TS_MAX_REQUEST_SIZE"  # TorchServe's setting name and default (6.25 MiB)
DEFAULT_MAX_REQUEST_SIZE = 6553500
DEFAULT_WARMUP_FILE = "warmup.json"
DEFAULT_BATCH_SIZE = 1  # TorchServe's defaults (batch_size, max_batch_delay)
DEFAULT_MAX_BATCH_DELAY_MS = 100
MANIFEST_PATH = "MAR-INF/MANIFEST.json"


class ArchiveError(Exception):
    """The model archive cannot be found, extracted or read."""


class HandlerLoadError(Exception):
    """The handler could not be imported or initialized."""


# --------------------------------------------------------------------------- archive


def find_archive(model_dir: Path, model_file: str | None = None) -> Path:
    """The archive to serve: a ``.mar`` file, or a directory holding an extracted archive."""
    if model_file:
        path = Path(model_file)
        path = path if path.is_absolute() else model_dir / path
        if not path.exists():
            raise ArchiveError(f"the model archive {model_file} ({ENV_MODEL_ARCHIVE}): {path} does not exist")
        return path
    if model_dir.is_file():
        return model_dir
    if not model_dir.is_dir():
        raise ArchiveError(f"model directory {model_dir} does not exist (is the model mounted?)")
    if (model_dir / MANIFEST_PATH).is_file():
        return model_dir
    archives = sorted(p for p in model_dir.iterdir() if p.suffix == ".mar" and p.is_file())
    if not archives:  # tolerate one level of nesting (a volume holding <sha>/<name>.mar)
        archives = sorted(p for p in model_dir.glob("*/*.mar") if p.is_file())
    if len(archives) == 1:
        return archives[0]
    if not archives:
        found = ", ".join(sorted(p.name for p in model_dir.iterdir())[:10]) or "nothing"
        raise ArchiveError(f"no *.mar archive in {model_dir} (found: {found})")
    names = ", ".join(str(p.relative_to(model_dir)) for p in archives)
    raise ArchiveError(f"several archives in {model_dir} ({names}): set {ENV_MODEL_ARCHIVE} "
                       f"(or {LEGACY_NAMES[ENV_MODEL_ARCHIVE]}) to one of them")


def _safe_target(root: Path, member: str) -> Path:
    target = (root / member).resolve()
    if target != root and root not in target.parents:
        raise ArchiveError(f"archive member {member!r} points outside the extraction directory")
    return target


def extract_archive(archive: Path, work_root: Path) -> Path:
    """Extract ``archive`` (zip, as torch-model-archiver writes it, or tar/tgz) below ``work_root``.

    Streams member by member (archives can be several GB); returns the directory that holds
    ``MAR-INF/MANIFEST.json``. An already extracted directory is used in place.
    """
    if archive.is_dir():
        return archive
    work_root.mkdir(parents=True, exist_ok=True)
    remove_stale_extractions(work_root)
    dest = Path(tempfile.mkdtemp(prefix="mar-", dir=work_root)).resolve()
    (dest / OWNER_FILE).write_text(_owner())
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                target = _safe_target(dest, info.filename)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 4 * 2**20)
                mode = (info.external_attr >> 16) & 0o777
                if mode:
                    target.chmod(mode | 0o600)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            for member in tf:
                _safe_target(dest, member.name)
                if member.issym() or member.islnk():
                    _safe_target(dest, os.path.join(os.path.dirname(member.name), member.linkname))
            tf.extractall(dest, filter="data")
    else:
        raise ArchiveError(f"{archive}: neither a zip (.mar) nor a tar archive")
    if (dest / MANIFEST_PATH).is_file():
        return dest
    # tgz archives from torch-model-archiver hold one top-level directory.
    subdirs = [p for p in dest.iterdir() if p.is_dir() and (p / MANIFEST_PATH).is_file()]
    if len(subdirs) == 1:
        return subdirs[0]
    raise ArchiveError(f"{archive}: no {MANIFEST_PATH} in the archive")


OWNER_FILE = ".modelfleet-owner"


def _owner() -> str:
    return f"{os.uname().nodename}\n{os.getpid()}\n"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_extractions(work_root: Path) -> None:
    """Remove what earlier runs extracted on this host whose process is gone: a restarted
    container would otherwise pile up copies of a multi-GB archive in its writable layer. The
    directories of live servers (several may share a work root outside containers) stay."""
    host = os.uname().nodename
    for path in work_root.glob("mar-*"):
        try:
            owner_host, owner_pid = (path / OWNER_FILE).read_text().split()[:2]
        except (OSError, ValueError):
            continue
        if owner_host == host and (int(owner_pid) == os.getpid() or not _alive(int(owner_pid))):
            shutil.rmtree(path, ignore_errors=True)


def read_manifest(model_dir: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((model_dir / MANIFEST_PATH).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArchiveError(f"cannot read {MANIFEST_PATH}: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("model"), dict):
        raise ArchiveError(f"{MANIFEST_PATH} has no \"model\" object")
    if manifest["model"].get("handler") in (None, ""):
        raise ArchiveError(f"{MANIFEST_PATH}: model.handler is missing")
    return manifest


# --------------------------------------------------------------------------- handler


def _import_handler_module(handler: str, model_dir: Path) -> tuple[Any, str | None]:
    """Import the handler like TorchServe's TsModelLoader: ``file.py[:function]`` from the
    archive, else a default handler of ``ts.torch_handler`` by name."""
    module_part, _, function_name = handler.partition(":")
    module_name = module_part[:-3] if module_part.endswith(".py") else module_part
    module_name = module_name.split("/")[-1]
    in_archive = (model_dir / f"{module_name}.py").is_file() or (model_dir / module_name).is_dir()
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if in_archive:  # the custom handler exists but fails to import: say why, do not mask it
            raise HandlerLoadError(f"handler {handler!r} from the archive fails to import: {exc}") from exc
        try:
            module = importlib.import_module(f".{module_name}", "ts.torch_handler")
        except ImportError as exc2:
            raise HandlerLoadError(
                f"handler {handler!r}: not in the archive and not a TorchServe default handler ({exc2})"
            ) from exc2
    return module, function_name or None


def load_handler(model_name: str, model_dir: Path, manifest: dict[str, Any],
                 batch_size: int = 1, times: StartupTimes | None = None) -> tuple[Callable[[Any, Any], Any], Any]:
    """(entry point, context) of the archive's handler, initialized. Like ts.model_loader; the
    context says ``batch_size`` (what the server hands the handler at most in one call).

    The model directory goes first on sys.path and becomes the working directory, as in a
    TorchServe worker (handlers import their model file and siblings by bare module name).
    """
    times = times if times is not None else StartupTimes()
    with times.step("import ts, metrics config"):
        import ts
        from ts.context import Context
        from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
        from ts.utils.util import get_yaml_config, list_classes_from_module

        model = manifest["model"]
        model_yaml_config: dict[str, Any] = {}
        if model.get("configFile"):
            model_yaml_config = get_yaml_config(str(model_dir / model["configFile"])) or {}

        metrics_config = Path(ts.__file__).parent / "configs" / "metrics.yaml"
        metrics = MetricsCacheYamlImpl(config_file_path=str(metrics_config))
        metrics.initialize_cache()
        metrics.model_name = model_name

    context = Context(model_name, str(model_dir), manifest, batch_size, None, ts.__version__,
                      True, metrics, model_yaml_config)
    if (model_dir / "requirements.txt").is_file():
        log.warning("the archive carries requirements.txt: it is NOT installed (no package index in "
                    "the container); the packages must be in the runtime image")

    if str(model_dir) not in sys.path:
        sys.path.insert(0, str(model_dir))
    os.chdir(model_dir)
    with times.step("import handler"):
        module, function_name = _import_handler_module(str(model["handler"]), model_dir)
    function_name = function_name or "handle"
    entry_point: Callable[[Any, Any], Any]
    if hasattr(module, function_name) and callable(getattr(module, function_name)):
        entry_point = getattr(module, function_name)
        with times.step("initialize handler"):
            entry_point(None, context)  # TorchServe's function contract: initialize = handle(None, ctx)
    else:
        classes = list_classes_from_module(module)
        if len(classes) != 1:
            raise HandlerLoadError(
                f"expected only one class in custom service code or a function entry point, "
                f"found {[c.__name__ for c in classes]}"
            )
        with times.step("initialize handler"):
            service = classes[0]()
            if not hasattr(service, "handle"):
                raise HandlerLoadError(f"expect handle method in class {classes[0].__name__}")
            service.initialize(context)
        entry_point = service.handle
    return entry_point, context


# --------------------------------------------------------------------------- predictions


@dataclass(frozen=True)
class BatchSettings:
    """TorchServe's dynamic batching: at most ``size`` requests per handler call; a batch is handed
    over once ``size`` requests wait, or ``max_delay_ms`` after it started forming."""

    size: int = DEFAULT_BATCH_SIZE
    max_delay_ms: int = DEFAULT_MAX_BATCH_DELAY_MS
    source: str = "default"  # where they come from: the manifest (contract), the archive's model-config


def batch_settings(environment: RuntimeEnvironment, model_yaml_config: Mapping[str, Any]) -> BatchSettings:
    """The manifest's settings (``MODELFLEET_BATCH_SIZE`` / ``MODELFLEET_MAX_BATCH_DELAY``) first,
    then the archive's model-config YAML (``batchSize`` / ``maxBatchDelay``, as TorchServe reads it),
    then TorchServe's defaults (1, 100 ms)."""
    size, delay, sources = DEFAULT_BATCH_SIZE, DEFAULT_MAX_BATCH_DELAY_MS, []
    for key, bound in (("batchSize", MAX_BATCH_SIZE), ("maxBatchDelay", MAX_BATCH_DELAY_MS)):
        if key not in model_yaml_config:
            continue
        value = model_yaml_config[key]
        low = 1 if key == "batchSize" else 0
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= bound:
            raise ArchiveError(f"the archive's model-config: {key}={value!r}: use a whole number {low}-{bound}"
                               + (" (milliseconds)" if key == "maxBatchDelay" else ""))
        if key == "batchSize":
            size = value
        else:
            delay = value
        sources.append("archive model-config")
    if environment.batch_size is not None:
        size = environment.batch_size
        sources.append("manifest")
    if environment.max_batch_delay is not None:
        delay = environment.max_batch_delay
        sources.append("manifest")
    return BatchSettings(size, delay, " + ".join(dict.fromkeys(sources)) or "default")


@dataclass
class Prediction:
    status: int
    body: bytes
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    error_type: str | None = None


def decode_value(value: bytes, content_type: str | None) -> Any:
    """A request value as TorchServe's worker decodes it (``_retrieve_input_data``)."""
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    decode = os.environ.get("TS_DECODE_INPUT_REQUEST", "true") == "true"
    if decode and mime == "application/json":
        try:
            return json.loads(value.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            return value
    if decode and mime.startswith("text"):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    return value


def encode_output(value: Any, content_type: str | None) -> tuple[bytes, str]:
    """One handler output item as TorchServe's ``create_predict_response`` encodes it."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value), content_type or "application/octet-stream"
    if isinstance(value, str):
        return value.encode("utf-8"), content_type or "text/plain; charset=utf-8"
    if type(value).__module__.startswith("torch") and type(value).__name__ == "Tensor":
        import torch

        buf = io.BytesIO()
        torch.save(value, buf)
        return buf.getvalue(), content_type or "application/octet-stream"
    body = dumps_indent2(value).encode("utf-8")
    return body, content_type or "application/json"


class _Unusual(Exception):
    """A value ``_encode`` leaves to json.dumps (a subclass, a non-str key, an object)."""


def dumps_indent2(value: Any) -> str:
    """``json.dumps(value, indent=2, default=_tolist)``, TorchServe's output format, byte for byte:
    with ``indent`` json uses its pure-Python encoder (a twelfth of a small model's request); this
    walks plain dicts, lists, strings and numbers directly, and hands anything else to json.dumps."""
    out: list[str] = []
    try:
        _encode(value, "", out)
    except (_Unusual, RecursionError):
        return json.dumps(value, indent=2, default=_tolist)
    return "".join(out)


def _encode(value: Any, indent: str, out: list[str]) -> None:
    kind = type(value)
    if kind is str:
        out.append(_json_string(value))
    elif kind is float:
        out.append(_json_float(value))
    elif kind is int:
        out.append(int.__repr__(value))
    elif value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif kind is list or kind is tuple:
        if not value:
            out.append("[]")
            return
        inner = indent + "  "
        separator = ",\n" + inner
        out.append("[\n" + inner)
        for index, item in enumerate(value):
            if index:
                out.append(separator)
            _encode(item, inner, out)
        out.append("\n" + indent + "]")
    elif kind is dict:
        if not value:
            out.append("{}")
            return
        inner = indent + "  "
        separator = ",\n" + inner
        out.append("{\n" + inner)
        for index, (key, item) in enumerate(value.items()):
            if type(key) is not str:
                raise _Unusual
            if index:
                out.append(separator)
            out.append(_json_string(key) + ": ")
            _encode(item, inner, out)
        out.append("\n" + indent + "}")
    else:
        raise _Unusual


def _json_float(value: float) -> str:
    if value != value:
        return "NaN"
    if value == math.inf:
        return "Infinity"
    if value == -math.inf:
        return "-Infinity"
    return float.__repr__(value)


def _tolist(value: Any) -> Any:
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


@functools.lru_cache(maxsize=1024)
def _title(name: str) -> str:
    return "-".join(part.capitalize() for part in name.split("-"))


@dataclass
class BatchItem:
    """One request waiting for the handler: its input row as TorchServe's worker builds it."""

    row: dict[str, Any]
    param_types: Mapping[str, str | None]
    headers: Iterable[tuple[str, str]]
    request_id: str


class LoadedModel:
    """A handler ready to be called, with the per-request bookkeeping of ts.service.Service."""

    def __init__(self, name: str, version: str, model_dir: Path, manifest: dict[str, Any],
                 entry_point: Callable[[list[dict[str, Any]], Any], Any], context: Any) -> None:
        self.name = name
        self.version = version
        self.model_dir = model_dir
        self.manifest = manifest
        self.entry_point = entry_point
        self.context = context
        self.batching = BatchSettings()

    def predict(self, row: dict[str, Any], param_types: Mapping[str, str | None],
                headers: Iterable[tuple[str, str]], request_id: str | None = None) -> Prediction:
        """One request through the handler (a batch of one). Runs on the model thread."""
        return self.predict_batch([BatchItem(row, param_types, headers, request_id or str(uuid.uuid4()))])[0]

    def predict_batch(self, items: list[BatchItem]) -> list[Prediction]:
        """Requests through one handler call, as ts.service.Service.predict: ``handle(data, context)``
        gets one row per request and must return a list of the same length; a failure of the call
        answers every request of the batch. Runs on the model thread."""
        from ts.context import RequestProcessor
        from ts.utils.util import PredictionException

        ids = {index: item.request_id for index, item in enumerate(items)}
        processors = []
        for item in items:
            request_headers: dict[str, Any] = {name: {"content-type": ct or ""}
                                               for name, ct in item.param_types.items()}
            for key, value in item.headers:
                request_headers[key] = value
                request_headers.setdefault(_title(key), value)
            processors.append(RequestProcessor(request_headers))
        ctx = self.context
        ctx.request_ids = ids
        ctx.request_processor = processors
        if ctx.metrics is not None:
            ctx.metrics.request_ids = ids
        ctx.cl_socket = None
        count = len(items)
        try:
            ret = self.entry_point([item.row for item in items], ctx)
        except MemoryError:
            log.error("system out of memory", exc_info=True)
            return _worker_errors(count, 507, "Out of resources")
        except PredictionException as exc:
            log.error("prediction error", exc_info=True)
            return _worker_errors(count, int(exc.error_code), str(exc.message))
        except Exception as exc:
            if "CUDA" in str(exc):
                log.error("CUDA out of memory", exc_info=True)
                return _worker_errors(count, 507, "Out of resources")
            log.warning("invoking custom service failed", exc_info=True)
            return _worker_errors(count, 503, "Prediction failed")
        if not isinstance(ret, list):
            log.warning("model %s: invalid return type %s", self.name, type(ret).__name__)
            return _worker_errors(count, 503, "Invalid model predict output")
        if len(ret) != count:
            log.warning("model %s: number of batch response mismatched, expect %d, got %d", self.name, count, len(ret))
            return _worker_errors(count, 503, f"number of batch response mismatched: the handler returned {len(ret)} "
                                              f"answers for a batch of {count} requests (it must return one per "
                                              f"request, in order)")
        predictions = []
        for index, value in enumerate(ret):
            status, _phrase = ctx.get_response_status(index)
            response_headers = dict(ctx.get_response_headers(index))
            content_type = response_headers.pop("content-type", None) or None
            try:
                body, content_type = encode_output(value, content_type)
            except (TypeError, ValueError):
                log.warning("unable to serialize model output", exc_info=True)
                predictions.append(_worker_error(503, "Unsupported model output data type."))
                continue
            predictions.append(Prediction(status or 200, body, content_type, response_headers))
        return predictions


def _worker_errors(count: int, code: int, message: str) -> list[Prediction]:
    return [_worker_error(code, message) for _ in range(count)]


def _worker_error(code: int, message: str) -> Prediction:
    return Prediction(code, b"", error_type="InternalServerException",
                      headers={"x-error-message": message})


def open_model(model_dir: Path, work_root: Path, model_file: str | None = None,
               model_name: str | None = None, times: StartupTimes | None = None,
               environment: RuntimeEnvironment | None = None) -> LoadedModel:
    """Find, extract and load the archive under ``model_dir``: the whole load path (its steps
    timed into ``times``); the batch settings from ``environment`` (the manifest's), else the
    archive's model-config, else TorchServe's defaults."""
    times = times if times is not None else StartupTimes()
    archive = find_archive(model_dir, model_file)
    check_readable(archive)
    log.info("model archive: %s", archive)
    t0 = time.monotonic()
    with times.step("extract archive"):
        extracted = extract_archive(archive, work_root)
    log.info("extracted to %s in %.2f s", extracted, time.monotonic() - t0)
    manifest = read_manifest(extracted)
    name = model_name or str(manifest["model"].get("modelName") or archive.stem)
    version = str(manifest["model"].get("modelVersion") or "1.0")
    config_file = manifest["model"].get("configFile")
    model_yaml_config: dict[str, Any] = {}
    if config_file:
        from ts.utils.util import get_yaml_config

        model_yaml_config = get_yaml_config(str(extracted / config_file)) or {}
    batching = batch_settings(environment or RuntimeEnvironment(), model_yaml_config)
    entry_point, context = load_handler(name, extracted, manifest, batching.size, times=times)
    model = LoadedModel(name, version, extracted, manifest, entry_point, context)
    model.batching = batching
    return model


# --------------------------------------------------------------------------- batching


class Batcher:
    """TorchServe's batch aggregation, on the event loop.

    Requests wait in order. A full batch (``size`` requests waiting) goes to the model thread at
    once, even while the thread runs the previous one (at most ``MAX_IN_FLIGHT`` batches handed
    over: the thread then starts the next without waiting for the loop, which matters for small
    models). A partial batch waits for the model thread to be free, then at most ``max_delay_ms``
    for more requests (TorchServe's BatchAggregator starts that clock when the worker polls), then
    goes as it is. Bounded: beyond ``queue_size`` requests accepted and not yet answered,
    QueueFull. A batch that fails as a whole answers each of its requests."""

    MAX_IN_FLIGHT = 2

    def __init__(self, thread: ModelThread, queue_size: int) -> None:
        self.thread = thread
        self.queue_size = queue_size
        self._waiting: collections.deque[tuple[BatchItem, asyncio.Future[Prediction]]] = collections.deque()
        self._pending = 0
        self._in_flight = 0
        self._task: asyncio.Task[None] | None = None
        self._signal: asyncio.Future[None] | None = None
        self._size = DEFAULT_BATCH_SIZE
        self.batches = 0  # handler calls made (tests)

    @property
    def pending(self) -> int:
        """Requests accepted and not answered yet (waiting, or in a batch being run)."""
        return self._pending

    async def submit(self, model: LoadedModel, item: BatchItem) -> Prediction:
        if self._pending >= self.queue_size:
            raise QueueFull(f"{self._pending} requests are waiting for the model")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Prediction] = loop.create_future()
        self._waiting.append((item, future))
        self._pending += 1
        try:
            if self._task is None:
                self._task = loop.create_task(self._run(model))
            elif len(self._waiting) >= self._size and self._in_flight < self.MAX_IN_FLIGHT:
                self._notify()
            return await future
        finally:
            self._pending -= 1

    def _notify(self) -> None:
        signal = self._signal
        if signal is not None and not signal.done():
            signal.set_result(None)

    async def _wait(self, timeout: float | None = None) -> None:
        """Until ``_notify`` (a full batch formed, a batch finished) or ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        signal: asyncio.Future[None] = loop.create_future()
        self._signal = signal
        timer = loop.call_later(timeout, _resolve, signal) if timeout is not None else None
        try:
            await signal
        finally:
            if timer is not None:
                timer.cancel()
            self._signal = None

    async def _run(self, model: LoadedModel) -> None:
        loop = asyncio.get_running_loop()
        size = self._size = model.batching.size
        delay = model.batching.max_delay_ms / 1000
        waiting = self._waiting
        try:
            while waiting:
                if self._in_flight >= self.MAX_IN_FLIGHT or (self._in_flight and len(waiting) < size):
                    await self._wait()  # the model thread is busy: the batch keeps forming
                    continue
                if len(waiting) < size and size > 1 and delay > 0:
                    deadline = loop.time() + delay  # the model thread is free: wait for the batch to fill
                    while len(waiting) < size and (remaining := deadline - loop.time()) > 0:
                        await self._wait(remaining)
                self._dispatch(model, [waiting.popleft() for _ in range(min(size, len(waiting)))])
        finally:
            self._task = None
            while waiting:  # stopped by an error or cancelled (shutdown): nobody is left waiting
                _, future = waiting.popleft()
                if not future.done():
                    future.set_exception(QueueFull("the server is shutting down"))

    def _dispatch(self, model: LoadedModel, batch: list[tuple[BatchItem, asyncio.Future[Prediction]]]) -> None:
        self.batches += 1
        self._in_flight += 1
        items = [item for item, _ in batch]
        try:
            running = self.thread.start(functools.partial(model.predict_batch, items))
        except Exception as exc:  # the executor is gone (shutting down): answer, do not hang
            self._finish(batch, None, exc)
            return
        running.add_done_callback(lambda done: self._finish(batch, done, None))

    def _finish(self, batch: list[tuple[BatchItem, asyncio.Future[Prediction]]],
                done: asyncio.Future[list[Prediction]] | None, error: BaseException | None) -> None:
        self._in_flight -= 1
        if done is not None:
            error = done.exception() if not done.cancelled() else QueueFull("the server is shutting down")
        if error is None and done is not None:
            for (_, future), result in zip(batch, done.result(), strict=True):
                if not future.done():
                    future.set_result(result)
        else:
            for _, future in batch:
                if not future.done():
                    future.set_exception(error or QueueFull("the batch failed"))
        self._notify()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


# --------------------------------------------------------------------------- HTTP


def ts_error(code: int, type_: str, message: str) -> Response:
    return json_response({"code": code, "type": type_, "message": message}, code, indent=2)


@dataclass
class WarmupSample:
    row: dict[str, Any]
    param_types: dict[str, str | None]
    required: bool  # a sample given by the user must be answered successfully


def warmup_sample(model_dir: Path) -> WarmupSample:
    body_env = os.environ.get(ENV_WARMUP_BODY)
    if body_env is not None:
        content_type = env_str(ENV_WARMUP_CONTENT_TYPE, "application/json")
        value = decode_value(body_env.encode("utf-8"), content_type)
        return WarmupSample({"body": value}, {"body": content_type}, True)
    file_env = os.environ.get(ENV_WARMUP_FILE, "").strip()
    candidate = Path(file_env) if file_env else Path(DEFAULT_WARMUP_FILE)
    path = candidate if candidate.is_absolute() else model_dir / candidate
    if path.is_file():
        content_type = env_str(ENV_WARMUP_CONTENT_TYPE, "") or mimetypes.guess_type(path.name)[0] or ""
        value = decode_value(path.read_bytes(), content_type)
        return WarmupSample({"body": value}, {"body": content_type}, True)
    if file_env:
        raise ArchiveError(f"{ENV_WARMUP_FILE}={file_env}: {path} does not exist")
    return WarmupSample({"body": b""}, {"body": ""}, False)


class TorchRuntime:
    """State of the server: the model (once loaded), readiness, the model thread."""

    def __init__(self, model_dir: Path | None = None, *, work_root: Path | None = None,
                 model_file: str | None = None, model_name: str | None = None,
                 warmup: bool | None = None, environment: RuntimeEnvironment | None = None) -> None:
        """Settings from ``environment`` (default: this process's, through the contract); the
        keyword arguments override them (tests)."""
        self.environment = environment if environment is not None else contract_from_env()
        self.model_dir = model_dir or Path(self.environment.model_path)
        self.work_root = work_root or Path(env_str(ENV_WORK_DIR, tempfile.gettempdir()))
        self.model_file = model_file if model_file is not None else self.environment.model_archive
        self.model_name = model_name if model_name is not None else self.environment.model_name
        self.warmup = env_bool(ENV_WARMUP, True) if warmup is None else warmup
        self.warmup_timeout = env_float(ENV_WARMUP_TIMEOUT, 300.0)
        self.max_request_size = env_int(ENV_MAX_REQUEST_SIZE, DEFAULT_MAX_REQUEST_SIZE)
        self.readiness = Readiness()
        self.thread = ModelThread.from_env()
        self.batcher = Batcher(self.thread, self.thread.queue_size)
        self.model: LoadedModel | None = None
        self.started_at = time.time()
        self._load_task: asyncio.Task[None] | None = None

    # -- loading

    def _load(self) -> LoadedModel:
        times = self.readiness.startup
        with times.step("import torch"):
            configure_torch_threads()
        model = open_model(self.model_dir, self.work_root, self.model_file, self.model_name, times,
                           self.environment)
        self.model = model  # requests may reach it while it warms up
        batching = model.batching
        log.info("model %s version %s, batchSize %d, maxBatchDelay %d ms (%s)", model.name, model.version,
                 batching.size, batching.max_delay_ms, batching.source)
        return model

    def _warm(self, model: LoadedModel) -> None:
        """One call with the warm-up sample; a sample given by the user must be answered."""
        sample = warmup_sample(model.model_dir)
        prediction = model.predict(sample.row, sample.param_types, [], "warmup")
        if prediction.error_type is not None and sample.required:
            message = prediction.headers.get("x-error-message", "")
            raise WarmupRejected(f"the warm-up request failed: {prediction.status} {message}")
        if prediction.error_type is not None:
            log.info("warm-up without a sample input (ship %s in the archive for a real check): the handler "
                     "ran and rejected the empty body (%s); counted as an answer", DEFAULT_WARMUP_FILE,
                     prediction.status)

    async def load(self) -> None:
        """Load, then warm up; readiness follows. Never raises: failures make the runtime unready."""
        await load_then_warm(self.thread, self.readiness, self._load, self._warm if self.warmup else None,
                             warmup_timeout=self.warmup_timeout)

    # -- routes

    async def ping(self, request: Request) -> Response:
        health = check_health(self.readiness, self.thread)
        if health.healthy:
            return json_response({"status": "Healthy"}, 200, indent=2)
        return json_response({"status": "Unhealthy", "phase": health.phase.value, "message": health.message},
                             500, indent=2)

    async def list_models(self, request: Request) -> Response:
        models = []
        if self.model is not None:
            models.append({"modelName": self.model.name, "modelUrl": self.model.name + ".mar"})
        return json_response({"models": models}, 200, indent=2)

    def _find_model(self, request: Request, *, any_version: str | None = None) -> LoadedModel | Response:
        """The model the path names (``{model}``, ``{version}``), or TorchServe's error for it.
        ``any_version``: a version word that means every version (describe's ``all``)."""
        name = request.path_params["model"]
        version = request.path_params.get("version")
        model = self.model
        if model is None:
            return ts_error(503, "ServiceUnavailableException",
                            f"Model \"{name}\" is not available: {self.readiness.message}")
        if name != model.name:
            return ts_error(404, "ModelNotFoundException", f"Model not found: {name}")
        if version is not None and version not in (model.version, any_version):
            return ts_error(404, "ModelVersionNotFoundException",
                            f"Model version: {version} does not exist for model: {name}")
        return model

    async def describe_model(self, request: Request) -> Response:
        """TorchServe's management API ``GET /models/<name>[/<version>|/all]``: one worker (this
        process), its batch settings; ``modelfleet`` says which deployment and artifact this is."""
        model = self._find_model(request, any_version="all")
        if isinstance(model, Response):
            return model
        status = {Phase.READY: "READY", Phase.FAILED: "UNLOADING"}.get(self.readiness.phase, "LOADING")
        worker = {"id": "9000", "startTime": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(self.started_at)),
                  "status": status, "memoryUsage": _resident_bytes(), "pid": os.getpid(), "gpu": False,
                  "gpuUsage": "N/A"}
        description = {
            "modelName": model.name, "modelVersion": model.version, "modelUrl": model.name + ".mar",
            "runtime": "python", "minWorkers": 1, "maxWorkers": 1, "batchSize": model.batching.size,
            "maxBatchDelay": model.batching.max_delay_ms, "loadedAtStartup": True, "workers": [worker],
            "jobQueueStatus": {"remainingCapacity": max(0, self.batcher.queue_size - self.batcher.pending),
                               "pendingRequests": self.batcher.pending},
            "modelfleet": self.environment.provenance(),
        }
        return json_response([description], 200, indent=2)

    async def predictions(self, request: Request) -> Response:
        return await self._infer(request, explain=False)

    async def explanations(self, request: Request) -> Response:
        return await self._infer(request, explain=True)

    async def _infer(self, request: Request, *, explain: bool) -> Response:
        model = self._find_model(request)
        if isinstance(model, Response):
            return model
        name = model.name
        if not self.readiness.ready and self.readiness.phase is not Phase.WARMING:
            return ts_error(503, "ServiceUnavailableException",
                            f"Model \"{name}\" has no worker to serve inference request: {self.readiness.message}")
        try:
            row, param_types = await self._parse(request)
        except BodyTooLarge:
            return ts_error(413, "RequestEntityTooLargeException",
                            f"request is larger than {self.max_request_size} bytes ({ENV_MAX_REQUEST_SIZE})")
        except ClientDisconnect:
            return Response(status_code=499)
        except ValueError as exc:
            return ts_error(400, "BadRequestException", str(exc))
        headers = list(request.headers.items())
        if explain:
            headers.append(("explain", "True"))
        request_id = request.headers.get("x-request-id") or str(uuid.uuid4())
        try:
            prediction = await self.batcher.submit(model, BatchItem(row, param_types, headers, request_id))
        except QueueFull:
            return _queue_full(name)
        if prediction.error_type is not None:
            message = prediction.headers.get("x-error-message", "Prediction failed")
            return ts_error(prediction.status, prediction.error_type, message)
        headers_out = {"x-request-id": request_id, **prediction.headers}
        return Response(prediction.body, status_code=prediction.status, headers=headers_out,
                        media_type=prediction.content_type)

    async def fast_infer(self, scope: Any, receive: Any, send: Any) -> bool:
        """``POST|PUT /predictions|explanations/<model>[/<version>]`` with a plain body (not a form),
        answered straight on ASGI: the same row, headers, errors and answer as ``_infer`` through
        starlette, without its Request/Response objects and routing (the hot path: ~40 % of the
        CPU a request took). False: not such a request (starlette answers it)."""
        parts = scope["path"].split("/")
        if len(parts) not in (3, 4) or parts[0] or parts[1] not in _INFER_ROOTS or not all(parts[2:]):
            return False
        if scope["method"] not in ("POST", "PUT"):
            return False
        content_type = content_length = request_id = ""
        headers: list[tuple[str, str]] = []
        for raw_name, raw_value in scope["headers"]:
            name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
            headers.append((name, value))
            if name == "content-type" and not content_type:  # the first one, as starlette's headers.get
                content_type = value
            elif name == "content-length" and not content_length:
                content_length = value
            elif name == "x-request-id" and not request_id:
                request_id = value
        mime = content_type.split(";", 1)[0].strip().lower()
        if mime in _FORM_TYPES:
            return False
        model = self.model
        name = parts[2]
        failure = self._model_failure(model, name, parts[3] if len(parts) == 4 else None)
        if failure is not None or model is None:
            await _send_response(send, failure or ts_error(503, "ServiceUnavailableException", "not loaded"))
            return True
        limit = self.max_request_size
        if content_length.isdigit() and int(content_length) > limit:
            await _send_response(send, _too_large(limit))
            return True
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return True  # the client left; nobody to answer
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    await _send_response(send, _too_large(limit))
                    return True
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        row: dict[str, Any] = {}
        types: dict[str, str | None] = {}
        if scope["query_string"]:
            for key, value in parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True):
                row[key] = value.encode("utf-8")
                types[key] = None
        row["body"] = decode_value(body, mime)
        types["body"] = mime or None
        if parts[1] == "explanations":
            headers.append(("explain", "True"))
        request_id = request_id or str(uuid.uuid4())
        try:
            prediction = await self.batcher.submit(model, BatchItem(row, types, headers, request_id))
        except QueueFull:
            await _send_response(send, _queue_full(name))
            return True
        if prediction.error_type is not None:
            error = prediction.headers.get("x-error-message", "Prediction failed")
            await _send_response(send, ts_error(prediction.status, prediction.error_type, error))
            return True
        raw_headers = [(b"x-request-id", request_id.encode("latin-1"))]
        raw_headers += [(key.lower().encode("latin-1"), value.encode("latin-1"))
                        for key, value in prediction.headers.items()]
        media_type = prediction.content_type
        if media_type is not None:
            if media_type.startswith("text/") and "charset=" not in media_type.lower():
                media_type += "; charset=utf-8"  # as starlette's Response adds it
            raw_headers.append((b"content-type", media_type.encode("latin-1")))
        raw_headers.append((b"content-length", str(len(prediction.body)).encode("latin-1")))
        await send({"type": "http.response.start", "status": prediction.status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": prediction.body})
        return True

    def _model_failure(self, model: LoadedModel | None, name: str, version: str | None) -> Response | None:
        """TorchServe's error for a request to ``name``/``version`` when it cannot be served now."""
        if model is None:
            return ts_error(503, "ServiceUnavailableException",
                            f"Model \"{name}\" is not available: {self.readiness.message}")
        if name != model.name:
            return ts_error(404, "ModelNotFoundException", f"Model not found: {name}")
        if version is not None and version != model.version:
            return ts_error(404, "ModelVersionNotFoundException",
                            f"Model version: {version} does not exist for model: {name}")
        if not self.readiness.ready and self.readiness.phase is not Phase.WARMING:
            return ts_error(503, "ServiceUnavailableException",
                            f"Model \"{name}\" has no worker to serve inference request: {self.readiness.message}")
        return None

    async def _parse(self, request: Request) -> tuple[dict[str, Any], dict[str, str | None]]:
        """The handler's input row, as TorchServe's frontend + worker build it."""
        row: dict[str, Any] = {}
        types: dict[str, str | None] = {}
        for key, value in request.query_params.multi_items():
            row[key] = value.encode("utf-8")
            types[key] = None
        content_type = request.headers.get("content-type", "")
        mime = content_type.split(";", 1)[0].strip().lower()
        if mime in ("multipart/form-data", "application/x-www-form-urlencoded"):
            reject_declared_oversize(request, self.max_request_size)
            try:
                form = await request.form(max_part_size=self.max_request_size)
            except Exception as exc:  # malformed multipart
                raise ValueError(f"cannot parse the form data: {exc}") from None
            try:
                for key, item in form.multi_items():
                    if isinstance(item, UploadFile):
                        data = await item.read()
                        part_type = item.content_type
                        row[key] = decode_value(data, part_type)
                        types[key] = part_type
                    else:
                        row[key] = item.encode("utf-8")
                        types[key] = None
            finally:
                await form.close()
        else:
            body = await read_body(request, self.max_request_size)
            row["body"] = decode_value(body, mime)
            types["body"] = mime or None
        return row, types

    async def not_found(self, request: Request, exc: Exception) -> Response:
        return ts_error(404, "ResourceNotFoundException",
                        "Requested resource is not found, please refer to API document.")

    async def method_not_allowed(self, request: Request, exc: Exception) -> Response:
        return ts_error(405, "MethodNotAllowedException",
                        "Requested method is not allowed, please refer to API document.")

    def app(self) -> FastPath:
        @asynccontextmanager
        async def lifespan(app: Starlette) -> Any:
            self._load_task = asyncio.create_task(self.load())
            try:
                yield
            finally:
                self.thread.shutdown()
                model = self.model
                if model is not None and (model.model_dir / OWNER_FILE).is_file():
                    shutil.rmtree(model.model_dir, ignore_errors=True)

        methods = ["GET", "POST", "PUT"]
        routes = [
            Route("/ping", self.ping, methods=["GET", "POST"]),
            Route("/models", self.list_models, methods=["GET"]),
            Route("/models/{model}", self.describe_model, methods=["GET"]),
            Route("/models/{model}/{version}", self.describe_model, methods=["GET"]),
            Route("/predictions/{model}", self.predictions, methods=methods),
            Route("/predictions/{model}/{version}", self.predictions, methods=methods),
            Route("/explanations/{model}", self.explanations, methods=methods),
            Route("/explanations/{model}/{version}", self.explanations, methods=methods),
        ]
        app = Starlette(routes=routes, lifespan=lifespan,
                        exception_handlers={404: self.not_found, 405: self.method_not_allowed})
        app.state.runtime = self
        return FastPath(app, self)


class FastPath:
    """The ASGI app: inference requests with a plain body go to ``TorchRuntime.fast_infer``,
    everything else (forms, the other routes, lifespan) to starlette."""

    def __init__(self, app: Starlette, runtime: TorchRuntime) -> None:
        self.app = app
        self.runtime = runtime
        self.state = app.state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and await self.runtime.fast_infer(scope, receive, send):
            return
        await self.app(scope, receive, send)


_INFER_ROOTS = frozenset({"predictions", "explanations"})
_FORM_TYPES = frozenset({"multipart/form-data", "application/x-www-form-urlencoded"})


def _too_large(limit: int) -> Response:
    return ts_error(413, "RequestEntityTooLargeException",
                    f"request is larger than {limit} bytes ({ENV_MAX_REQUEST_SIZE})")


def _queue_full(name: str) -> Response:
    return ts_error(503, "ServiceUnavailableException", f"Model \"{name}\" has no worker to serve inference "
                                                        f"request. Please use scale workers API to add workers.")


async def _send_response(send: Any, response: Response) -> None:
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


def _resident_bytes() -> int:
    """This process's resident memory (TorchServe's worker ``memoryUsage``); 0 where unknown."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def create_app(model_dir: Path | None = None, **kwargs: Any) -> FastPath:
    """The ASGI app (for tests: ``httpx.ASGITransport`` or uvicorn)."""
    return TorchRuntime(model_dir, **kwargs).app()


def main() -> None:
    setup_logging()
    if not env_bool("MODELFLEET_TS_METRICS_LOG", False):
        # BaseHandler logs a "[METRICS]" line per request for TorchServe's frontend to parse; nobody
        # parses them here, and the line costs ~0.1 ms a request. MODELFLEET_TS_METRICS_LOG=1 keeps them.
        logging.getLogger("ts.metrics").setLevel(logging.WARNING)
    log.info("modelfleet torch runtime %s", RUNTIME_VERSION)
    environment = contract_from_env()
    run_server(create_app(environment=environment), "torch runtime", environment.listen_port)


if __name__ == "__main__":
    main()
