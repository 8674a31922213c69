"""Readiness probes: readiness means the replica answers its probe path with 2xx, not merely
'the process started'. The plan says what to probe; this module only asks."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx

from modelfleet.state.planning import ReadinessCheck


class ReadinessProber:
    def __init__(self) -> None:
        self._client = httpx.Client(follow_redirects=False, trust_env=False)

    def probe(self, url: str, timeout: float) -> bool:
        try:
            response = self._client.get(url, timeout=timeout)
            return 200 <= response.status_code < 300
        except httpx.HTTPError:
            return False

    def probe_all(self, checks: Sequence[ReadinessCheck], timeout: float = 1.0) -> dict[tuple[str, str], bool]:
        """Each check's answer, keyed by (host, container name): the plan's ``probe_results``."""
        if not checks:
            return {}

        def one(check: ReadinessCheck) -> tuple[tuple[str, str], bool]:
            return (check.host, check.name), self.probe(check.probe_url, timeout)

        with ThreadPoolExecutor(max_workers=min(8, len(checks))) as pool:
            return dict(pool.map(one, checks))

    def close(self) -> None:
        self._client.close()
