"""Pull requests on the forge (GitHub, Gitea/Forgejo, GitLab merge requests): list the open ones,
keep one plan comment per pull request (edited in place), open one for a pushed release branch.

What to plan and what the comment says is decided in state/pulls.py; this module only talks to the
forge. The token goes into each request's headers only, never into reprs, logs or error messages
(the forge writers' ``_Secret`` and redaction). Comments are written through a ``StatusOutbox``
(status/outbox.py) around ``CommentWriter``: in the background, the latest comment per pull request
wins, transient failures are retried with backoff (``Retry-After`` honoured).

API references (request shapes the tests' stand-in forge checks):
- GitHub: ``GET /repos/{o}/{r}/pulls?state=open&base=B&sort=updated&direction=desc``,
  ``GET|POST /repos/{o}/{r}/issues/{n}/comments`` (``{body}``), ``PATCH /repos/{o}/{r}/issues/comments/{id}``,
  ``POST /repos/{o}/{r}/pulls`` (``{title, head, base, body}``); fetch ``refs/pull/{n}/head``.
- Gitea/Forgejo: the same paths under ``/api/v1`` (``?state=open&sort=recentupdate``, ``limit``/``page``).
- GitLab: ``GET /api/v4/projects/{id}/merge_requests?state=opened&target_branch=B``,
  ``GET|POST .../merge_requests/{iid}/notes`` (``{body}``), ``PUT .../notes/{note_id}``,
  ``POST .../merge_requests`` (``{source_branch, target_branch, title, description}``); fetch
  ``refs/merge-requests/{iid}/head``.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote

import httpx

from modelfleet.reconciler.secrets import redact_url
from modelfleet.reconciler.status import CommitStatus, StatusError
from modelfleet.reconciler.status.forges import (
    GITHUB_API_URL,
    USER_AGENT,
    _explain,
    _forge_target,
    _github_api,
    _owner_repo,
    _retry_after,
    _Secret,
    _tls_context,
)
from modelfleet.state.pulls import Comment, PullRequest, own_comment

if TYPE_CHECKING:
    from modelfleet.reconciler.config import StatusSettings

log = logging.getLogger("modelfleet.status.pulls")

MAX_COMMENT_PAGES = 20  # pages of comments searched for ours (oldest first: ours is usually on the first)
COMMENT_CONTEXT = "modelfleet/plan-comment"  # the outbox key's context of a plan comment
_PULL_KEY = re.compile(r"pull/(\d+)")
_MAX_BODY = 60_000  # GitHub accepts 65,536 characters in a comment; GitLab 1,000,000


class ForgeError(StatusError):
    """The forge answered an error (``status_code``); the message never holds the token."""

    def __init__(self, message: str, status_code: int, *, transient: bool, retry_after: float | None) -> None:
        super().__init__(message, transient=transient, retry_after=retry_after)
        self.status_code = status_code


class ForgePulls:
    """One forge repository's pull requests. ``attempts``: tries per request (connection errors,
    timeouts, 429 and 5xx are transient); the outbox retries comments itself (``attempts=1``)."""

    forge: ClassVar[str]
    pull_ref_format: ClassVar[str] = "refs/pull/{number}/head"
    page_size: ClassVar[int] = 100

    def __init__(self, base_url: str, target: str, token: str, *, timeout: float = 10.0) -> None:
        url = httpx.URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"{self.forge}: base URL must be an http(s) URL, got {redact_url(base_url)!r}")
        if not token.strip():
            raise ValueError(f"{self.forge}: the token is empty")
        self.base_url = base_url.rstrip("/")
        self.target = target
        self._token = _Secret(token.strip())
        self.timeout = timeout
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()
        self._comment_ids: dict[int, int] = {}  # pull request -> our comment (found or created)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={redact_url(self.base_url)!r}, target={self.target!r}, token=***)"

    # -- per forge --------------------------------------------------------------------------------

    def _repo_path(self) -> str:
        owner, name = self.target.split("/")
        return f"/repos/{quote(owner, safe='')}/{quote(name, safe='')}"

    def _headers(self) -> dict[str, str]:
        raise NotImplementedError

    def _list_params(self, base: str) -> dict[str, str | int]:
        return {"state": "open", "base": base, "sort": "updated", "direction": "desc", "per_page": 100}

    def _page_params(self, page: int) -> dict[str, str | int]:
        return {"per_page": self.page_size, "page": page}

    def _pull(self, item: dict[str, Any]) -> PullRequest:
        base, head = item.get("base") or {}, item.get("head") or {}
        # A fork: the head's repository is another one (or gone: a deleted fork says null).
        head_repo, base_repo = (head.get("repo") or {}).get("full_name"), (base.get("repo") or {}).get("full_name")
        fork = bool(base_repo) and head_repo != base_repo
        return PullRequest(int(item["number"]), str(base.get("ref") or ""), str(head.get("ref") or ""),
                           str(head.get("sha") or ""), str(item.get("title") or ""), str(item.get("html_url") or ""),
                           str(item.get("updated_at") or ""), fork)

    def _comments_path(self, number: int) -> str:
        return f"{self._repo_path()}/issues/{number}/comments"

    def _comment_path(self, number: int, comment_id: int) -> str:
        return f"{self._repo_path()}/issues/comments/{comment_id}"

    _update_method: ClassVar[str] = "PATCH"

    def _find_pull_params(self, head_branch: str, base: str) -> dict[str, str | int]:
        owner = self.target.split("/")[0]
        return {"state": "open", "head": f"{owner}:{head_branch}", "base": base, "per_page": 100}

    def _new_pull_body(self, head_branch: str, base: str, title: str, body: str) -> dict[str, Any]:
        return {"title": title, "head": head_branch, "base": base, "body": body}

    # -- what the daemon and the CLI call ---------------------------------------------------------

    def pull_ref(self, number: int) -> str:
        """The ref the forge keeps a pull request's head at (fetched from the git remote)."""
        return self.pull_ref_format.format(number=number)

    def open_pulls(self, base: str) -> list[PullRequest]:
        """The open pull requests against ``base`` (first page, most recently updated first)."""
        items = self._request("GET", f"{self._repo_path()}/pulls", params=self._list_params(base))
        pulls = [self._pull(item) for item in _items(items, "pull requests")]
        return [p for p in pulls if p.base == base]

    def comments(self, number: int) -> list[Comment]:
        """The comments of a pull request, oldest first, as far as ours (at most MAX_COMMENT_PAGES pages)."""
        found: dict[int, Comment] = {}
        for page in range(1, MAX_COMMENT_PAGES + 1):
            items = _items(self._request("GET", self._comments_path(number), params=self._page_params(page)),
                           "comments")
            new = [Comment(int(c["id"]), str(c.get("body") or "")) for c in items
                   if "id" in c and int(c["id"]) not in found]
            found.update((c.id, c) for c in new)
            # (A page of nothing new: a forge that ignores the page parameter and answers them all.)
            if len(items) < self.page_size or not new or own_comment(new) is not None:
                break
        return list(found.values())

    def upsert_comment(self, number: int, body: str) -> int:
        """Edit our comment on the pull request (found by its marker), or create it when there is
        none; returns its id."""
        body = body if len(body) <= _MAX_BODY else body[: _MAX_BODY - 40] + "\n\n… (cut: see the full plan)\n"
        known = self._comment_ids.get(number)
        if known is None:
            mine = own_comment(self.comments(number))
            known = mine.id if mine is not None else None
        if known is not None:
            try:
                self._request(self._update_method, self._comment_path(number, known), json={"body": body})
                self._comment_ids[number] = known
                return known
            except ForgeError as exc:
                if exc.status_code != 404:
                    raise
                self._comment_ids.pop(number, None)  # deleted meanwhile: create it again
                mine = own_comment(self.comments(number))
                if mine is not None:
                    self._request(self._update_method, self._comment_path(number, mine.id), json={"body": body})
                    self._comment_ids[number] = mine.id
                    return mine.id
        created = self._request("POST", self._comments_path(number), json={"body": body})
        comment_id = int(created["id"]) if isinstance(created, dict) and "id" in created else 0
        if comment_id:
            self._comment_ids[number] = comment_id
        return comment_id

    def find_open_pull(self, head_branch: str, base: str) -> PullRequest | None:
        """The open pull request from ``head_branch`` into ``base``, if there is one."""
        items = self._request("GET", f"{self._repo_path()}/pulls", params=self._find_pull_params(head_branch, base))
        for pull in (self._pull(item) for item in _items(items, "pull requests")):
            if pull.head_branch == head_branch and pull.base == base:
                return pull
        return None

    def create_pull(self, head_branch: str, base: str, title: str, body: str) -> PullRequest:
        created = self._request("POST", f"{self._repo_path()}/pulls",
                                json=self._new_pull_body(head_branch, base, title, body))
        if not isinstance(created, dict):
            raise StatusError(f"{self.forge}: creating the pull request answered no object", transient=False)
        return self._pull(created)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    # -- transport --------------------------------------------------------------------------------

    def _http(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(timeout=self.timeout, follow_redirects=False, verify=_tls_context(),
                                            headers={"User-Agent": USER_AGENT}, trust_env=False)
            return self._client

    def _request(self, method: str, path: str, *, params: dict[str, str | int] | None = None,
                 json: dict[str, Any] | None = None) -> Any:
        """One request; the answer's JSON. StatusError (transient or not, ``retry_after``,
        ``status_code``) otherwise, without the token."""
        what = f"{self.forge}: {method} {path.split('?')[0]} of {self.target}"
        try:
            response = self._http().request(method, self.base_url + path, params=params, json=json,
                                            headers=self._headers())
        except httpx.TransportError as exc:
            problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise StatusError(self._hide(f"{what}: {problem}")) from None
        if not response.is_success:
            retry_after = _retry_after(response)
            rate_limited = response.status_code == 429 or (response.status_code == 403 and retry_after is not None)
            raise ForgeError(self._hide(f"{what}: HTTP {response.status_code} {response.reason_phrase}: "
                                        f"{_explain(response)}"), response.status_code,
                             transient=response.status_code >= 500 or rate_limited, retry_after=retry_after)
        try:
            return response.json() if response.content else None
        except ValueError:
            raise StatusError(f"{what}: the answer is not JSON", transient=True) from None

    def _hide(self, text: str) -> str:
        return redact_url(text.replace(self._token.reveal(), "***"))


def _items(data: Any, what: str) -> list[dict[str, Any]]:
    if not isinstance(data, list):
        raise StatusError(f"the forge answered no list of {what}", transient=True)
    return [item for item in data if isinstance(item, dict)]


class GitHubPulls(ForgePulls):
    forge = "github"

    def __init__(self, base_url: str | None, owner_repo: str, token: str, **options: Any) -> None:
        super().__init__(base_url or GITHUB_API_URL, _owner_repo(owner_repo, "github"), token, **options)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token.reveal()}", "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": "2022-11-28"}


