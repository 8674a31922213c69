"""A stand-in for a forge's commit-status and pull-request APIs (Gitea/Forgejo, GitHub or GitLab), for tests.

It is NOT the forge (no forge can be installed on the test machines): an http.server on 127.0.0.1 that
checks every request against the request shape the forge documents -- method, path with the
commit SHA, auth header scheme, required headers, JSON field names, allowed states, length limits --
records it, and answers like the forge would (201 with the status, 401 on a bad token, 422 on a
malformed request), or with responses a test scripts.

It also keeps pull requests (GitLab: merge requests) and their comments (notes) as state: a test
opens one with ``add_pull`` and moves its head with ``move_pull``; the daemon lists them, comments
(POST), edits its comment (PATCH; GitLab PUT) and the release CLI opens them (POST), each request
checked against the documented method, path, query, auth header and JSON fields.

- Gitea/Forgejo: https://gitea.com/api/swagger#/repository/repoCreateStatus, #/repository/repoListPullRequests,
  #/issue/issueGetComments, #/issue/issueCreateComment, #/issue/issueEditComment, #/repository/repoCreatePullRequest
- GitHub: https://docs.github.com/en/rest/commits/statuses#create-a-commit-status,
  https://docs.github.com/en/rest/pulls/pulls#list-pull-requests, #create-a-pull-request,
  https://docs.github.com/en/rest/issues/comments#list-issue-comments, #create-an-issue-comment,
  #update-an-issue-comment
- GitLab: https://docs.gitlab.com/ee/api/commits.html#set-the-pipeline-status-of-a-commit,
  https://docs.gitlab.com/ee/api/merge_requests.html#list-project-merge-requests, #create-mr,
  https://docs.gitlab.com/ee/api/notes.html#merge-requests (list, create, modify: PUT)
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit


@dataclass(frozen=True)
class ForgeShape:
    path: str  # regex over the raw request path; named groups 'target' and 'sha'
    auth_header: str
    auth_scheme: str  # prefix before the token ("" for GitLab's PRIVATE-TOKEN)
    fields: frozenset[str]  # accepted JSON fields
    required: frozenset[str]
    states: frozenset[str]
    context_field: str
    fixed_headers: dict[str, str] = field(default_factory=dict)
    max_description: int | None = None
    max_context_bytes: int | None = None
    unauthorized: dict[str, Any] = field(default_factory=dict)


SHAPES: dict[str, ForgeShape] = {
    "gitea": ForgeShape(
        path=r"/api/v1/repos/(?P<target>[^/]+/[^/]+)/statuses/(?P<sha>[^/?]+)",
        auth_header="Authorization", auth_scheme="token ",
        fields=frozenset({"state", "target_url", "description", "context"}),
        required=frozenset({"state"}),
        states=frozenset({"pending", "success", "error", "failure", "warning"}),
        context_field="context",
        unauthorized={"message": "user does not exist [uid: 0, name: ]", "url": "https://gitea/api/swagger"},
    ),
    "github": ForgeShape(
        path=r"/repos/(?P<target>[^/]+/[^/]+)/statuses/(?P<sha>[^/?]+)",
        auth_header="Authorization", auth_scheme="Bearer ",
        fields=frozenset({"state", "target_url", "description", "context"}),
        required=frozenset({"state"}),
        states=frozenset({"error", "failure", "pending", "success"}),
        context_field="context",
        fixed_headers={"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28"},
        max_description=140, max_context_bytes=255,
        unauthorized={"message": "Bad credentials", "documentation_url": "https://docs.github.com/rest"},
    ),
    "gitlab": ForgeShape(
        path=r"/api/v4/projects/(?P<target>[^/]+)/statuses/(?P<sha>[^/?]+)",
        auth_header="PRIVATE-TOKEN", auth_scheme="",
        fields=frozenset({"state", "ref", "name", "context", "target_url", "description", "coverage",
                          "pipeline_id"}),
        required=frozenset({"state"}),
        states=frozenset({"pending", "running", "success", "failed", "canceled", "skipped"}),
        context_field="name",
        unauthorized={"message": "401 Unauthorized"},
    ),
}

_SHA = re.compile(r"[0-9a-f]{40}")


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: Any
    sha: str
    target: str


class StandInForge:
    """The stand-in forge. ``target`` is 'owner/name' (GitLab: the project path or id)."""

    def __init__(self, forge: str, token: str, target: str) -> None:
        self.forge, self.shape, self.token, self.target = forge, SHAPES[forge], token, target
        self.requests: list[Recorded] = []
        self.violations: list[str] = []
        self.script: list[tuple[int, Any]] = []  # answers to give, in order, to well-formed requests
        self.reply_headers: dict[int, dict[str, str]] = {}  # extra headers of answers by code (Retry-After)
        # Pull requests (number -> state) and their comments, oldest first.
        self.pulls: dict[int, dict[str, Any]] = {}
        self.comments: dict[int, list[dict[str, Any]]] = {}
        self._next_comment = 1000
        self._clock = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.01},
                                        daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> StandInForge:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # -- checking ------------------------------------------------------------------------------------

    def _check(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, Any]:
        shape, problems = self.shape, []
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        match = re.fullmatch(shape.path, path)
        if match is None and (method != "POST" or not re.search(r"/statuses/", path)):
            return self._pull_api(method, path, headers, raw, body)
        with self._lock:
            self.requests.append(Recorded(method, path, headers, body, match["sha"] if match else "",
                                          match["target"] if match else ""))
        if method != "POST":
            problems.append(f"method {method}, expected POST")
        expected_target = self.target if self.forge != "gitlab" else quote(self.target, safe="")
        if not match or match["target"] != expected_target:
            with self._lock:
                self.violations.append(f"path {path!r} is not {shape.path} for {expected_target}")
            return 404, {"message": "404 Not Found"}
        if not _SHA.fullmatch(match["sha"]):
            problems.append(f"sha {match['sha']!r} is not a full lower-case commit SHA")
        if headers.get(shape.auth_header.lower()) != f"{shape.auth_scheme}{self.token}":
            return 401, shape.unauthorized
        for name, value in shape.fixed_headers.items():
            if headers.get(name.lower()) != value:
                problems.append(f"header {name}: {headers.get(name.lower())!r}, expected {value!r}")
        if not headers.get("content-type", "").startswith("application/json"):
            problems.append(f"content-type {headers.get('content-type')!r}, expected application/json")
        if not isinstance(body, dict):
            problems.append("body is not a JSON object")
            body = {}
        if unknown := set(body) - shape.fields:
            problems.append(f"unknown fields {sorted(unknown)}")
        if missing := shape.required - set(body):
            problems.append(f"missing fields {sorted(missing)}")
        if body.get("state") not in shape.states:
            problems.append(f"state {body.get('state')!r} not in {sorted(shape.states)}")
        context = body.get(shape.context_field)
        if not isinstance(context, str) or not context:
            problems.append(f"{shape.context_field} {context!r} is not a non-empty string")
        elif shape.max_context_bytes and len(context.encode()) > shape.max_context_bytes:
            problems.append(f"{shape.context_field} longer than {shape.max_context_bytes} bytes")
        description = body.get("description", "")
        if not isinstance(description, str):
            problems.append("description is not a string")
        elif shape.max_description and len(description) > shape.max_description:
            problems.append(f"description longer than {shape.max_description} characters")
        target_url = body.get("target_url")
        if target_url is not None and not (isinstance(target_url, str) and target_url.startswith("http")):
            problems.append(f"target_url {target_url!r} is not an http(s) URL")
        with self._lock:
            if problems:
                self.violations.extend(problems)
                return 422, {"message": "Validation Failed", "errors": problems}
            if self.script:
                return self.script.pop(0)
        return 201, {"id": len(self.requests), **body}

    # -- pull requests and comments --------------------------------------------------------------

    def add_pull(self, number: int, head_branch: str, head_sha: str, base: str = "main",
                 title: str = "a change", fork: str | None = None) -> None:
        """``fork``: the head is in that repository ('someone/models'), not in ours."""
        with self._lock:
            self._clock += 1
            self.pulls[number] = {"number": number, "head": head_branch, "sha": head_sha, "base": base,
                                  "title": title, "state": "open", "updated": self._clock, "fork": fork}

    def move_pull(self, number: int, head_sha: str) -> None:
        """A push to the pull request: its head moves (and it is the most recently updated)."""
        with self._lock:
            self._clock += 1
            self.pulls[number].update(sha=head_sha, updated=self._clock)

    def comments_on(self, number: int) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(c) for c in self.comments.get(number, [])]

    def add_comment(self, number: int, body: str, author: str = "someone") -> int:
        with self._lock:
            self._next_comment += 1
            self.comments.setdefault(number, []).append({"id": self._next_comment, "body": body, "author": author})
            return self._next_comment

    def _prefix(self) -> str:
        if self.forge == "github":
            return f"/repos/{self.target}"
        if self.forge == "gitea":
            return f"/api/v1/repos/{self.target}"
        return f"/api/v4/projects/{quote(self.target, safe='')}"

    def _pull_json(self, pull: dict[str, Any]) -> dict[str, Any]:
        updated = f"2026-12-01T10:{pull['updated'] // 60:02d}:{pull['updated'] % 60:02d}Z"
        if self.forge == "gitlab":
            project = 4242
            return {"id": 90000 + pull["number"], "iid": pull["number"], "title": pull["title"],
                    "target_project_id": project, "source_project_id": 5151 if pull.get("fork") else project,
                    "state": "opened" if pull["state"] == "open" else pull["state"],
                    "source_branch": pull["head"], "target_branch": pull["base"], "sha": pull["sha"],
                    "web_url": f"{self.url}/{self.target}/-/merge_requests/{pull['number']}", "updated_at": updated}
        owner = self.target.split("/")[0]
        return {"id": 70000 + pull["number"], "number": pull["number"], "title": pull["title"], "state": pull["state"],
                "html_url": f"{self.url}/{self.target}/pull/{pull['number']}", "updated_at": updated,
                "base": {"ref": pull["base"], "label": f"{owner}:{pull['base']}",
                         "repo": {"full_name": self.target}},
                "head": {"ref": pull["head"], "sha": pull["sha"], "label": f"{owner}:{pull['head']}",
                         "repo": {"full_name": pull.get("fork") or self.target}}}

    def _comment_json(self, comment: dict[str, Any]) -> dict[str, Any]:
        if self.forge == "gitlab":
            return {"id": comment["id"], "body": comment["body"], "author": {"username": comment["author"]},
                    "system": False, "noteable_type": "MergeRequest"}
        return {"id": comment["id"], "body": comment["body"], "user": {"login": comment["author"]}}

    def _page(self, items: list[dict[str, Any]], query: dict[str, str], problems: list[str]) -> list[dict[str, Any]]:
        size_key = "limit" if self.forge == "gitea" else "per_page"
        if self.forge != "gitea" and "limit" in query:
            problems.append("'limit' is Gitea's page size; this forge takes 'per_page'")
        if self.forge == "gitea" and "per_page" in query:
            problems.append("Gitea's page size is 'limit', not 'per_page'")
        size = int(query.get(size_key, "30"))
        if size > (50 if self.forge == "gitea" else 100):
            problems.append(f"{size_key}={size} is over the forge's maximum page size")
        page = int(query.get("page", "1"))
        return items[(page - 1) * size: page * size]

    def _pull_api(self, method: str, raw_path: str, headers: dict[str, str], raw: bytes,
                  body: Any) -> tuple[int, Any]:
        shape, problems = self.shape, []
        parts = urlsplit(raw_path)
        path = parts.path
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        with self._lock:
            self.requests.append(Recorded(method, raw_path, headers, body, "", self.target))
        prefix = self._prefix()
        if not path.startswith(prefix + "/"):
            with self._lock:
                self.violations.append(f"{method} {path!r} is not under {prefix}")
            return 404, {"message": "404 Not Found"}
        if headers.get(shape.auth_header.lower()) != f"{shape.auth_scheme}{self.token}":
            return 401, shape.unauthorized
        for name, value in shape.fixed_headers.items():
            if headers.get(name.lower()) != value:
                problems.append(f"header {name}: {headers.get(name.lower())!r}, expected {value!r}")
        rest = path[len(prefix):]
        if method in ("POST", "PATCH", "PUT"):
            if not headers.get("content-type", "").startswith("application/json"):
                problems.append(f"content-type {headers.get('content-type')!r}, expected application/json")
            if not isinstance(body, dict):
                problems.append("body is not a JSON object")
                body = {}
        gitlab = self.forge == "gitlab"
        pulls_path = "/merge_requests" if gitlab else "/pulls"
        comments = re.fullmatch(r"/merge_requests/(\d+)/notes" if gitlab else r"/issues/(\d+)/comments", rest)
        comment = re.fullmatch(r"/merge_requests/(\d+)/notes/(\d+)" if gitlab else r"/issues/comments/(\d+)", rest)
        code: int = 404
        answer: Any = {"message": "404 Not Found"}
        with self._lock:
            if rest == pulls_path and method == "GET":
                state = query.get("state")
                if state != ("opened" if gitlab else "open"):
                    problems.append(f"state={state!r}: list the open ones ({'opened' if gitlab else 'open'})")
                items = [p for p in self.pulls.values() if p["state"] == "open"]
                if gitlab:
                    if "target_branch" in query:
                        items = [p for p in items if p["base"] == query["target_branch"]]
                    if "source_branch" in query:
                        items = [p for p in items if p["head"] == query["source_branch"]]
                else:
                    if self.forge == "github" and "base" in query:
                        items = [p for p in items if p["base"] == query["base"]]
                    if self.forge == "github" and "head" in query:
                        owner, _, branch = query["head"].partition(":")
                        if owner != self.target.split("/")[0] or not branch:
                            problems.append(f"head={query['head']!r} is not 'owner:branch'")
                        items = [p for p in items if p["head"] == branch]
                items.sort(key=lambda p: p["updated"], reverse=True)
                code, answer = 200, [self._pull_json(p) for p in self._page(items, query, problems)]
            elif rest == pulls_path and method == "POST":
                need = ({"source_branch", "target_branch", "title"} if gitlab else {"title", "head", "base"})
                allowed = need | ({"description", "assignee_id", "labels", "remove_source_branch"} if gitlab
                                  else {"body", "draft", "maintainer_can_modify", "assignees", "labels"})
                if missing := need - set(body):
                    problems.append(f"missing fields {sorted(missing)}")
                if unknown := set(body) - allowed:
                    problems.append(f"unknown fields {sorted(unknown)}")
                head = body.get("source_branch" if gitlab else "head")
                base = body.get("target_branch" if gitlab else "base")
                if not problems:
                    if any(p["head"] == head and p["base"] == base and p["state"] == "open"
                           for p in self.pulls.values()):
                        code, answer = ((409, {"message": ["Another open merge request already exists for this "
                                                           "source branch"]}) if gitlab else
                                        (422, {"message": "Validation Failed", "errors": [
                                            {"message": f"A pull request already exists for {head}."}]})
                                        if self.forge == "github" else
                                        (409, {"message": "pull request already exists for these targets"}))
                    else:
                        number = max(self.pulls, default=0) + 1
                        self._clock += 1
                        self.pulls[number] = {"number": number, "head": head, "sha": "0" * 40, "base": base,
                                              "title": body.get("title"), "state": "open", "updated": self._clock}
                        code, answer = 201, self._pull_json(self.pulls[number])
            elif comments and method in ("GET", "POST"):
                number = int(comments[1])
                if number not in self.pulls:
                    code, answer = 404, {"message": "404 Not Found"}
                elif method == "GET":
                    items = self.comments.get(number, [])
                    if gitlab and (query.get("sort"), query.get("order_by")) != ("asc", "created_at"):
                        items = list(reversed(items))  # GitLab lists notes newest first unless told
                    code, answer = 200, [self._comment_json(c) for c in self._page(items, query, problems)]
                else:
                    if set(body) != {"body"} or not isinstance(body.get("body"), str) or not body["body"]:
                        problems.append(f"a comment is {{body: <non-empty string>}}, got fields {sorted(body)}")
                    else:
                        self._next_comment += 1
                        new = {"id": self._next_comment, "body": body["body"], "author": "modelfleet"}
                        self.comments.setdefault(number, []).append(new)
                        code, answer = 201, self._comment_json(new)
            elif comment and method == ("PUT" if gitlab else "PATCH"):
                comment_id = int(comment[2] if gitlab else comment[1])
                found = [c for n, cs in self.comments.items() for c in cs if c["id"] == comment_id
                         and (not gitlab or n == int(comment[1]))]
                if set(body) != {"body"} or not isinstance(body.get("body"), str) or not body["body"]:
                    problems.append(f"a comment edit is {{body: <non-empty string>}}, got fields {sorted(body)}")
                elif not found:
                    code, answer = 404, {"message": "404 Not Found"}
                else:
                    found[0]["body"] = body["body"]
                    code, answer = 200, self._comment_json(found[0])
            elif comment or comments or rest == pulls_path:
                problems.append(f"method {method} is not how {rest} is used on {self.forge}")
            else:
                self.violations.append(f"{method} {path!r}: no such endpoint in this stand-in")
            if problems:
                self.violations.extend(problems)
                return 422, {"message": "Validation Failed", "errors": problems}
            if self.script and code < 400:
                return self.script.pop(0)
        return code, answer

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        forge = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                code, payload = forge._check(self.command, self.path, headers, raw)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in forge.reply_headers.get(code, {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            do_POST = do_GET = do_PUT = do_PATCH = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler
