"""Errors of model origins and artifacts, in the reconciler's hierarchy (reconciler/errors.py).

Transient errors are retried with backoff (the Hub is down, a host dropped the connection);
terminal errors wait for a new commit or an operator (a bad archive, a model that does not exist,
a token without access). Messages are for humans and never carry a secret.
"""

from __future__ import annotations

from modelfleet.reconciler.errors import TerminalError, TransientError


class InvalidArtifact(TerminalError):
    """A file is not an acceptable model archive; the message names the archive and the entry."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ArtifactNotFound(TerminalError):
    """A file origin names a digest that is not in the artifact store (upload it first)."""


class OriginError(TransientError):
    """The origin could not be reached or read right now (network, Hub errors, timeouts)."""


class InvalidOrigin(TerminalError):
    """The origin cannot be used as written: unknown model or revision, no access, bad reference."""


class ShippingError(TransientError):
    """An artifact could not be put on a host, or did not verify there; the next pass retries."""