class GiteaPulls(ForgePulls):
    forge = "gitea"
    page_size = 50  # Gitea's default maximum page size

    def __init__(self, base_url: str, owner_repo: str, token: str, **options: Any) -> None:
        super().__init__(base_url, _owner_repo(owner_repo, "gitea"), token, **options)

    def _repo_path(self) -> str:
        return "/api/v1" + super()._repo_path()

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self._token.reveal()}", "Accept": "application/json"}

    def _list_params(self, base: str) -> dict[str, str | int]:
        return {"state": "open", "sort": "recentupdate", "limit": 50}  # Gitea filters by base only per path

    def _page_params(self, page: int) -> dict[str, str | int]:
        return {"limit": self.page_size, "page": page}

    def _find_pull_params(self, head_branch: str, base: str) -> dict[str, str | int]:
        return {"state": "open", "limit": 50}


class GitLabPulls(ForgePulls):
    forge = "gitlab"
    pull_ref_format = "refs/merge-requests/{number}/head"
    _update_method = "PUT"

    def __init__(self, base_url: str, project: str | int, token: str, **options: Any) -> None:
        project = str(project).strip().strip("/")
        if not project or (not project.isdigit() and "/" not in project):
            raise ValueError(f"gitlab: project must be a numeric id or a path 'group/name', got {project!r}")
        super().__init__(base_url, project, token, **options)

    def _repo_path(self) -> str:
        return f"/api/v4/projects/{quote(self.target, safe='')}"

    def _headers(self) -> dict[str, str]:
        return {"PRIVATE-TOKEN": self._token.reveal(), "Accept": "application/json"}

    def open_pulls(self, base: str) -> list[PullRequest]:
        items = self._request("GET", f"{self._repo_path()}/merge_requests",
                              params={"state": "opened", "target_branch": base, "order_by": "updated_at",
                                      "sort": "desc", "per_page": 100})
        return [p for p in (self._pull(item) for item in _items(items, "merge requests")) if p.base == base]

    def _pull(self, item: dict[str, Any]) -> PullRequest:
        source, target = item.get("source_project_id"), item.get("target_project_id")
        return PullRequest(int(item["iid"]), str(item.get("target_branch") or ""), str(item.get("source_branch") or ""),
                           str(item.get("sha") or ""), str(item.get("title") or ""), str(item.get("web_url") or ""),
                           str(item.get("updated_at") or ""), target is not None and source != target)

    def _comments_path(self, number: int) -> str:
        return f"{self._repo_path()}/merge_requests/{number}/notes"

    def _comment_path(self, number: int, comment_id: int) -> str:
        return f"{self._repo_path()}/merge_requests/{number}/notes/{comment_id}"

    def _page_params(self, page: int) -> dict[str, str | int]:
        return {"per_page": self.page_size, "page": page, "sort": "asc", "order_by": "created_at"}

    def find_open_pull(self, head_branch: str, base: str) -> PullRequest | None:
        items = self._request("GET", f"{self._repo_path()}/merge_requests",
                              params={"state": "opened", "source_branch": head_branch, "target_branch": base})
        for pull in (self._pull(item) for item in _items(items, "merge requests")):
            if pull.head_branch == head_branch and pull.base == base:
                return pull
        return None

    def create_pull(self, head_branch: str, base: str, title: str, body: str) -> PullRequest:
        created = self._request("POST", f"{self._repo_path()}/merge_requests",
                                json={"source_branch": head_branch, "target_branch": base, "title": title,
                                      "description": body})
        if not isinstance(created, dict):
            raise StatusError("gitlab: creating the merge request answered no object", transient=False)
        return self._pull(created)


