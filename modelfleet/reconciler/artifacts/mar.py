"""Validation of TorchServe model archives (.mar): a zip with ``MAR-INF/MANIFEST.json``.

Layout of torch-model-archiver 0.12::

    MAR-INF/MANIFEST.json  {"createdOn", "runtime": "python", "archiverVersion",
                            "model": {"modelName", "serializedFile"?, "handler", "modelFile"?,
                                      "modelVersion"}}
    <serializedFile>       e.g. model.pt (a state dict, a TorchScript file, an .onnx ...)
    <handler>.py           unless the handler is a TorchServe default handler or a module path
    <modelFile>, extra files

``validate_mar`` reads the central directory and each entry's local header only (a 5 GB
archive costs a few reads), never decompresses the big entries, and fully reads (so checks the
CRC of) the manifest, the handler and other small entries within a budget. It refuses:
path traversal (``..``), absolute paths, symlinks and other non-regular entries, duplicate names,
encrypted entries, unknown compression methods, entries whose data overlap or run past the
central directory (overlapping-entry zip bombs, truncated or spliced files), and zip bombs by
total uncompressed size, entry count and compression ratio (``MarLimits``).
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelfleet.reconciler.artifacts.errors import InvalidArtifact

MANIFEST_PATH = "MAR-INF/MANIFEST.json"
# Handlers that TorchServe ships in ts.torch_handler (a .mar may name them instead of a file).
DEFAULT_HANDLERS = frozenset({"image_classifier", "text_classifier", "object_detector", "image_segmenter"})
# TorchServe's rule for model names; the name also becomes a file name (/model/<name>.mar).
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_MODULE_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SUPPORTED_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # signature ... name length, extra length (30 bytes)
_LOCAL_SIGNATURE = b"PK\x03\x04"
GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class MarLimits:
    """Bounds against zip bombs, generous enough for multi-GB models."""

    max_total_size: int = 256 * GiB  # sum of the entries' uncompressed sizes
    max_entries: int = 100_000
    max_ratio: float = 200.0  # uncompressed / compressed, per entry and overall ...
    ratio_min_size: int = 1 * MiB  # ... for entries (and archives) at least this big
    max_manifest_size: int = 1 * MiB
    crc_check_max_entry: int = 1 * MiB  # entries up to this size are read whole (CRC-checked)
    crc_check_budget: int = 64 * MiB  # at most this many uncompressed bytes read in all


DEFAULT_LIMITS = MarLimits()


@dataclass(frozen=True)
class MarInfo:
    model_name: str
    handler: str
    serialized_file: str | None
    model_file: str | None
    version: str
    manifest: dict[str, Any]
    entries: int = 0
    uncompressed_size: int = 0
    files: tuple[str, ...] = field(default=(), repr=False)


def validate_mar(path: str | os.PathLike[str], limits: MarLimits = DEFAULT_LIMITS,
                 display_name: str | None = None) -> MarInfo:
    """Check that ``path`` is a sound .mar and return what its manifest says; InvalidArtifact if not.

    ``display_name`` names the archive in messages (e.g. the uploaded file name rather than a
    temporary path).
    """
    name = display_name or Path(path).name
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise InvalidArtifact(f"{name}: cannot read the archive: {exc.strerror}") from None
    try:
        with open(path, "rb") as raw:
            try:
                archive = zipfile.ZipFile(raw)
            except zipfile.BadZipFile as exc:
                raise InvalidArtifact(f"{name}: not a zip archive, or truncated or corrupt "
                                      f"(no readable central directory: {exc})") from None
            with archive:
                return _validate(archive, raw, size, name, limits)
    except InvalidArtifact:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, struct.error,
            NotImplementedError, RuntimeError) as exc:
        raise InvalidArtifact(f"{name}: corrupt archive: {type(exc).__name__}: {exc}") from None


def _validate(archive: zipfile.ZipFile, raw: Any, size: int, name: str, limits: MarLimits) -> MarInfo:
    infos = archive.infolist()
    if len(infos) > limits.max_entries:
        raise InvalidArtifact(f"{name}: {len(infos)} entries, more than the limit of {limits.max_entries}"
                              " (zip bomb?)")
    seen: set[str] = set()
    total = 0
    total_compressed = 0
    for info in infos:
        _check_entry(info, name, limits)
        if info.filename in seen:
            raise InvalidArtifact(f"{name}: entry {info.filename!r} appears twice")
        seen.add(info.filename)
        total += info.file_size
        total_compressed += info.compress_size
        if total > limits.max_total_size:
            raise InvalidArtifact(f"{name}: uncompressed size exceeds the limit of {_size(limits.max_total_size)}"
                                  f" at entry {info.filename!r} (zip bomb?)")
    if total >= limits.ratio_min_size and total > limits.max_ratio * max(total_compressed, 1):
        raise InvalidArtifact(f"{name}: compression ratio {total / max(total_compressed, 1):.0f}:1 exceeds "
                              f"the limit of {limits.max_ratio:.0f}:1 (zip bomb?)")
    _check_layout(infos, raw, size, getattr(archive, "start_dir", size), name)

    manifest_info = next((i for i in infos if i.filename == MANIFEST_PATH), None)
    if manifest_info is None:
        raise InvalidArtifact(f"{name}: no {MANIFEST_PATH}: not a TorchServe model archive "
                              "(build it with torch-model-archiver)")
    if manifest_info.file_size > limits.max_manifest_size:
        raise InvalidArtifact(f"{name}: entry {MANIFEST_PATH!r} is {_size(manifest_info.file_size)}, "
                              f"more than {_size(limits.max_manifest_size)}")
    manifest_bytes = _read_entry(archive, manifest_info, name)
    try:
        manifest = json.loads(manifest_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidArtifact(f"{name}: entry {MANIFEST_PATH!r} is not valid JSON: {exc}") from None
    model = manifest.get("model") if isinstance(manifest, dict) else None
    if not isinstance(model, dict):
        raise InvalidArtifact(f"{name}: entry {MANIFEST_PATH!r}: no \"model\" object")

    model_name = _string(model, "modelName", name, required=True)
    assert model_name is not None
    if not _MODEL_NAME.match(model_name):
        raise InvalidArtifact(f"{name}: entry {MANIFEST_PATH!r}: model.modelName {model_name!r} is not a valid "
                              "model name (letters, digits, '_', '-', '.'; starting with a letter or digit)")
    handler = _string(model, "handler", name, required=True)
    assert handler is not None
    serialized = _string(model, "serializedFile", name)
    model_file = _string(model, "modelFile", name)
    version = _string(model, "modelVersion", name) or "1.0"

    files = {i.filename for i in infos if not i.is_dir()}
    must_read = [manifest_info]
    handler_entry = _handler_entry(handler, files, name)
    for label, entry in (("serializedFile", serialized), ("modelFile", model_file)):
        if entry is not None and _find(entry, files) is None:
            raise InvalidArtifact(f"{name}: model.{label} names {entry!r}, which is not in the archive")
    if handler_entry is not None:
        must_read.append(archive.getinfo(handler_entry))
    _crc_check(archive, infos, must_read, name, limits)
    return MarInfo(model_name=model_name, handler=handler, serialized_file=serialized, model_file=model_file,
                   version=version, manifest=manifest, entries=len(infos), uncompressed_size=total,
                   files=tuple(sorted(files)))


def _check_entry(info: zipfile.ZipInfo, name: str, limits: MarLimits) -> None:
    entry = info.filename
    where = f"{name}: entry {entry!r}"
    if not entry or "\x00" in entry:
        raise InvalidArtifact(f"{where}: empty name or NUL byte in the name")
    if entry.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", entry):
        raise InvalidArtifact(f"{where}: absolute path")
    if ".." in re.split(r"[\\/]", entry):
        raise InvalidArtifact(f"{where}: path traversal ('..')")
    mode = info.external_attr >> 16
    if info.create_system == 3 and mode:  # Unix attributes
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFLNK:
            raise InvalidArtifact(f"{where}: symbolic link (not allowed in a model archive)")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise InvalidArtifact(f"{where}: not a regular file (mode {oct(mode)})")
    if info.flag_bits & 0x1:
        raise InvalidArtifact(f"{where}: encrypted entries are not supported")
    if info.compress_type not in _SUPPORTED_METHODS:
        raise InvalidArtifact(f"{where}: unsupported compression method {info.compress_type}")
    if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
        raise InvalidArtifact(f"{where}: stored entry with compressed size {info.compress_size} "
                              f"!= size {info.file_size} (corrupt)")
    if info.file_size >= limits.ratio_min_size and info.file_size > limits.max_ratio * max(info.compress_size, 1):
        ratio = info.file_size / max(info.compress_size, 1)
        raise InvalidArtifact(f"{where}: compression ratio {ratio:.0f}:1 exceeds the limit of "
                              f"{limits.max_ratio:.0f}:1 (zip bomb?)")


def _check_layout(infos: list[zipfile.ZipInfo], raw: Any, size: int, start_dir: int, name: str) -> None:
    """Each entry's local header is where the central directory says, names agree, and its data ends
    before the next entry begins (no overlapping entries) and before the central directory."""
    ordered = sorted(infos, key=lambda i: i.header_offset)
    for index, info in enumerate(ordered):
        where = f"{name}: entry {info.filename!r}"
        limit = ordered[index + 1].header_offset if index + 1 < len(ordered) else min(start_dir, size)
        raw.seek(info.header_offset)
        header = raw.read(_LOCAL_HEADER.size)
        if len(header) < _LOCAL_HEADER.size:
            raise InvalidArtifact(f"{where}: local header past the end of the file (truncated)")
        fields = _LOCAL_HEADER.unpack(header)
        if fields[0] != _LOCAL_SIGNATURE:
            raise InvalidArtifact(f"{where}: no local file header at offset {info.header_offset} (corrupt)")
        name_length, extra_length = fields[9], fields[10]
        local_name = raw.read(name_length)
        flags = fields[2]
        decoded = local_name.decode("utf-8" if flags & 0x800 else "cp437", "replace")
        if decoded.replace("\\", "/") != info.orig_filename.replace("\\", "/"):
            raise InvalidArtifact(f"{where}: local header names {decoded!r} (inconsistent archive)")
        data_end = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length + info.compress_size
        if data_end > limit:
            if data_end > size:
                raise InvalidArtifact(f"{where}: data runs past the end of the file (truncated)")
            raise InvalidArtifact(f"{where}: data overlaps the next entry or the central directory "
                                  "(overlapping entries: zip bomb or corrupt archive)")


def _handler_entry(handler: str, files: set[str], name: str) -> str | None:
    """The archive entry of the handler file, None for a default handler or a module path."""
    module = handler.split(":", 1)[0]
    if module.endswith(".py"):
        found = _find(module, files)
        if found is None:
            raise InvalidArtifact(f"{name}: handler {module!r} (model.handler) is not in the archive")
        return found
    if module in DEFAULT_HANDLERS:
        return None
    if _IDENTIFIER.match(module):
        found = _find(module + ".py", files)
        if found is None:
            raise InvalidArtifact(
                f"{name}: handler {module!r} (model.handler) is neither a file in the archive nor a TorchServe "
                f"default handler ({', '.join(sorted(DEFAULT_HANDLERS))})")
        return found
    if _MODULE_PATH.match(module):
        return _find(module.replace(".", "/") + ".py", files)  # else installed in the runtime image
    raise InvalidArtifact(f"{name}: handler {handler!r} (model.handler) is not a file name, a module path "
                          "or a TorchServe default handler")


def _find(entry: str, files: set[str]) -> str | None:
    """torch-model-archiver stores files at the archive's root under their base name."""
    entry = entry.replace("\\", "/")
    if entry in files:
        return entry
    base = entry.rsplit("/", 1)[-1]
    return base if base in files else None


