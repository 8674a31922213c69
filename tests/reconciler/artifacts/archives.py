"""Model archives for tests: a real one from the torch-model-archiver CLI, and crafted bad zips."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent / "fixtures"
GOOD_MANIFEST: dict[str, Any] = {
    "createdOn": "01/01/2026 00:00:00", "runtime": "python",
    "model": {"modelName": "tiny", "serializedFile": "model.pt", "handler": "handler.py", "modelVersion": "1.0"},
    "archiverVersion": "0.12.0",
}


def archiver_binary() -> str:
    found = Path(sys.executable).with_name("torch-model-archiver")
    return str(found) if found.exists() else (shutil.which("torch-model-archiver") or "torch-model-archiver")


def build_mar(out_dir: Path, name: str = "tiny", version: str = "1.0", *, model_file: bool = False,
              handler: str | None = None, extra: list[Path] | None = None, archive_format: str = "default") -> Path:
    """A real .mar built by torch-model-archiver 0.12 from the committed tiny state dict and handler."""
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / f".build-{name}"
    work.mkdir(exist_ok=True)
    shutil.copy(FIXTURES / "tiny_linear.pt", work / "model.pt")
    shutil.copy(FIXTURES / "handler.py", work / "handler.py")
    argv = [archiver_binary(), "--model-name", name, "--version", version, "--serialized-file",
            str(work / "model.pt"), "--handler", handler or str(work / "handler.py"), "--export-path", str(out_dir),
            "--archive-format", archive_format, "--force"]
    if model_file:
        shutil.copy(FIXTURES / "tiny_model.py", work / "tiny_model.py")
        argv += ["--model-file", str(work / "tiny_model.py")]
    if extra:
        argv += ["--extra-files", ",".join(str(p) for p in extra)]
    subprocess.run(argv, check=True, capture_output=True, timeout=60)
    shutil.rmtree(work)
    return out_dir / f"{name}.mar"


def crafted_zip(path: Path, entries: dict[str, bytes], manifest: dict[str, object] | None = GOOD_MANIFEST,
                method: int = zipfile.ZIP_DEFLATED, symlinks: dict[str, str] | None = None) -> Path:
    """A zip with the given entries (and a MAR-INF/MANIFEST.json unless ``manifest`` is None)."""
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        if manifest is not None:
            zf.writestr("MAR-INF/MANIFEST.json", json.dumps(manifest))
        for name, data in entries.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=method)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path