class CommentWriter:
    """The plan comments as a StatusWriter, for a ``StatusOutbox``: ``publish("pull/<n>",
    [CommitStatus(COMMENT_CONTEXT, state, <markdown>)])`` edits (or creates) our comment on pull
    request n. Keyed by pull request in the outbox, a newer comment supersedes one still waiting."""

    background: ClassVar[bool] = True

    def __init__(self, pulls: ForgePulls) -> None:
        self.pulls = pulls

    def __repr__(self) -> str:
        return f"CommentWriter({self.pulls!r})"

    def publish(self, revision: str, statuses: list[CommitStatus]) -> None:
        match = _PULL_KEY.fullmatch(revision)
        if match is None:
            raise StatusError(f"{revision!r} is not a pull request key (pull/<number>)", transient=False)
        for status in statuses:
            self.pulls.upsert_comment(int(match[1]), status.description)

    def close(self) -> None:
        self.pulls.close()


def comment_key(number: int) -> str:
    return f"pull/{number}"


def pulls_from_settings(settings: StatusSettings, repo_url: str | None) -> ForgePulls | None:
    """The pull requests of ``repo.url`` on the forge of ``status.provider`` (its URL and token);
    None for providers that are not forges. ValueError on bad settings (naming the key)."""
    if settings.provider == "github":
        base_url, segments, token = _forge_target("github", settings, repo_url, default_api=_github_api)
        return GitHubPulls(base_url, "/".join(segments[-2:]), token)
    if settings.provider == "gitea":
        base_url, segments, token = _forge_target("gitea", settings, repo_url)
        return GiteaPulls(base_url, "/".join(segments[-2:]), token)
    if settings.provider == "gitlab":
        base_url, segments, token = _forge_target("gitlab", settings, repo_url)
        return GitLabPulls(base_url, "/".join(segments), token)
    return None
