"""Logging of `modelfleet run` and `modelfleet gateway` (config ``logging: {format, level}``).

``text`` (the default) is rich's console handler; ``json`` writes one JSON object per line:
``time`` (UTC ISO 8601), ``level``, ``logger``, ``message`` and, when known, ``pass_id``,
``revision``, ``model``, ``environment``, ``host`` (and ``exception`` with the traceback). An
execution line (logger ``modelfleet.executions``) carries every field of its record as well.

Context comes from a record's ``extra=`` (apply's per-action lines pass model/environment/host)
or from :func:`log_context`, which the daemon holds around a pass (pass id, then revision). Every
record is redacted on the way out: user information in URLs never reaches a log line, whatever
the message or argument that carried it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import logging
import math
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import IO, Any, ParamSpec, TypeVar

from modelfleet.reconciler.secrets import redact_url

_P = ParamSpec("_P")
_R = TypeVar("_R")

CONTEXT_FIELDS = ("pass_id", "revision", "model", "environment", "host")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
NOISY_LOGGERS = ("apscheduler", "urllib3", "docker", "httpx", "httpcore", "git", "watchfiles")

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("modelfleet_log_context",
                                                                                default=None)


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Fields added to every record logged in this context (this thread, this task) until the block
    ends; :func:`bind` adds more inside it. Threads started inside do not inherit them."""
    token = _context.set({**(_context.get() or {}), **_known(fields)})
    try:
        yield
    finally:
        _context.reset(token)


def scoped(function: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``function`` in a context of its own: what it binds ends with it (the daemon's pass)."""

    @functools.wraps(function)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with log_context():
            return function(*args, **kwargs)

    return run


def bind(**fields: Any) -> None:
    """Add fields to the current context (undone when the enclosing :func:`log_context` ends)."""
    _context.set({**(_context.get() or {}), **_known(fields)})


def current_context() -> dict[str, Any]:
    return dict(_context.get() or {})


def _known(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


class RedactFilter(logging.Filter):
    """Renders the message once, with the user information of every URL replaced by ``***``
    (secrets.redact_url), and redacts the traceback text too."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: log what was given rather than nothing
            message = f"{record.msg} {record.args}"
        record.msg, record.args = redact_url(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_url(record.exc_text)
        return True


EXECUTIONS_LOGGER = "modelfleet.executions"


class ExecutionTextFormatter(logging.Formatter):
    """``<UTC time of arrival> execution <the line>`` (text format, no rich: it is one line per request)."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "mf_fields", None)
        when = fields.get("time") if isinstance(fields, dict) else None
        return f"{_utc(when if isinstance(when, float) else record.created)} execution {record.getMessage()}"


def _utc(timestamp: float) -> str:
    """``datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")`` with ``Z`` for
    ``+00:00``, the date and time of a second made once for all the lines of that second (the
    gateway writes thousands a second): microseconds rounded half to even as datetime does."""
    fraction, whole = math.modf(timestamp)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        whole += 1
        micros -= 1_000_000
    elif micros < 0:
        whole -= 1
        micros += 1_000_000
    second = int(whole)
    cached = _utc_second
    if cached[0] != second:
        cached = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
        globals()["_utc_second"] = cached  # one tuple swapped whole: safe from any thread
    return f"{cached[1]}.{micros // 1000:03d}Z"


_utc_second: tuple[int | None, str] = (None, "")


class ExecutionHandler(logging.StreamHandler):
    """The execution lines' handler: single records like any handler, and :meth:`emit_batch`, which
    formats a batch of records (their fields and text) and writes them at once — the gateway's
    recorder thread calls it every half second, at a few microseconds a line."""

    def __init__(self, stream: IO[str], *, as_json: bool) -> None:
        super().__init__(stream)
        self.as_json = as_json
        self.setFormatter(JsonFormatter() if as_json else ExecutionTextFormatter())

    def emit_batch(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        """``batch``: (message, fields) of each execution, oldest first."""
        if self.as_json:
            lines = [json.dumps({"time": _utc(fields["time"]), "level": "info", "logger": EXECUTIONS_LOGGER,
                                 "message": message, **{k: v for k, v in fields.items() if k != "time"}},
                                ensure_ascii=False, default=str) for message, fields in batch]
        else:
            lines = [f"{_utc(fields['time'])} execution {message}" for message, fields in batch]
        if not lines:
            return
        with self.lock:  # type: ignore[union-attr]
            try:
                self.stream.write("\n".join(lines) + "\n")
                self.flush()
            except Exception:  # a closed or full stream: as logging does, never raise into the caller
                self.handleError(logging.makeLogRecord({"msg": "execution lines", "levelno": logging.INFO}))


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "mf_fields", None)  # a record's own fields (an execution's, gateway/executions.py)
        if not isinstance(fields, dict):
            fields = {}
        when = fields.get("time")  # an execution: when its request arrived
        data: dict[str, Any] = {
            "time": _utc(when if isinstance(when, float) else record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact_url(record.getMessage()),
        }
        context = _context.get() or {}
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is None:
                value = context.get(name)
            if value is not None:
                data[name] = redact_url(value) if isinstance(value, str) else value
        data.update({k: v for k, v in fields.items() if k not in data})
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            data["exception"] = redact_url(record.exc_text)
        return json.dumps(data, ensure_ascii=False, default=str)


def setup_logging(format: str = "text", level: str = "info", verbose: bool = False,
                  stream: IO[str] | None = None) -> logging.Handler:
    """Configure the root logger: ``format`` text or json, ``level`` debug/info/warning (``-v``
    means debug). Replaces the root's handlers; returns the one installed."""
    handler: logging.Handler
    if format == "json":
        handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
        handler.setFormatter(JsonFormatter())
    else:
        from rich.console import Console
        from rich.logging import RichHandler

        console = Console(file=stream if stream is not None else sys.stderr, highlight=False, soft_wrap=True)
        handler = RichHandler(console=console, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s", datefmt="[%X]"))
    handler.addFilter(RedactFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    # One line per inference request: a plain handler of its own (the rich console costs about a
    # millisecond a line), the same JSON in json format. Written from the gateway's recorder thread.
    executions = logging.getLogger(EXECUTIONS_LOGGER)
    for old in list(executions.handlers):
        executions.removeHandler(old)
    executions.addHandler(ExecutionHandler(stream if stream is not None else sys.stderr, as_json=format == "json"))
    executions.propagate = False
    root.setLevel(logging.DEBUG if verbose else LEVELS.get(level, logging.INFO))
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return handler
