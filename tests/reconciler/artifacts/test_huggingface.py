"""HuggingFaceResolver against the Hub stand-in (hub_standin.py): real files, real huggingface_hub."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelfleet.reconciler.artifacts.errors import InvalidOrigin, OriginError
from modelfleet.reconciler.artifacts.huggingface import HuggingFaceResolver
from modelfleet.reconciler.errors import TerminalError, TransientError
from tests.reconciler.artifacts.hub_standin import FAKE_COMMIT, HubStandin, StandinRepo, minilm_dir

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
PRIVATE = "acme/private-tiny"
TOKEN = "hf_standin_secret_token_4f1d2c9e7a"
TAG_COMMIT = "1234567890abcdef1234567890abcdef12345678"


@pytest.fixture(scope="module")
def private_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small private model: a config and an LFS weights file (so the CDN redirect is exercised)."""
    root = tmp_path_factory.mktemp("private-model")
    (root / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    (root / "model.safetensors").write_bytes(os.urandom(300_000))
    return root


@pytest.fixture(scope="module")
def hub(private_files: Path) -> Iterator[HubStandin]:
    repos = [StandinRepo(MINILM, minilm_dir(), branches={"main": FAKE_COMMIT, "v1.0": TAG_COMMIT}),
             StandinRepo(PRIVATE, private_files, private=True, pipeline_tag="text-generation",
                         library_name="transformers", tags=["gpt2"])]
    with HubStandin(repos, token=TOKEN) as standin:
        yield standin


@pytest.fixture(scope="module")
def downloaded(hub: HubStandin, tmp_path_factory: pytest.TempPathFactory) -> tuple[HuggingFaceResolver, Path]:
    """A cache holding the MiniLM snapshot (downloaded once for the module: 90 MB)."""
    cache = tmp_path_factory.mktemp("hf-cache")
    resolver = HuggingFaceResolver(cache, endpoint=hub.url, offline=False)
    commit = resolver.resolve(MINILM, "main")
    return resolver, resolver.snapshot(MINILM, commit)


def test_branch_and_tag_resolve_to_commits(hub: HubStandin, tmp_path: Path) -> None:
    resolver = HuggingFaceResolver(tmp_path, endpoint=hub.url, offline=False)
    assert resolver.resolve(MINILM, "main") == FAKE_COMMIT
    assert resolver.resolve(MINILM, "v1.0") == TAG_COMMIT
    assert f"/api/models/{MINILM}/revision/main" in hub.paths("GET")
    # The answer is remembered like huggingface_hub does, for offline use.
    assert (tmp_path / "models--sentence-transformers--all-MiniLM-L6-v2" / "refs" / "main").read_text() == FAKE_COMMIT
    assert hub.violations == []


def test_a_commit_sha_resolves_to_itself_without_asking(hub: HubStandin, tmp_path: Path) -> None:
    before = len(hub.requests)
    resolver = HuggingFaceResolver(tmp_path, endpoint=hub.url, offline=False)
    assert resolver.resolve(MINILM, "0123456789abcdef0123456789abcdef01234567") == \
        "0123456789abcdef0123456789abcdef01234567"
    assert len(hub.requests) == before


def test_unknown_model_revision_and_bad_ids_are_terminal(hub: HubStandin, tmp_path: Path) -> None:
    resolver = HuggingFaceResolver(tmp_path, endpoint=hub.url, offline=False)
    with pytest.raises(InvalidOrigin, match="revision 'nope': no such branch, tag or commit"):
        resolver.resolve(MINILM, "nope")
    with pytest.raises(InvalidOrigin, match="model not found or not accessible"):
        resolver.resolve("acme/does-not-exist", "main")
    with pytest.raises(InvalidOrigin, match="not a HuggingFace model id"):
        resolver.resolve("../etc", "main")
    with pytest.raises(InvalidOrigin, match="needs a 40-hex commit"):
        resolver.snapshot(MINILM, "main")
    assert issubclass(InvalidOrigin, TerminalError) and issubclass(OriginError, TransientError)
    assert hub.violations == []


def test_snapshot_has_the_model_files_and_is_downloaded_once(
        hub: HubStandin, downloaded: tuple[HuggingFaceResolver, Path]) -> None:
    resolver, folder = downloaded
    source = minilm_dir()
    files = {p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()}
    assert {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} == files
    weights = folder / "model.safetensors"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == hub.repos[MINILM].files["model.safetensors"].sha256
    # The LFS file came from the "CDN" origin, without the Authorization header.
    assert any(r.path.startswith("/cdn/") for r in hub.requests)
    before = len(hub.requests)
    assert resolver.snapshot(MINILM, FAKE_COMMIT) == folder
    assert len(hub.requests) == before  # complete: no network at all
    assert hub.violations == []


def test_model_metadata(hub: HubStandin, downloaded: tuple[HuggingFaceResolver, Path], tmp_path: Path) -> None:
    resolver, _ = downloaded
    meta = resolver.model_metadata(MINILM, FAKE_COMMIT)
    assert meta["pipeline_tag"] == "sentence-similarity" and meta["library_name"] == "sentence-transformers"
    assert meta["architectures"] == ["BertModel"] and meta["model_type"] == "bert"
    assert meta["sentence_transformers"] is True and meta["source"] == "hub"
    offline = HuggingFaceResolver(resolver.cache_dir, offline=True).model_metadata(MINILM, FAKE_COMMIT)
    assert offline["architectures"] == ["BertModel"] and offline["sentence_transformers"] is True
    assert offline["source"] == "cache"


def test_offline_falls_back_to_the_cache(hub: HubStandin, downloaded: tuple[HuggingFaceResolver, Path],
                                         monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cache = downloaded[0].cache_dir
    before = len(hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = HuggingFaceResolver(cache, endpoint=hub.url)  # offline from the environment
    assert offline.offline
    assert offline.resolve(MINILM, "main") == FAKE_COMMIT
    assert offline.snapshot(MINILM, FAKE_COMMIT) == downloaded[1]
    empty = HuggingFaceResolver(tmp_path, endpoint=hub.url)
    with pytest.raises(InvalidOrigin, match=r"not in the cache .* offline \(HF_HUB_OFFLINE=1\)"):
        empty.resolve(MINILM, "main")
    with pytest.raises(InvalidOrigin, match="offline"):
        empty.snapshot(MINILM, FAKE_COMMIT)
    assert len(hub.requests) == before  # offline means no request at all


def test_private_model_needs_the_token_which_never_leaks(
        hub: HubStandin, tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    anonymous = HuggingFaceResolver(tmp_path / "anon", endpoint=hub.url, offline=False)
    with pytest.raises(InvalidOrigin, match=r"model not found or not accessible .*tokenFile") as no_token:
        anonymous.resolve(PRIVATE, "main")
    wrong = HuggingFaceResolver(tmp_path / "wrong", token="hf_wrong_" + TOKEN[::-1], endpoint=hub.url, offline=False)
    with pytest.raises(InvalidOrigin, match="refused access") as bad_token:
        wrong.resolve(PRIVATE, "main")

    resolver = HuggingFaceResolver(tmp_path / "cache", token=TOKEN, endpoint=hub.url, offline=False)
    commit = resolver.resolve(PRIVATE, "main")
    folder = resolver.snapshot(PRIVATE, commit)
    assert (folder / "model.safetensors").stat().st_size == 300_000
    assert resolver.model_metadata(PRIVATE, commit)["architectures"] == ["GPT2LMHeadModel"]
    served = [r for r in hub.requests if PRIVATE in r.path and r.status < 400]
    assert served and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in served)
    assert all("authorization" not in r.headers for r in hub.requests if r.path.startswith("/cdn/"))

    # Errors with the token set name no token; nor do repr, logs or stderr.
    with pytest.raises(InvalidOrigin) as unknown:
        resolver.resolve(PRIVATE, "no-such-branch")
    texts = [str(no_token.value), str(bad_token.value), str(unknown.value), repr(resolver), repr(wrong),
             caplog.text, *capfd.readouterr()]
    for text in texts:
        assert TOKEN not in text and TOKEN[::-1] not in text
    assert unknown.value.__cause__ is None and unknown.value.__context__ is None
    assert hub.violations == []


def test_hub_unreachable_is_transient(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    resolver = HuggingFaceResolver(tmp_path, token=TOKEN, endpoint=f"http://127.0.0.1:{port}", offline=False,
                                   timeout=2)
    with pytest.raises(OriginError, match="cannot resolve HuggingFace model") as raised:
        resolver.resolve(MINILM, "main")
    started = time.monotonic()
    with pytest.raises(OriginError, match="cannot download"):
        resolver.snapshot(MINILM, FAKE_COMMIT)
    assert time.monotonic() - started < 3  # fails fast: the daemon has its own backoff
    assert TOKEN not in str(raised.value)
