"""Secrets: read them from their files, and keep them out of every message."""

from __future__ import annotations

import re
from pathlib import Path

_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def read_secret(path: str | None) -> str | None:
    """A token or key from a file, whitespace stripped; None when unset or empty. Never logged."""
    if not path:
        return None
    return Path(path).read_text(encoding="utf-8").strip() or None


def redact_url(text: str) -> str:
    """Strip user information (user names, passwords, tokens) from every URL in ``text``."""
    return _URL_USERINFO.sub(r"\g<scheme>***@", text)
