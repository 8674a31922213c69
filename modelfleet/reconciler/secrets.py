"""Secrets: read them from their files, check bearer tokens, and keep them out of every message."""

from __future__ import annotations

import hmac
import re
from pathlib import Path

_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def read_secret(path: str | None) -> str | None:
    """A token or key from a file, whitespace stripped; None when unset or empty. Never logged."""
    if not path:
        return None
    return Path(path).read_text(encoding="utf-8").strip() or None


def bearer_token_matches(header_value: str | bytes | None, token: str | bytes | None) -> bool:
    """Whether an ``Authorization`` header value is ``Bearer <token>`` (scheme in any case).

    Compared in constant time on bytes: a header that is not ASCII (or not even text) is simply
    wrong, never an error. A ``str`` header is encoded as latin-1, which gives back the bytes
    received (ASGI servers decode header bytes as latin-1). An unset or empty token matches no
    header: whether no token means "open" is the caller's decision.
    """
    if header_value is None or not token:
        return False
    raw = header_value if isinstance(header_value, bytes) else _header_bytes(header_value)
    expected = token if isinstance(token, bytes) else token.encode("utf-8")
    scheme, _, credentials = raw.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), expected)


def _header_bytes(value: str) -> bytes:
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:  # not from the wire: beyond latin-1, so compare its UTF-8 bytes
        return value.encode("utf-8", "surrogatepass")


def redact_url(text: str) -> str:
    """Strip user information (user names, passwords, tokens) from every URL in ``text``."""
    return _URL_USERINFO.sub(r"\g<scheme>***@", text)
