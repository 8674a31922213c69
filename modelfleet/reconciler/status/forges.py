"""Forge status providers: the commit-status APIs of Gitea/Forgejo, GitHub and GitLab.

Each writer POSTs one status per context on the commit, with bounded retries (connection errors,
timeouts, 429 and 5xx; small exponential backoff), and raises StatusError otherwise, saying whether
it is transient and what ``Retry-After`` the forge asked for. The daemon writes through the status
outbox (status/outbox.py, with ``attempts=1``: the outbox retries). The token is kept out of reprs,
logs and exception messages.

API references (request shapes the tests' stand-in forge checks):
- Gitea/Forgejo: ``POST /api/v1/repos/{owner}/{repo}/statuses/{sha}``, ``Authorization: token T``,
  JSON ``{state, target_url, description, context}``, states pending|success|error|failure|warning.
- GitHub: ``POST /repos/{owner}/{repo}/statuses/{sha}``, ``Authorization: Bearer T``,
  ``Accept: application/vnd.github+json``, ``X-GitHub-Api-Version: 2022-11-28``, JSON
  ``{state, target_url, description, context}``, states error|failure|pending|success; GitHub
  keeps 140 characters of a description and 255 bytes of a context.
- GitLab: ``POST /api/v4/projects/{id or url-encoded path}/statuses/{sha}``, ``PRIVATE-TOKEN: T``,
  ``{state, name, description, target_url}``, states pending|running|success|failed|canceled|skipped.
"""

from __future__ import annotations

import email.utils
import functools
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote, urlsplit

import httpx

from modelfleet.reconciler.secrets import redact_url
from modelfleet.reconciler.status import CommitStatus, State, StatusError

if TYPE_CHECKING:
    from modelfleet.reconciler.config import StatusSettings

log = logging.getLogger("modelfleet.status.forges")

GITHUB_API_URL = "https://api.github.com"
USER_AGENT = "modelfleet-status/0.1"

_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_SCP_LIKE = re.compile(r"^(?:[^@/:]+@)?(?P<host>[^:/]+):(?P<path>.+)$")
_MAX_DELAY = 5.0


class _Secret:
    """A token that does not show itself in reprs, f-strings or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "'***'"

    __str__ = __repr__


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """httpx's default verification context, built once (building one costs tens of ms)."""
    return httpx.create_ssl_context()


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _ForgeWriter:
    """Shared transport: one POST per status, retried on transient failures."""

    forge: ClassVar[str]
    max_description: ClassVar[int] = 255
    # Written through the status outbox (status/outbox.py): in the background, retried there.
    background: ClassVar[bool] = True
    _target_field: ClassVar[str] = "owner_repo"

    def __init__(self, base_url: str, target: str, token: str, *, timeout: float = 10.0,
                 attempts: int = 3, backoff: float = 0.5) -> None:
        url = httpx.URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"{self.forge}: base URL must be an http(s) URL, got {redact_url(base_url)!r}")
        if not token.strip():
            raise ValueError(f"{self.forge}: the status token is empty")
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.base_url = base_url.rstrip("/")
        self._target = target
        self._token = _Secret(token.strip())
        self.timeout = timeout
        self.attempts = attempts
        self.backoff = backoff
        self._client: httpx.Client | None = None
        self._client_lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(base_url={redact_url(self.base_url)!r}, "
                f"{self._target_field}={self._target!r}, token=***)")

    @property
    def target(self) -> str:
        """The repository statuses go to: ``owner/name`` (GitLab: the project path or id)."""
        return self._target

    # -- per forge ------------------------------------------------------------------------------

    def _url(self, sha: str) -> str:
        raise NotImplementedError

    def _headers(self) -> dict[str, str]:
        raise NotImplementedError

    def _body(self, status: CommitStatus) -> dict[str, Any]:
        body: dict[str, Any] = {"state": status.state, "context": status.context,
                                "description": _cut(status.description, self.max_description)}
        if status.target_url:
            body["target_url"] = status.target_url
        return body

    def _check(self, status: CommitStatus) -> None:
        """Refuse, before sending anything, a status the forge would reject."""

    def _accepts(self, response: httpx.Response) -> bool:
        """A non-2xx answer that still means the status is in place."""
        return False

    # -- StatusWriter ---------------------------------------------------------------------------

    def publish(self, revision: str, statuses: list[CommitStatus]) -> None:
        """POST each status in order; the first one that cannot be written raises StatusError
        (the rest are not tried: the daemon republishes everything on its next pass)."""
        if not _SHA.fullmatch(revision):
            raise StatusError(f"{self.forge}: {revision!r} is not a full commit SHA", transient=False)
        for status in statuses:
            self._check(status)
        for status in statuses:
            self._post(self._http(), revision, status)

    def close(self) -> None:
        """Close the pooled HTTP connections (publish opens new ones if called again)."""
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def _http(self) -> httpx.Client:
        with self._client_lock:
            if self._client is None:
                # No auth on the client itself: the token goes into each request's headers only.
                self._client = httpx.Client(timeout=self.timeout, follow_redirects=False, verify=_tls_context(),
                                            headers={"User-Agent": USER_AGENT})
            return self._client

    def _post(self, client: httpx.Client, sha: str, status: CommitStatus) -> None:
        url, body, headers = self._url(sha), self._body(status), self._headers()
        what = f"{self.forge}: status {status.context!r} on {sha[:12]} of {self._target}"
        problem, retry_after = "no attempt made", None
        for attempt in range(1, self.attempts + 1):
            delay = self.backoff * 2 ** (attempt - 1)
            try:
                response = client.post(url, json=body, headers=headers)
            except httpx.TransportError as exc:  # connection refused/reset, timeouts, protocol errors
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                retry_after = None
            else:
                if response.is_success or self._accepts(response):
                    log.debug("%s: %s", what, status.state)
                    return
                problem = f"HTTP {response.status_code} {response.reason_phrase}: {_explain(response)}"
                retry_after = _retry_after(response)
                rate_limited = response.status_code == 429 or (response.status_code == 403 and retry_after is not None)
                if response.status_code < 500 and not rate_limited:
                    raise StatusError(self._hide(f"{what}: {problem}"), transient=False)
                delay = max(delay, retry_after or 0.0)
            if attempt < self.attempts:
                log.debug("%s: attempt %d/%d failed (%s)", what, attempt, self.attempts, self._hide(problem))
                time.sleep(min(delay, _MAX_DELAY))
        tries = f" (gave up after {self.attempts} attempts)" if self.attempts > 1 else ""
        raise StatusError(self._hide(f"{what}: {problem}{tries}"), retry_after=retry_after)

    def _hide(self, text: str) -> str:
        return redact_url(text.replace(self._token.reveal(), "***"))


