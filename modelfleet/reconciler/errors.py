"""The reconciler's own exception hierarchy; adapters translate library errors into these."""

from __future__ import annotations


class ModelfleetError(Exception):
    """Base of all errors raised by the imperative shell."""


class TransientError(ModelfleetError):
    """Retry later with backoff: network, Docker daemon, timeouts."""


class TerminalError(ModelfleetError):
    """Retrying the same input will not help: wait for a new commit or operator action."""


class HostUnavailable(TransientError):
    def __init__(self, host: str, detail: str) -> None:
        super().__init__(f"host {host} is unreachable: {detail}")
        self.host = host


class DockerOperationError(TransientError):
    def __init__(self, host: str, operation: str, detail: str) -> None:
        super().__init__(f"{operation} on host {host} failed: {detail}")
        self.host = host


class ImageMissing(TerminalError):
    def __init__(self, host: str, image: str) -> None:
        super().__init__(f"image {image} is not present on host {host} and cannot be pulled"
                         " (build it there or push it to a registry the host can reach)")
        self.host = host
        self.image = image


class NotReady(TransientError):
    """A new replica did not become ready before its deadline: that version is held back."""


class Interrupted(TransientError):
    """The daemon is shutting down in the middle of an action: the next pass picks it up."""


class GitSourceError(TransientError):
    pass
