"""Backend choice: least outstanding requests per backend URL, ties round-robin."""

from __future__ import annotations

from modelfleet.reconciler.gateway.routes import Backend


class Balancer:
    """Least outstanding requests per backend URL; ties go round-robin.

    The proxy picks a backend, then holds it with :meth:`acquire` until the backend sent its whole
    response (:meth:`release`).
    """

    def __init__(self) -> None:
        self.outstanding: dict[str, int] = {}
        self._next: dict[str, int] = {}

    def pick(self, key: str, backends: tuple[Backend, ...], avoid: str | None = None) -> Backend:
        """A backend of ``backends`` (non-empty); ``avoid`` is only chosen when it is the only one."""
        count = len(backends)
        if count == 1:
            return backends[0]
        start = self._next.get(key, 0)
        self._next[key] = (start + 1) % count
        outstanding = self.outstanding
        best = backends[start % count]
        best_load = 1 << 62
        for i in range(count):
            backend = backends[(start + i) % count]
            if backend.url == avoid:
                continue
            load = outstanding.get(backend.url, 0)
            if load < best_load:
                best, best_load = backend, load
                if load == 0:
                    break
        return best

    def acquire(self, url: str) -> None:
        self.outstanding[url] = self.outstanding.get(url, 0) + 1

    def release(self, url: str) -> None:
        left = self.outstanding.get(url, 1) - 1
        if left > 0:
            self.outstanding[url] = left
        else:
            self.outstanding.pop(url, None)

    def forget(self, keys: set[str]) -> None:
        """Drop the round-robin position of deployments no longer in the route table."""
        for key in [k for k in self._next if k not in keys]:
            del self._next[key]
