"""``modelfleet upload FILE.mar``: validate locally, stream to the daemon, resume after drops.

    modelfleet upload model.mar [--config modelfleet.yaml | --api http://host:8081] [--token-file F]

The archive is checked with the same ``validate_mar`` the daemon runs, then sent in one streamed
PATCH of a resumable upload session (see api_artifacts.py); when the connection drops, the
client asks the daemon for the offset it has (HEAD) and continues from there, with bounded
retries and backoff. The sha256 is computed while sending (each byte hashed once, also across
resumes) and checked by the daemon at completion. Prints the ``sha256:`` reference and the
manifest snippet to paste. Exit codes: 0 ok, 1 invalid input, 2 usage, 3 runtime failure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from modelfleet.reconciler.artifacts.errors import InvalidArtifact
from modelfleet.reconciler.artifacts.mar import validate_mar
from modelfleet.reconciler.secrets import read_secret

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_RUNTIME = 0, 1, 2, 3
CHUNK = 1 << 20
DEFAULT_API = "http://127.0.0.1:8081"

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


class UploadFailed(Exception):
    def __init__(self, message: str, code: int = EXIT_RUNTIME) -> None:
        super().__init__(message)
        self.code = code


def add_upload_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "upload", help="upload a model archive (.mar) to the daemon's artifact store",
        description="Validate a TorchServe model archive, upload it (resumable) and print its sha256 reference.")
    p.add_argument("file", metavar="FILE.mar", help="model archive built by torch-model-archiver")
    p.add_argument("--config", help="daemon config, to find the API address and token")
    p.add_argument("--api", help=f"API base URL (default: from --config, else {DEFAULT_API})")
    p.add_argument("--token-file", help="file holding the API bearer token (default: api.tokenFile of --config)")
    p.add_argument("--retries", type=int, default=8,
                   help="consecutive failed attempts before giving up (default: 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    p.set_defaults(func=cmd_upload)
    return p


def cmd_upload(args: argparse.Namespace) -> int:
    try:
        base, token = _endpoint(args)
        path = Path(args.file)
        if not path.is_file():
            raise UploadFailed(f"{args.file}: no such file", EXIT_INVALID)
        if not path.name.lower().endswith(".mar"):
            raise UploadFailed(f"{args.file}: not a .mar model archive (build one with torch-model-archiver)",
                               EXIT_INVALID)
        try:
            info = validate_mar(path)
        except InvalidArtifact as exc:
            raise UploadFailed(str(exc), EXIT_INVALID) from None
        err.print(f"{path.name}: model {info.model_name} version {info.version}, handler {info.handler}, "
                  f"{_human(path.stat().st_size)}", markup=False)
        result = Uploader(base, token, retries=max(args.retries, 1), progress=not args.no_progress).upload(path)
    except UploadFailed as exc:
        err.print(f"modelfleet upload: {exc}", markup=False)
        return exc.code
    except KeyboardInterrupt:
        err.print("modelfleet upload: interrupted (run it again to upload anew)", markup=False)
        return 130
    if args.json:
        print(json.dumps(result, indent=2))
        return EXIT_OK
    ref = result["sha256"]
    out.print(ref, markup=False)
    out.print(f"\nstored {result.get('model_name') or path.name} ({_human(int(result['size']))}); "
              "use it in a Model deployment:\n", markup=False)
    out.print(f'    origin:\n      file:\n        sha256: "{ref}"', markup=False)
    return EXIT_OK


def _endpoint(args: argparse.Namespace) -> tuple[str, str | None]:
    base: str | None = args.api
    token_file: str | None = args.token_file
    if args.config:
        from modelfleet.reconciler.config import ConfigError, load_config, local_url

        try:
            config = load_config(args.config)
        except ConfigError as exc:
            raise UploadFailed(str(exc), EXIT_INVALID) from None
        base = base or local_url(config.api.listen)
        token_file = token_file or config.api.token_file
    base = (base or DEFAULT_API).rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise UploadFailed(f"--api {base!r}: give an http:// or https:// URL", EXIT_USAGE)
    token = None
    if token_file:
        try:
            token = read_secret(token_file)
        except OSError as exc:
            raise UploadFailed(f"cannot read the token file {token_file}: {exc.strerror}", EXIT_INVALID) from None
        except UnicodeDecodeError:
            raise UploadFailed(f"the token file {token_file} is not UTF-8 text", EXIT_INVALID) from None
    else:
        token = os.environ.get("MODELFLEET_API_TOKEN") or None
    return base, token


class Uploader:
    """One file through one resumable session; each byte is hashed once, in order."""

    def __init__(self, base: str, token: str | None, *, retries: int = 8, progress: bool = True,
                 chunk_size: int = CHUNK, backoff: float = 0.5) -> None:
        self.base = base
        self.retries = retries
        self.chunk_size = chunk_size
        self.backoff = backoff
        self.show_progress = progress
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(headers=headers, trust_env=False,
                                   timeout=httpx.Timeout(connect=10.0, read=120.0, write=120.0, pool=10.0))
        self._hash = hashlib.sha256()
        self._hashed = 0  # bytes [0, _hashed) are in _hash

    def upload(self, path: Path) -> dict[str, Any]:
        size = path.stat().st_size
        try:
            with self._progress(path.name, size) as (progress, task):
                session = self._retrying("start the upload", lambda: self._json(self.client.post(
                    f"{self.base}/api/v1/uploads", json={"name": path.name, "size": size}), 201))
                url = f"{self.base}/api/v1/uploads/{session['id']}"
                offset = 0
                failures = 0
                while offset < size or size == 0:
                    try:
                        offset = self._send(url, path, offset, size, progress, task)
                        failures = 0
                        if size == 0:
                            break
                    except (httpx.TransportError, _Conflict) as exc:
                        failures += 1
                        if failures >= self.retries:
                            raise UploadFailed(f"upload failed after {failures} attempts: {_describe(exc)}") from None
                        delay = min(self.backoff * 2 ** (failures - 1), 10.0)
                        err.print(f"connection problem ({_describe(exc)}); resuming in {delay:.1f} s", markup=False)
                        time.sleep(delay)
                        offset = self._retrying("ask the daemon for the offset", lambda: self._offset(url))
                        progress.update(task, completed=offset)
                self._catch_up(path, size)
                digest = self._hash.hexdigest()
                progress.update(task, description=f"{path.name}: verifying")
                return self._retrying("complete the upload", lambda: self._json(self.client.post(
                    f"{url}/complete", json={"sha256": f"sha256:{digest}"},
                    timeout=httpx.Timeout(connect=10.0, read=3600.0, write=60.0, pool=10.0)), 201))
        finally:
            self.client.close()

    def _send(self, url: str, path: Path, offset: int, size: int, progress: Progress, task: TaskID) -> int:
        def body() -> Iterator[bytes]:
            position = offset
            with open(path, "rb") as fh:
                fh.seek(offset)
                while position < size:
                    chunk = fh.read(min(self.chunk_size, size - position))
                    if not chunk:
                        raise UploadFailed(f"{path} shrank while uploading")
                    self._feed(position, chunk)
                    position += len(chunk)
                    progress.update(task, completed=position)
                    yield chunk

        response = self.client.patch(url, content=body(), headers={
            "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream",
            "Content-Length": str(size - offset)})
        if response.status_code == 409:
            raise _Conflict(response)
        data = self._json(response, 200)
        return int(data["offset"])

    def _feed(self, position: int, chunk: bytes) -> None:
        """Hash bytes we have not hashed yet (a resend after a drop is not hashed twice)."""
        end = position + len(chunk)
        if end <= self._hashed:
            return
        self._hash.update(memoryview(chunk)[self._hashed - position:] if position < self._hashed else chunk)
        self._hashed = end

    def _catch_up(self, path: Path, size: int) -> None:
        if self._hashed >= size:
            return
        with open(path, "rb") as fh:
            fh.seek(self._hashed)
            while chunk := fh.read(self.chunk_size):
                self._feed(self._hashed, chunk)

    def _offset(self, url: str) -> int:
        response = self.client.head(url)
        if response.status_code != 200:
            raise UploadFailed(f"HEAD {url} answered {response.status_code}: the session is gone; upload again")
        return int(response.headers["upload-offset"])

    def _retrying(self, what: str, call: Any) -> Any:
        for attempt in range(1, self.retries + 1):
            try:
                return call()
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise UploadFailed(f"cannot {what} at {self.base}: {_describe(exc)}") from None
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 10.0))
        raise AssertionError("unreachable")

    def _json(self, response: httpx.Response, expected: int) -> dict[str, Any]:
        if response.status_code == expected:
            data: dict[str, Any] = response.json()
            return data
        try:
            message = response.json().get("error") or response.text
        except ValueError:
            message = response.text
        if response.status_code == 401:
            raise UploadFailed(f"the daemon refused the token ({message}); pass --token-file or --config")
        if response.status_code == 422:
            raise UploadFailed(f"the daemon rejected the archive: {message}", EXIT_INVALID)
        raise UploadFailed(f"{response.request.method} {response.request.url} answered "
                           f"{response.status_code}: {message[:300]}")

    def _progress(self, name: str, size: int) -> Any:
        progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                            TransferSpeedColumn(), TimeRemainingColumn(), console=err,
                            disable=not self.show_progress, transient=False)

        class _Ctx:
            def __enter__(self) -> tuple[Progress, TaskID]:
                progress.start()
                return progress, progress.add_task(name, total=size)

            def __exit__(self, *exc: object) -> None:
                progress.stop()

        return _Ctx()


class _Conflict(Exception):
    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"offset conflict: {response.text[:200]}")


def _describe(exc: BaseException) -> str:
    text = str(exc) or ""
    return f"{type(exc).__name__}{': ' + text[:200] if text else ''}"


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m modelfleet.reconciler.cli.upload FILE.mar ...``)."""
    parser = argparse.ArgumentParser(prog="modelfleet")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_upload_parser(sub)
    args = parser.parse_args(argv)
    return cmd_upload(args)


if __name__ == "__main__":
    raise SystemExit(main())
