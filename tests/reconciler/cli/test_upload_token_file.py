"""``modelfleet upload``'s token file: read with read_secret, an unreadable one named in the error."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pytest

from modelfleet.reconciler.cli.upload import EXIT_INVALID, UploadFailed, _endpoint


def args(token_file: str | None, api: str = "http://127.0.0.1:9") -> argparse.Namespace:
    return argparse.Namespace(api=api, token_file=token_file, config=None)


def test_the_token_is_read_and_stripped(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("  s3cret-token\n\n")
    assert _endpoint(args(str(path))) == ("http://127.0.0.1:9", "s3cret-token")


def test_an_empty_token_file_means_no_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELFLEET_API_TOKEN", "from-env")  # a token file given wins over the environment
    path = tmp_path / "token"
    path.write_text("\n")
    assert _endpoint(args(str(path))) == ("http://127.0.0.1:9", None)


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: None, "No such file or directory"),
    (lambda p: p.mkdir(), "Is a directory"),
    (lambda p: p.write_bytes(b"\xff\xfe token"), "is not UTF-8 text"),
])
def test_an_unreadable_token_file_is_named(tmp_path: Path, make: Callable[[Path], object], message: str) -> None:
    path = tmp_path / "api-token"
    make(path)
    with pytest.raises(UploadFailed) as failure:
        _endpoint(args(str(path)))
    assert failure.value.code == EXIT_INVALID
    assert str(path) in str(failure.value) and message in str(failure.value)