class GiteaWriter(_ForgeWriter):
    """Gitea / Forgejo: ``POST {base}/api/v1/repos/{owner}/{repo}/statuses/{sha}``."""

    forge = "gitea"

    def __init__(self, base_url: str, owner_repo: str, token: str, **options: Any) -> None:
        super().__init__(base_url, _owner_repo(owner_repo, "gitea"), token, **options)

    def _url(self, sha: str) -> str:
        owner, name = self._target.split("/")
        return f"{self.base_url}/api/v1/repos/{quote(owner, safe='')}/{quote(name, safe='')}/statuses/{sha}"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self._token.reveal()}", "Accept": "application/json"}


class GitHubWriter(_ForgeWriter):
    """GitHub (and GitHub Enterprise, base ``https://HOST/api/v3``): ``POST {base}/repos/{o}/{r}/statuses/{sha}``.

    ``base_url=None`` means ``https://api.github.com``.
    """

    forge = "github"
    max_description = 140
    max_context_bytes = 255

    def __init__(self, base_url: str | None, owner_repo: str, token: str, **options: Any) -> None:
        super().__init__(base_url or GITHUB_API_URL, _owner_repo(owner_repo, "github"), token, **options)

    def _url(self, sha: str) -> str:
        owner, name = self._target.split("/")
        return f"{self.base_url}/repos/{quote(owner, safe='')}/{quote(name, safe='')}/statuses/{sha}"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token.reveal()}",
                "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": "2022-11-28"}

    def _check(self, status: CommitStatus) -> None:
        size = len(status.context.encode())
        if size > self.max_context_bytes:
            raise StatusError(f"github: context {status.context[:60]!r}... is {size} bytes, "
                              f"GitHub accepts at most {self.max_context_bytes}", transient=False)


_GITLAB_STATES: dict[State, str] = {"pending": "pending", "success": "success",
                                    "failure": "failed", "error": "failed"}


class GitLabWriter(_ForgeWriter):
    """GitLab: ``POST {base}/api/v4/projects/{id}/statuses/{sha}`` (id: number or url-encoded path)."""

    forge = "gitlab"
    _target_field = "project"

    def __init__(self, base_url: str, project: str | int, token: str, **options: Any) -> None:
        project = str(project).strip().strip("/")
        if not project or (not project.isdigit() and "/" not in project):
            raise ValueError(f"gitlab: project must be a numeric id or a path 'group/name', got {project!r}")
        super().__init__(base_url, project, token, **options)

    def _url(self, sha: str) -> str:
        return f"{self.base_url}/api/v4/projects/{quote(self._target, safe='')}/statuses/{sha}"

    def _headers(self) -> dict[str, str]:
        return {"PRIVATE-TOKEN": self._token.reveal(), "Accept": "application/json"}

    def _body(self, status: CommitStatus) -> dict[str, Any]:
        body: dict[str, Any] = {"state": _GITLAB_STATES[status.state], "name": status.context,
                                "description": _cut(status.description, self.max_description)}
        if status.target_url:
            body["target_url"] = status.target_url
        return body

    def _accepts(self, response: httpx.Response) -> bool:
        # GitLab refuses to post the state a status already has ("Cannot transition status via
        # :run from :running"): the status is already what we want.
        return response.status_code == 400 and "Cannot transition status" in response.text


# -- factories (registered in status/registry.py) --------------------------------------------------


