"""Logging (reconciler/logs.py): JSON lines with the pass's context, text by default, secrets redacted."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelfleet.reconciler import logs
from modelfleet.reconciler.config import ConfigError, parse_config
from modelfleet.reconciler.rollout.apply import _log_fields
from modelfleet.state.plan import Action


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    lines = stream.getvalue().splitlines()
    return [json.loads(line) for line in lines]


def test_json_lines_have_time_level_logger_message(restore_root: None) -> None:
    stream = io.StringIO()
    logs.setup_logging("json", "info", stream=stream)
    logging.getLogger("modelfleet.daemon").info("pass %d finished", 7)
    logging.getLogger("modelfleet.daemon").debug("not at info")
    [line] = json_lines(stream)
    assert line["level"] == "info" and line["logger"] == "modelfleet.daemon"
    assert line["message"] == "pass 7 finished"
    assert line["time"].endswith("Z") and line["time"][:2] == "20"
    assert not set(logs.CONTEXT_FIELDS) & set(line)  # no context: no such keys


def test_the_pass_context_and_extra_fields_are_on_the_line(restore_root: None) -> None:
    stream = io.StringIO()
    logs.setup_logging("json", "debug", stream=stream)
    log = logging.getLogger("modelfleet.apply")

    @logs.scoped
    def a_pass() -> None:
        logs.bind(pass_id=12)
        log.info("synced")
        logs.bind(revision="3f786850e387")
        action = Action("create", "echo", "production", "par-1", 0, "new")
        log.info("created", extra=_log_fields(12, action))

    a_pass()
    log.warning("between passes")
    synced, created, between = json_lines(stream)
    assert synced["pass_id"] == 12 and "revision" not in synced
    assert created == {**created, "pass_id": 12, "revision": "3f786850e387", "model": "echo",
                       "environment": "production", "host": "par-1"}
    assert not set(logs.CONTEXT_FIELDS) & set(between)  # the pass's context ended with it
    assert between["level"] == "warning"


def test_threads_do_not_inherit_a_pass_context(restore_root: None) -> None:
    stream = io.StringIO()
    logs.setup_logging("json", "info", stream=stream)
    with logs.log_context(pass_id=3):
        thread = threading.Thread(target=lambda: logging.getLogger("t").info("other thread"))
        thread.start()
        thread.join()
    [line] = json_lines(stream)
    assert "pass_id" not in line


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_userinfo_in_urls_is_redacted(restore_root: None, fmt: str) -> None:
    stream = io.StringIO()
    logs.setup_logging(fmt, "info", stream=stream)
    log = logging.getLogger("modelfleet.source")
    log.warning("fetching %s failed", "https://oauth2:s3cr3t-t0ken@git.example.com/acme/models.git")
    try:
        raise RuntimeError("cannot reach ssh://deploy:hunter2@host.example/repo")
    except RuntimeError:
        log.exception("pass crashed")
    text = stream.getvalue()
    assert "s3cr3t-t0ken" not in text and "hunter2" not in text and "oauth2" not in text
    assert "git.example.com/acme/models.git" in text and "***@" in text
    if fmt == "json":
        first, second = json_lines(stream)
        assert first["message"] == "fetching https://***@git.example.com/acme/models.git failed"
        assert "RuntimeError" in second["exception"] and "***@host.example" in second["exception"]


def test_text_is_the_default_and_levels_apply(restore_root: None) -> None:
    stream = io.StringIO()
    logs.setup_logging("text", "warning", stream=stream)
    logging.getLogger("modelfleet.daemon").info("quiet")
    logging.getLogger("modelfleet.daemon").warning("loud")
    text = stream.getvalue()
    assert "loud" in text and "quiet" not in text and not text.lstrip().startswith("{")
    logs.setup_logging("text", "warning", verbose=True, stream=stream)
    assert logging.getLogger().level == logging.DEBUG
    assert len(logging.getLogger().handlers) == 1  # replaced, not added


def test_logging_settings_in_the_config() -> None:
    assert parse_config("{}").logging.format == "text"
    assert parse_config("{}").logging.level == "info"
    config = parse_config("logging: {format: json, level: debug}\n")
    assert (config.logging.format, config.logging.level) == ("json", "debug")
    with pytest.raises(ConfigError) as info:
        parse_config("logging:\n  format: xml\n")
    [error] = info.value.errors
    assert error.line == 2 and "format" in str(error) and "json" in str(error)


def test_a_daemon_pass_logs_with_its_pass_id_and_revision(restore_root: None, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.reconciler.daemon.test_reconcile import MANIFESTS, git, make_daemon

    work = tmp_path / "work"
    work.mkdir()
    git(work, "init", "-q", "-b", "main")
    for name, docs in MANIFESTS.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(yaml.safe_dump_all(docs))
    git(work, "add", "-A")
    git(work, "commit", "-qm", "init")
    head = git(work, "rev-parse", "HEAD")
    stream = io.StringIO()
    logs.setup_logging("json", "info", stream=stream)
    daemon, _ = make_daemon(tmp_path, work)

    def broken_load(revision: str) -> None:
        raise RuntimeError("boom while loading https://user:pa55@forge.example/x.git")

    monkeypatch.setattr(daemon, "_load", broken_load)
    try:
        daemon.reconcile("test")
        daemon.reconcile("test")
    finally:
        daemon.close()
    crashed = [line for line in json_lines(stream) if line["message"].endswith("crashed")]
    assert [(line["pass_id"], line["revision"]) for line in crashed] == [(1, head), (2, head)]
    assert all("pa55" not in line["exception"] and "boom" in line["exception"] for line in crashed)
    assert logs.current_context() == {}  # nothing of a pass outlives it


def test_execution_lines_get_a_plain_handler_of_their_own() -> None:
    from modelfleet.reconciler.logs import EXECUTIONS_LOGGER

    for format in ("text", "json"):
        stream = io.StringIO()
        logs.setup_logging(format, stream=stream)
        logger = logging.getLogger(EXECUTIONS_LOGGER)
        assert logger.propagate is False  # not through the rich console: a millisecond a line
        logger.info("m/production 200 1.0ms", extra={"mf_fields": {"time": 1_700_000_000.5, "request_id": "r1"}})
        line = stream.getvalue().strip()
        if format == "text":
            assert line == "2023-11-14T22:13:20.500Z execution m/production 200 1.0ms"
        else:
            data = json.loads(line)
            assert data["time"] == "2023-11-14T22:13:20.500Z" and data["request_id"] == "r1"
    logs.setup_logging("text")


def test_the_gateway_writes_a_batch_of_execution_lines_at_once() -> None:
    from modelfleet.reconciler.gateway.executions import ExecutionRecorder
    from modelfleet.reconciler.gateway.metrics import GatewayMetrics

    for format in ("text", "json"):
        stream = io.StringIO()
        logs.setup_logging(format, stream=stream)
        recorder = ExecutionRecorder(GatewayMetrics(), gateway_id="g")
        for i in range(3):
            recorder.record(f"id{i}", "m", "production", 200, 0.002, 0, 5, None, False, False, i == 2)
        recorder.flush()
        lines = stream.getvalue().splitlines()
        assert len(lines) == 3
        if format == "text":
            assert lines[2].endswith("execution m/production 200 2.0ms 5B - - - id=id2 [retry]"), lines[2]
        else:
            data = json.loads(lines[2])
            assert (data["logger"], data["request_id"], data["retry"], data["gateway"]) == \
                ("modelfleet.executions", "id2", True, "g")
    logs.setup_logging("text")


def test_execution_times_are_datetimes_isoformat_to_the_millisecond() -> None:
    from datetime import UTC, datetime

    from modelfleet.reconciler.logs import _utc

    def expected(t: float) -> str:
        return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

    # Lines of one second share its date and time; the rounding to microseconds carries over seconds
    # (and over midnight, new year) as datetime's does.
    moments = [1764786000 + n / 997 for n in range(3000)]
    moments += [s + f for s in (1767225599.0, 1764786000.0, 0.0, 951782399.0)
                for f in (0.0, 0.0005, 0.0004999, 0.9994999, 0.9995, 0.9999994999, 0.9999995, 0.9999996)]
    for t in moments:
        assert _utc(t) == expected(t), t
