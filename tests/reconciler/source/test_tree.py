"""Bounds on what the daemon reads of a commit: only manifest candidates are listed and read, each
within a size limit checked before reading, at most so many files and bytes of them."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from modelfleet.reconciler.errors import GitSourceError
from modelfleet.reconciler.source.git import GitSource, GitTree
from modelfleet.reconciler.source.tree import DirectoryTree, TreeLimits
from modelfleet.state.loader import UnreadableFile, load_tree
from tests.reconciler.source.helpers import MANIFESTS, git

ECHO = MANIFESTS["models/echo.yaml"]


def fast_import(repo: Path, files: dict[str, bytes], repeated: tuple[str, int, bytes] | None = None) -> str:
    """A commit on main with ``files`` plus ``count`` copies of one blob (``NNN/`` + ``pattern`` % i):
    written by git fast-import, so 100k files take seconds, not minutes."""
    lines = [b"blob", b"mark :1", b"data 3", b"x\n"]
    marks = {}
    for i, (path, data) in enumerate(files.items(), start=2):
        lines += [b"blob", f"mark :{i}".encode(), f"data {len(data)}".encode(), data]
        marks[path] = i
    lines += [b"commit refs/heads/main", b"committer t <t@localhost> 1700000000 +0000", b"data 4", b"big",
              b"deleteall"]
    if repeated is not None:
        pattern, count, _ = repeated
        # (a thousand per directory: fast-import is quadratic in the entries of one directory)
        lines += [f"M 100644 :1 {i // 1000:03d}/{pattern % i}".encode() for i in range(count)]
    lines += [f"M 100644 :{mark} {path}".encode() for path, mark in marks.items()]
    git(repo, "fast-import", "--quiet", stdin=b"\n".join(lines) + b"\n")
    return git(repo, "rev-parse", "refs/heads/main")


def big_repo(tmp_path: Path, files: dict[str, bytes], repeated: tuple[str, int, bytes] | None = None) -> tuple[
        GitSource, str]:
    origin = tmp_path / "origin.git"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(origin))
    head = fast_import(origin, files, repeated)
    return GitSource(str(origin), "main", tmp_path / "state", timeout=60), head


def manifests() -> dict[str, bytes]:
    import yaml

    return {path: yaml.safe_dump_all(docs).encode() for path, docs in MANIFESTS.items()}


def test_a_hundred_thousand_other_files_are_neither_kept_nor_read(tmp_path: Path) -> None:
    source, head = big_repo(tmp_path, {**manifests(), "models/echo.mar": b"PK model bytes"},
                            ("part-%06d.bin", 100_000, b""))
    assert source.sync().revision == head
    started = time.monotonic()
    tree = source.tree(head)
    reads: list[str] = []
    original = tree._read
    tree._read = lambda oid: reads.append(oid) or original(oid)  # type: ignore[func-returns-value]
    catalog = load_tree(tree)
    assert set(catalog.models) == {"echo"} and not catalog.errors
    assert sorted(tree) == sorted(MANIFESTS) and len(tree) == 2  # only the manifest candidates are listed
    assert len(reads) == 2  # and only they were read
    # Another file is looked up by path when asked for (a model named by origin.file.path).
    assert "models/echo.mar" in tree and tree["models/echo.mar"] == b"PK model bytes"
    assert "000/part-000001.bin" in tree and "000/nope.bin" not in tree
    with pytest.raises(KeyError):
        tree["models/nope.yaml"]
    assert time.monotonic() - started < 60  # (not a timing assertion: a bound against a hang)


def test_more_yaml_files_than_the_limit_is_a_clear_error_naming_the_limit(tmp_path: Path) -> None:
    source, head = big_repo(tmp_path, manifests(), ("item-%06d.yaml", 25_000, b""))
    source.sync()
    with pytest.raises(GitSourceError) as caught:
        source.tree(head)
    message = str(caught.value)
    assert "more than 20000 YAML files" in message and head[:12] in message and "item-" in message


def test_a_huge_manifest_candidate_is_reported_not_read(tmp_path: Path) -> None:
    huge = b"# padding\n" * (3 * 2**20 // 10)  # 3 MiB
    source, head = big_repo(tmp_path, {**manifests(), "data/huge.yaml": huge})
    source.sync()
    tree = source.tree(head)
    reads: list[str] = []
    original = tree._read
    tree._read = lambda oid: reads.append(oid) or original(oid)  # type: ignore[func-returns-value]
    with pytest.raises(UnreadableFile):
        tree["data/huge.yaml"]
    assert reads == []  # the size came from the listing: not a byte of it was read
    catalog = load_tree(tree)
    assert set(catalog.models) == {"echo"}  # the rest loads
    [error] = [e for e in catalog.errors if e.file == "data/huge.yaml"]
    assert "3 MiB, over the 1 MiB limit" in str(error) and "hidden directory" in str(error)
    assert catalog.complete is False  # what it held is unknown: nothing may be pruned


def test_the_total_of_yaml_bytes_is_bounded(tmp_path: Path) -> None:
    source, head = big_repo(tmp_path, {f"m/{i}.yaml": b"a: 1\n" * 100 for i in range(10)})
    source.sync()
    limits = TreeLimits(max_file_bytes=1024, max_files=100, max_total_bytes=2048)
    with pytest.raises(GitSourceError, match="add up to more than 2 KiB"):
        GitSource(source.url, "main", tmp_path / "state", limits=limits).tree(head)


def test_the_limits_are_parameters(tmp_path: Path) -> None:
    source, head = big_repo(tmp_path, {f"m/{i}.yaml": b"a: 1\n" for i in range(5)})
    source.sync()
    tree = GitTree(source.path, lambda oid: b"", head, TreeLimits(max_files=5))
    assert len(tree) == 5
    with pytest.raises(GitSourceError, match="more than 4 YAML files"):
        GitSource(source.url, "main", tmp_path / "state", limits=TreeLimits(max_files=4)).tree(head)


def test_directory_tree_checks_the_size_before_reading(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    import yaml

    (tmp_path / "models" / "echo.yaml").write_text(yaml.safe_dump_all(ECHO))
    (tmp_path / "environments.yaml").write_text(yaml.safe_dump_all(MANIFESTS["environments.yaml"]))
    (tmp_path / "big.yml").write_bytes(b"#" * (2 * 2**20))
    (tmp_path / "model.bin").write_bytes(b"#" * (2 * 2**20))  # not a manifest: no limit, read when asked
    tree = DirectoryTree(tmp_path)
    with pytest.raises(UnreadableFile, match="2 MiB, over the 1 MiB limit"):
        tree["big.yml"]
    assert len(tree["model.bin"]) == 2 * 2**20
    catalog = load_tree(tree)
    assert set(catalog.models) == {"echo"}
    assert [e.file for e in catalog.errors] == ["big.yml"]