def _string(model: dict[str, Any], key: str, name: str, required: bool = False) -> str | None:
    value = model.get(key)
    if value is None or value == "":
        if required:
            raise InvalidArtifact(f"{name}: entry {MANIFEST_PATH!r}: model.{key} is missing")
        return None
    if not isinstance(value, str):
        raise InvalidArtifact(f"{name}: entry {MANIFEST_PATH!r}: model.{key} must be a string")
    return value


def _read_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> bytes:
    try:
        with archive.open(info) as fh:
            return fh.read(info.file_size + 1)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as exc:
        raise InvalidArtifact(f"{name}: entry {info.filename!r} is corrupt: {exc}") from None


def _crc_check(archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo], first: list[zipfile.ZipInfo],
               name: str, limits: MarLimits) -> None:
    """Read the given entries, then other small ones within the budget, to the end (zipfile checks
    the CRC-32 at the end of each entry and raises on a mismatch)."""
    budget = limits.crc_check_budget
    done: set[str] = set()
    small = sorted((i for i in infos if not i.is_dir() and i.file_size <= limits.crc_check_max_entry),
                   key=lambda i: i.file_size)
    for info in [*first, *small]:
        if info.filename in done:
            continue
        if info.file_size > budget and info not in first:
            break
        done.add(info.filename)
        budget -= info.file_size
        try:
            with archive.open(info) as fh:
                read = 0
                while chunk := fh.read(1 << 16):
                    read += len(chunk)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError) as exc:
            raise InvalidArtifact(f"{name}: entry {info.filename!r} is corrupt: {exc}") from None
        if read != info.file_size:
            raise InvalidArtifact(f"{name}: entry {info.filename!r} has {read} bytes, the directory says "
                                  f"{info.file_size} (corrupt)")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"
