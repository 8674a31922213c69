"""`modelfleet upload` as a subprocess against the upload API, through a proxy that drops the connection."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelfleet.reconciler.cli import main as cli
from modelfleet.reconciler.cli.upload import main
from tests.reconciler.artifacts.archives import crafted_zip
from tests.reconciler.artifacts.conftest import UploadApi

# `modelfleet upload` once the verb is wired into the main CLI; the module's own entry until then.
_MODULE = "modelfleet.reconciler.cli.main" if "upload" in getattr(cli, "COMMANDS", {}) else \
    "modelfleet.reconciler.cli.upload"


class DroppingProxy:
    """A TCP proxy on 127.0.0.1 that cuts the first connection carrying more than ``drop_after``
    bytes towards the server (once), like a network failure in the middle of an upload."""

    def __init__(self, target_port: int, drop_after: int) -> None:
        self.target_port = target_port
        self.drop_after = drop_after
        self.dropped = 0
        self.connections = 0
        self._armed = True
        self._lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._stop = True
        self.listener.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.connections += 1
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, towards_server: bool) -> None:
        sent = 0
        try:
            while data := source.recv(65536):
                sent += len(data)
                if towards_server and sent > self.drop_after:
                    with self._lock:
                        drop, self._armed = self._armed, False
                    if drop:
                        self.dropped += 1
                        for sock in (source, sink):
                            sock.shutdown(socket.SHUT_RDWR)
                            sock.close()
                        return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def token_file(tmp_path: Path, upload_api: UploadApi) -> Path:
    path = tmp_path / "token"
    path.write_text(upload_api.token + "\n")
    return path


def _upload(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", _MODULE, "upload", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "COLUMNS": "120", **(env or {})})


@pytest.fixture
def proxy(upload_api: UploadApi) -> Iterator[DroppingProxy]:
    port = int(upload_api.url.rsplit(":", 1)[1])
    dropping = DroppingProxy(port, drop_after=2 << 20)
    yield dropping
    dropping.close()


def test_upload_resumes_after_a_drop_and_prints_the_reference(
        upload_api: UploadApi, big_mar: Path, token_file: Path, proxy: DroppingProxy) -> None:
    result = _upload(str(big_mar), "--api", proxy.url, "--token-file", str(token_file),
                     env={"TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "0"})
    assert result.returncode == 0, result.stderr
    digest = hashlib.sha256(big_mar.read_bytes()).hexdigest()
    assert proxy.dropped == 1 and proxy.connections >= 2
    assert upload_api.store.path(digest).read_bytes() == big_mar.read_bytes()
    lines = result.stdout.splitlines()
    assert lines[0] == f"sha256:{digest}"
    assert f'        sha256: "sha256:{digest}"' in lines and "    origin:" in lines and "      file:" in lines
    # The progress bar: bytes done/total, a rate, an ETA column; and the resume notice.
    assert "resuming" in result.stderr and "big.mar" in result.stderr
    assert "6.0/6.0 MiB" in result.stderr and "MB/s" in result.stderr and "0:00:00" in result.stderr


def _upload_here(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The same command in this process (no interpreter start: the failure cases stay fast)."""
    try:
        code = main(["upload", *args])
    except SystemExit as exc:  # argparse
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_invalid_archive_is_refused_locally(upload_api: UploadApi, tmp_path: Path, token_file: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    bad = crafted_zip(tmp_path / "bad.mar", {"model.pt": b"w"})  # the manifest names handler.py: missing
    code, _, err = _upload_here(capsys, str(bad), "--api", upload_api.url, "--token-file", str(token_file))
    assert code == 1
    assert "bad.mar: handler 'handler.py' (model.handler) is not in the archive" in err
    assert list(upload_api.uploads.dir.iterdir()) == []  # nothing was sent


def test_usage_and_runtime_failures(upload_api: UploadApi, good_mar: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert _upload_here(capsys)[0] == 2  # FILE missing: a usage error
    assert _upload_here(capsys, str(good_mar), "--api", "ftp://x")[0] == 2
    code, _, err = _upload_here(capsys, str(tmp_path / "nope.mar"), "--api", upload_api.url)
    assert code == 1 and "no such file" in err
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token")
    code, out, err = _upload_here(capsys, str(good_mar), "--api", upload_api.url, "--token-file", str(wrong),
                                  "--no-progress")
    assert code == 3 and "refused the token" in err and "not-the-token" not in out + err
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, _, err = _upload_here(capsys, str(good_mar), "--api", f"http://127.0.0.1:{port}", "--retries", "2",
                                "--no-progress")
    assert code == 3 and "cannot start the upload" in err


def test_json_output_in_process(upload_api: UploadApi, good_mar: Path, token_file: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _upload_here(capsys, str(good_mar), "--api", upload_api.url, "--token-file", str(token_file),
                                "--json", "--no-progress")
    assert code == 0 and json.loads(out)["model_name"] == "tiny"