def gitea_from_settings(settings: StatusSettings, *, repo_path: str, repo_url: str | None) -> GiteaWriter:
    """Provider ``gitea``: owner/name from ``repo.url``; the API at ``status.url`` or the same host."""
    base_url, segments, token = _forge_target("gitea", settings, repo_url)
    return GiteaWriter(base_url, "/".join(segments[-2:]), token)


def github_from_settings(settings: StatusSettings, *, repo_path: str, repo_url: str | None) -> GitHubWriter:
    """Provider ``github``: owner/name from ``repo.url``; the API at ``status.url``, else
    api.github.com for github.com and ``https://HOST/api/v3`` (GitHub Enterprise Server) otherwise."""
    base_url, segments, token = _forge_target("github", settings, repo_url, default_api=_github_api)
    return GitHubWriter(base_url, "/".join(segments[-2:]), token)


def gitlab_from_settings(settings: StatusSettings, *, repo_path: str, repo_url: str | None) -> GitLabWriter:
    """Provider ``gitlab``: the full project path from ``repo.url``; the API at ``status.url`` or the same host."""
    base_url, segments, token = _forge_target("gitlab", settings, repo_url)
    return GitLabWriter(base_url, "/".join(segments), token)


def _same_host(origin: str, host: str) -> str:
    return origin


def _github_api(origin: str, host: str) -> str:
    return GITHUB_API_URL if host == "github.com" else f"{origin}/api/v3"


def _forge_target(provider: str, settings: StatusSettings, repo_url: str | None,
                  default_api: Callable[[str, str], str] = _same_host) -> tuple[str, list[str], str]:
    """(API base URL, repository path segments, token) of a forge provider. ValueError on bad settings."""
    if not repo_url:
        raise ValueError(f"status provider {provider!r} needs the repository URL (repo.url)")
    token = _read_token(provider, settings.token_file)
    origin, host, segments = _split_repo_url(repo_url)
    base_url = settings.url
    if base_url:
        prefix = [s for s in urlsplit(base_url).path.split("/") if s]
        if prefix and segments[: len(prefix)] == prefix:
            segments = segments[len(prefix):]  # forge served under a sub-path
    if len(segments) < 2:
        raise ValueError(f"cannot tell owner/name from repository URL {redact_url(repo_url)!r}")
    return base_url or default_api(origin, host), segments, token


def _read_token(provider: str, token_file: str | None) -> str:
    if not token_file:
        raise ValueError(f"status provider {provider!r} needs a token file (status.tokenFile)")
    try:
        token = Path(token_file).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ValueError(f"status token file {token_file} does not exist (status.tokenFile, "
                         f"provider {provider!r})") from None
    except OSError as exc:
        raise ValueError(f"cannot read status token file {token_file}: {exc.strerror}") from None
    if not token:
        raise ValueError(f"status token file {token_file} is empty")
    return token


def _split_repo_url(url: str) -> tuple[str, str, list[str]]:
    """(web origin, host, path segments without .git) of https://, ssh:// and scp-like git URLs."""
    url = url.strip()
    if "://" in url:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.scheme not in ("http", "https", "ssh", "git", "git+ssh", "ssh+git") or not host:
            raise ValueError(f"cannot tell the forge from repository URL {redact_url(url)!r}")
        shown = f"[{host}]" if ":" in host else host
        if parts.scheme in ("http", "https"):
            origin = f"{parts.scheme}://{shown}" + (f":{parts.port}" if parts.port else "")
        else:
            origin = f"https://{shown}"
        path = parts.path
    else:
        match = _SCP_LIKE.match(url)
        if not match or url.startswith(("/", ".")):
            raise ValueError(f"cannot tell the forge from repository URL {redact_url(url)!r}")
        host, path = match["host"], match["path"]
        origin = f"https://{host}"
    segments = [s for s in path.split("/") if s]
    if segments:
        segments[-1] = segments[-1].removesuffix(".git")
    return origin, host.lower(), segments


def _owner_repo(value: str, forge: str) -> str:
    parts = value.strip().strip("/").removesuffix(".git").split("/")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"{forge}: repository must be 'owner/name', got {value!r}")
    return "/".join(parts)


def _explain(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("message"), str | list | dict):
        return _cut(str(data["message"]), 300)
    return _cut(" ".join(response.text.split()), 300) or "(empty body)"


def _retry_after(response: httpx.Response) -> float | None:
    """The seconds to wait that the forge asked for: ``Retry-After`` (seconds or an HTTP date), or
    GitHub's exhausted rate limit (403/429 with ``x-ratelimit-remaining: 0`` until ``x-ratelimit-reset``).
    None when it did not say (a 403 without it is a permission problem, not a rate limit)."""
    value = response.headers.get("Retry-After", "").strip()
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
            except (TypeError, ValueError, IndexError, OverflowError):
                return None
    if response.headers.get("x-ratelimit-remaining") == "0":
        try:
            return max(0.0, float(response.headers.get("x-ratelimit-reset", "")) - time.time())
        except ValueError:
            return None
    return None
