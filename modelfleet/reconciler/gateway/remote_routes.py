"""Following the route table over HTTP (``gateway.follow: controlPlane``): a gateway on any machine.

:class:`RemoteRouteFeed` long-polls ``GET <controlPlane>/api/v1/routes?wait=25`` with
``If-None-Match: "<version>"``: the daemon answers the moment it publishes another table (304
after 25 s of nothing new, and the next poll starts at once). Each table is cached in
``<cacheDir>/routes.json`` (0600: it holds the deployments' gateway secrets), written atomically,
so that a gateway that starts while the daemon is unreachable serves the last table it had. While
the daemon does not answer, the table being served stays, :attr:`error` says why, and polls go on
with a backoff of up to ``MAX_BACKOFF`` seconds (a daemon back is followed again within 2 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import httpx

from modelfleet.reconciler.gateway.follower import TableFeed
from modelfleet.reconciler.gateway.metrics import GatewayMetrics
from modelfleet.reconciler.gateway.routes import RouteTable
from modelfleet.reconciler.secrets import redact_url

log = logging.getLogger("modelfleet.gateway")

ROUTES_PATH = "/api/v1/routes"
CACHE_FILE = "routes.json"
LONG_POLL = 25.0
MAX_BACKOFF = 2.0


class RemoteRouteFeed(TableFeed):
    def __init__(self, control_plane: str, cache_dir: str | Path, metrics: GatewayMetrics,
                 on_install: Callable[[RouteTable], None] | None = None, *, token: str | None = None,
                 location: str | None = None, continent: str | None = None, long_poll: float = LONG_POLL) -> None:
        super().__init__(metrics, on_install, location=location, continent=continent)
        self.url = control_plane.rstrip("/") + ROUTES_PATH
        self.source = redact_url(self.url)
        self.cache_path = Path(cache_dir) / CACHE_FILE
        self.long_poll = long_poll
        self._headers = {"authorization": f"Bearer {token}"} if token else {}
        self._etag: str | None = None
        self._error: str | None = None
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self.polls = 0  # answers received (200 and 304), for /routes

    @property
    def error(self) -> str | None:
        return self._error

    def start(self) -> None:
        """Serve the cached table (if any) at once, then follow the control plane."""
        cached = self._read_cache()
        if cached is not None:
            self._install(cached)
            log.info("serving the cached route table version %d from %s until %s answers", cached.version,
                     self.cache_path, self.source)
        self._client = httpx.AsyncClient(trust_env=False, follow_redirects=False,
                                         timeout=httpx.Timeout(self.long_poll + 10, connect=5.0))
        self._task = asyncio.ensure_future(self._follow())

    def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()

    async def aclose(self) -> None:
        task = self._task
        self.close()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def _follow(self) -> None:
        backoff = 0.25
        while True:
            try:
                installed = await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never fatal: the table being served stays
                self._set_error(f"{type(exc).__name__}: {exc}")
                installed = None
            if installed is None:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
            else:
                backoff = 0.25

    async def poll_once(self) -> bool | None:
        """One long-poll: True when a new table was installed, False on 304, None on a failure."""
        client = self._client
        assert client is not None
        headers = dict(self._headers)
        if self._etag is not None:
            headers["if-none-match"] = self._etag
        try:
            response = await client.get(self.url, params={"wait": f"{self.long_poll:g}"}, headers=headers)
        except httpx.HTTPError as exc:
            self._set_error(f"cannot reach {self.source}: {type(exc).__name__}: {exc}".rstrip(": "))
            return None
        self.polls += 1
        if response.status_code == 304:
            self._set_error(None)
            return False
        if response.status_code != 200:
            self._set_error(_refusal(response, self.source))
            return None
        try:
            table = RouteTable.from_payload(response.json())
        except (ValueError, KeyError, TypeError) as exc:
            self._set_error(f"{self.source} answered a malformed route table: {exc}")
            return None
        self._etag = response.headers.get("etag") or f'"{table.version}"'
        self._install(table)
        self._set_error(None)
        await asyncio.get_running_loop().run_in_executor(None, self._write_cache, response.content)
        return True

    def _read_cache(self) -> RouteTable | None:
        try:
            return RouteTable.from_payload(json.loads(self.cache_path.read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring the cached route table %s: %s", self.cache_path, exc)
            return None

    def _write_cache(self, payload: bytes) -> None:
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            fd, temporary = tempfile.mkstemp(dir=self.cache_path.parent, prefix=".routes-")
            try:
                with os.fdopen(fd, "wb") as file:  # mkstemp's file is 0600 already
                    file.write(payload)
                    file.flush()
                    os.fsync(file.fileno())
                os.replace(temporary, self.cache_path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise
        except OSError as exc:  # a full disk: serving goes on, the next table tries again
            log.warning("cannot cache the route table in %s: %s", self.cache_path, exc)

    def _set_error(self, error: str | None) -> None:
        if error != self._error:
            if error is None:
                log.info("route table: %s answers again", self.source)
            else:
                log.warning("%s; keeping the route table being served (version %d)", error, self.table.version)
        self._error = error
        self.metrics.route_table_read_failing.set(0 if error is None else 1)


def _refusal(response: httpx.Response, source: str) -> str:
    status = response.status_code
    if status in (401, 403):
        detail = ""
        with contextlib.suppress(ValueError):
            detail = str(response.json().get("error") or "")
        return (f"{source} refused the route table (HTTP {status}{': ' + detail if detail else ''}); set "
                "gateway.controlPlaneTokenFile to a file holding the daemon's API token")
    if status == 404:
        return f"{source}: HTTP 404; is gateway.controlPlane the daemon's API, and the daemon as recent as the gateway?"
    return f"{source}: HTTP {status}: {response.text[:200].strip()}"
