"""Secrets: read them from their files, check bearer tokens, and keep them out of every message."""

from __future__ import annotations

import hmac
import os
import re
import time
from pathlib import Path
from secrets import token_bytes

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


GATEWAY_KEY_FILE = "gateway-secret.key"


class GatewaySecrets:
    """The per-deployment secrets the gateway adds to each request it forwards (the runtimes refuse
    requests without theirs). Each is HMAC-SHA256(key, "model/environment") of one random key
    kept in ``stateDir/gateway-secret.key`` (0600): the daemon and the gateways on this machine
    read the same file, so no secret is stored or sent anywhere else, and a lost store changes none."""

    def __init__(self, state_dir: str | Path, *, create: bool = True) -> None:
        self.path = Path(state_dir) / GATEWAY_KEY_FILE
        self._key = self._load(create)
        self._cache: dict[str, str] = {}
        self._looked_at = time.monotonic()

    def _load(self, create: bool) -> bytes | None:
        try:
            return bytes.fromhex(self.path.read_text().strip())
        except FileNotFoundError:
            if not create:
                return None
        except ValueError:
            raise ValueError(f"{self.path}: not a gateway key (64 hex digits); remove it to make a new one "
                             "(running replicas are then refused until replaced)") from None
        key = token_bytes(32)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(key.hex() + "\n")
        return key

    def __repr__(self) -> str:
        return f"GatewaySecrets({self.path})"

    def for_deployment(self, model: str, environment: str) -> str | None:
        """The deployment's secret; None when there is no key (a gateway started before any daemon)."""
        if self._key is None:
            # Look for the daemon's key again at most every 5 s (never a file read per request).
            now = time.monotonic()
            if now - self._looked_at < 5.0:
                return None
            self._looked_at = now
            self._key = self._load(create=False)
            if self._key is None:
                return None
        name = f"{model}/{environment}"
        found = self._cache.get(name)
        if found is None:
            found = self._cache[name] = hmac.new(self._key, name.encode(), "sha256").hexdigest()
        return found
