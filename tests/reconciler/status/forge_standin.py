"""A stand-in for a forge's commit-status API (Gitea/Forgejo, GitHub or GitLab), for tests.

It is NOT the forge (no forge can be installed on the test machines): an http.server on 127.0.0.1 that
checks every request against the request shape the forge documents -- method, path with the
commit SHA, auth header scheme, required headers, JSON field names, allowed states, length limits --
records it, and answers like the forge would (201 with the status, 401 on a bad token, 422 on a
malformed request), or with responses a test scripts.

- Gitea/Forgejo: https://gitea.com/api/swagger#/repository/repoCreateStatus
- GitHub: https://docs.github.com/en/rest/commits/statuses#create-a-commit-status
- GitLab: https://docs.gitlab.com/ee/api/commits.html#set-the-pipeline-status-of-a-commit
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote


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

            do_POST = do_GET = do_PUT = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler
