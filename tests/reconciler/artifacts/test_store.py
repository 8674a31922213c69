"""The content-addressed store: names by digest, atomic ingestion, nothing half-written ever visible."""

from __future__ import annotations

import hashlib
import os
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelfleet.reconciler.artifacts.errors import ArtifactNotFound
from modelfleet.reconciler.artifacts.store import ArtifactStore, normalize_digest, reference


def _chunks(data: bytes, size: int = 1000) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


def _visible(store: ArtifactStore) -> list[str]:
    return sorted(os.listdir(store.objects))


def test_ingest_names_the_file_by_its_sha256(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    data = os.urandom(10_000)
    digest = hashlib.sha256(data).hexdigest()

    stored = store.ingest(_chunks(data))

    assert stored.digest == digest and stored.size == len(data) and stored.ref == f"sha256:{digest}"
    assert stored.path == tmp_path / "artifacts" / "sha256" / digest
    assert stored.path.read_bytes() == data
    assert store.has(digest) and store.has(f"sha256:{digest}") and not store.has("sha256:" + "0" * 64)
    assert store.size(digest) == len(data) and store.path(f"sha256:{digest}") == stored.path
    with store.open(digest) as fh:
        assert fh.read() == data
    assert [a.digest for a in store.list()] == [digest]
    # The same content again: same name, still one file.
    assert store.ingest(_chunks(data, 777)).path == stored.path and len(store.list()) == 1
    assert _visible(store) == [digest]
    assert store.remove(digest) and not store.has(digest) and store.list() == []
    with pytest.raises(ArtifactNotFound, match="upload it"):
        store.path(digest)


def test_interrupted_ingest_leaves_nothing(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)

    def broken() -> Iterator[bytes]:
        yield b"a" * 5000
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        store.ingest(broken())
    assert _visible(store) == [] and store.list() == []


def test_a_half_written_file_never_looks_complete(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    data = b"x" * 4096
    digest = hashlib.sha256(data).hexdigest()
    writer = store.writer()
    writer.write(data[:2048])
    writer.flush()
    # Mid-write, the bytes are on disk under a temporary name that the store does not list.
    assert not store.has(digest) and store.list() == []
    assert [p.name.startswith(".") for p in store.objects.iterdir()] == [True]
    writer.write(data[2048:])
    stored = writer.commit()
    assert stored.digest == digest and store.has(digest) and _visible(store) == [digest]


def test_expected_digest_mismatch_stores_nothing(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    with pytest.raises(ValueError, match="expected sha256:0000"):
        store.ingest([b"hello"], expected="0" * 64)
    assert _visible(store) == []
    good = hashlib.sha256(b"hello").hexdigest()
    assert store.ingest([b"hello"], expected=f"sha256:{good}").digest == good


def test_validation_can_refuse_before_anything_is_visible(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    seen: list[bytes] = []

    def refuse(path: Path) -> None:
        seen.append(path.read_bytes())
        raise ValueError("not an archive")

    with pytest.raises(ValueError, match="not an archive"):
        store.ingest([b"abc", b"def"], validate=refuse)
    assert seen == [b"abcdef"] and _visible(store) == []


def test_stale_temporary_files_of_a_crash_are_cleaned(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    stale = store.objects / ".ingest-deadbeef"  # what a killed daemon leaves behind
    stale.write_bytes(b"partial")
    fresh = store.objects / ".ingest-cafecafe"
    fresh.write_bytes(b"in progress")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    assert store.list() == []
    assert store.cleanup_temp(older_than=3600) == 1
    assert _visible(store) == [".ingest-cafecafe"]


def test_adopt_moves_a_hashed_file_in(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    part = store.root / "uploads-x.part"
    part.write_bytes(b"payload")
    digest = hashlib.sha256(b"payload").hexdigest()
    stored = store.adopt(part, f"sha256:{digest}")
    assert not part.exists() and stored.path.read_bytes() == b"payload"
    store.put_meta(digest, {"name": "m.mar"})
    assert store.meta(digest) == {"name": "m.mar"} and store.meta("1" * 64) == {}


def test_ingest_streams_without_holding_the_file(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    chunk = b"\x5a" * (1 << 20)
    tracemalloc.start()
    try:
        stored = store.ingest(chunk for _ in range(48))  # 48 MiB
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stored.size == 48 << 20
    assert peak < 8 << 20


@pytest.mark.parametrize("text", ["sha256:" + "a" * 64, "a" * 64, " " + "b" * 64 + "\n"])
def test_digest_forms(text: str) -> None:
    assert len(normalize_digest(text)) == 64 and reference(text).startswith("sha256:")


@pytest.mark.parametrize("text", ["", "sha256:", "A" * 64, "a" * 63, "md5:" + "a" * 64, "../" + "a" * 61])
def test_bad_digests(text: str) -> None:
    with pytest.raises(ValueError, match="not a sha256 digest"):
        normalize_digest(text)
