"""The pieces of shipping that need no host: the tar stream, content ids, volume names."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from modelfleet.reconciler.artifacts.errors import InvalidOrigin, ShippingError
from modelfleet.reconciler.artifacts.shipping import ShipFile, TarStream, artifact_id, model_binds, volume_name


def test_tar_stream_is_a_valid_tar_of_exact_length(tmp_path: Path) -> None:
    files = []
    for name, size in [("empty.bin", 0), ("1_Pooling/config.json", 1000), ("w" * 150 + ".bin", 70_000),
                       ("aligned.bin", 512)]:
        source = tmp_path / name.replace("/", "_")
        source.write_bytes(os.urandom(size))
        known = hashlib.sha256(source.read_bytes()).hexdigest() if name == "aligned.bin" else None
        files.append(ShipFile(name, source, size, known))
    digests: dict[str, str] = {}
    counted: list[int] = []
    stream = TarStream(tuple(files), 4096, counted.append, digests)
    data = b"".join(bytes(chunk) for chunk in stream)  # bytes(): the stream reuses its buffer
    assert len(data) == len(stream) and sum(counted) == 71_512
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert members["1_Pooling"].isdir() and members["1_Pooling"].mode == 0o755
        for file in files:
            assert members[file.path].mode == 0o444 and members[file.path].uid == 0
            assert tar.extractfile(file.path).read() == file.source.read_bytes()  # type: ignore[union-attr]
    # Hashed while streaming, once: the file with a known digest is not hashed again.
    assert set(digests) == {f.path for f in files if f.sha256 is None}
    assert all(digests[f.path] == hashlib.sha256(f.source.read_bytes()).hexdigest() for f in files if not f.sha256)


def test_tar_stream_refuses_a_file_that_shrank(tmp_path: Path) -> None:
    source = tmp_path / "model.bin"
    source.write_bytes(b"x" * 100)
    stream = TarStream((ShipFile("model.bin", source, 1000),), 4096, lambda n: None, {})
    with pytest.raises(ShippingError, match="shorter than 1000 bytes"):
        b"".join(bytes(c) for c in stream)


def test_ids_and_volume_names() -> None:
    digest = "ab" * 32
    assert artifact_id({"file": {"sha256": digest, "path": "m.mar"}}) == f"sha256:{digest}"
    assert artifact_id({"file": {"sha256": f"sha256:{digest}"}}) == f"sha256:{digest}"
    hf = {"huggingface": {"model": "org/name", "revision": "main", "commit": "c" * 40}}
    assert artifact_id(hf) == "hf:org/name@" + "c" * 40
    name = volume_name(f"sha256:{digest}")
    assert name == "mf-artifact-" + hashlib.sha256(f"sha256:{digest}".encode()).hexdigest()[:24]
    assert model_binds(name) == {name: {"bind": "/model", "mode": "ro"}}
    bad: dict[str, Any]
    for bad in ({"file": {"sha256": None, "path": "x.mar"}}, {"huggingface": {"model": "a/b", "commit": None}},
                {"git": {}}):
        with pytest.raises(InvalidOrigin):
            artifact_id(bad)
