"""Secrets: the one bearer-token check (constant time on bytes, never an error on odd headers)."""

from __future__ import annotations

import pytest

from modelfleet.reconciler.secrets import bearer_token_matches

TOKEN = "s3cret-token"


@pytest.mark.parametrize("header", [
    "Bearer s3cret-token",
    "bearer s3cret-token",  # the scheme is case-insensitive (RFC 9110)
    "BEARER  s3cret-token ",
    b"Bearer s3cret-token",
])
def test_matching_headers(header: str | bytes) -> None:
    assert bearer_token_matches(header, TOKEN)
    assert bearer_token_matches(header, TOKEN.encode())


@pytest.mark.parametrize("header", [
    None,
    "",
    "Bearer",
    "Bearer ",
    "s3cret-token",
    "Basic s3cret-token",
    "Bearer s3cret-toke",  # shorter
    "Bearer s3cret-token-and-more",  # longer
    "Bearer S3CRET-TOKEN",  # the token itself is case-sensitive
    "Bearer s3crét-token",  # non-ASCII, as an ASGI server decodes it (latin-1)
    "Bearer s3cret-token\u20ac",  # beyond latin-1: cannot come from the wire, still no error
    "Bearer s3cr\udcffet",  # a lone surrogate
    "Bearer s3crét-token".encode(),  # non-ASCII bytes (UTF-8)
    b"Bearer \xff\xfe",  # not text at all
])
def test_wrong_headers_never_raise(header: str | bytes | None) -> None:
    assert bearer_token_matches(header, TOKEN) is False


def test_no_token_matches_nothing() -> None:
    assert bearer_token_matches("Bearer ", None) is False
    assert bearer_token_matches("Bearer ", "") is False
    assert bearer_token_matches("Bearer x", None) is False


def test_a_non_ascii_token_matches_its_utf8_bytes() -> None:
    token = "clé-secrète"
    raw = b"Bearer " + token.encode()
    assert bearer_token_matches(raw, token)
    assert bearer_token_matches(raw.decode("latin-1"), token)  # the header as Starlette gives it
    assert not bearer_token_matches("Bearer " + token[:-1], token)
