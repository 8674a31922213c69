"""Artifact ids: the same content is the same id, whatever the digest's spelling; origins that do
not name a content yet have none (and placement then has no locality to prefer)."""

from __future__ import annotations

import pytest

from modelfleet.state.artifacts import UnresolvedArtifact, artifact_id, known_artifact

HEX = "0f" * 32


@pytest.mark.parametrize("digest", [HEX, f"sha256:{HEX}", f" sha256:{HEX} "])
def test_a_file_digest_is_one_id_however_it_is_written(digest: str) -> None:
    assert artifact_id({"file": {"sha256": digest, "path": "m.mar"}}) == f"sha256:{HEX}"


def test_a_huggingface_snapshot_is_its_model_at_its_commit() -> None:
    assert artifact_id({"huggingface": {"model": "org/m", "revision": "main", "commit": "c" * 40}}) \
        == "hf:org/m@" + "c" * 40


@pytest.mark.parametrize(("origin", "why"), [
    ({"file": {"path": "m.mar"}}, "without a sha256"),
    ({"file": {"sha256": "md5:abc"}}, "is not a sha256 digest"),
    ({"huggingface": {"model": "org/m", "revision": "main"}}, "no resolved commit yet"),
    ({"s3": {"bucket": "b"}}, "expected file or huggingface"),
])
def test_an_origin_without_a_content_has_no_id(origin: dict[str, object], why: str) -> None:
    with pytest.raises(UnresolvedArtifact, match=why):
        artifact_id(origin)
    assert known_artifact(origin) is None


def test_no_origin_has_no_artifact() -> None:
    assert known_artifact(None) is None and known_artifact({}) is None
