"""HTTP/1.1 codecs of backend connections: write requests, parse responses (httptools/llhttp, or h11).

A codec serialises one request at a time and reports the response it parses to its connection
through :class:`CodecEvents`. httptools is used when installed (it comes with uvicorn[standard]);
h11, which uvicorn always brings, is the pure-Python fallback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Protocol

import h11

try:
    import httptools
except ImportError:  # pragma: no cover - depends on the installation
    httptools = None  # type: ignore[assignment]

HTTPTOOLS_INSTALLED = httptools is not None
NO_BODY_METHODS = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE", b"CONNECT"})

# Raised by a codec's head()/data()/end() for a request it cannot serialise.
LocalProtocolError = h11.LocalProtocolError


class CodecEvents(Protocol):
    """What a codec reports about the response it parses (the connection implements it)."""

    def on_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None: ...

    def on_body(self, chunk: bytes) -> None: ...

    def on_end(self) -> None: ...

    def on_protocol_error(self, message: str) -> None: ...


class Codec(Protocol):
    """Request serialisation and response parsing for one connection."""

    def head(self, method: bytes, target: bytes, host: bytes, headers: list[tuple[bytes, bytes]],
             length: int) -> bytes:
        """The request head; ``length`` -1 means a chunked body."""
        ...

    def data(self, chunk: bytes) -> bytes: ...

    def end(self) -> bytes: ...

    def feed(self, data: bytes) -> None: ...

    def feed_eof(self) -> None: ...

    def reusable(self) -> bool: ...


CodecFactory = Callable[[CodecEvents], Codec]


def framing(method: bytes, length: int) -> tuple[bytes, bytes] | None:
    """The framing header of a request body of ``length`` bytes (-1: chunked), None for no body."""
    if length < 0:
        return (b"transfer-encoding", b"chunked")
    if length or method not in NO_BODY_METHODS:
        return (b"content-length", b"%d" % length)
    return None


def codec_factory(parser: str) -> tuple[str, CodecFactory]:
    """The parser name in effect and its codec class: ``auto`` (httptools when installed), ``httptools``, ``h11``."""
    if parser == "auto":
        parser = "httptools" if HTTPTOOLS_INSTALLED else "h11"
    if parser == "httptools":
        if not HTTPTOOLS_INSTALLED:
            raise ValueError("httptools is not installed")
        return parser, HttptoolsCodec
    if parser == "h11":
        return parser, H11Codec
    raise ValueError(f"unknown response parser {parser!r}: use auto, httptools or h11")


class HttptoolsCodec:
    """Requests written by hand, responses parsed by llhttp (through httptools)."""

    def __init__(self, conn: CodecEvents) -> None:
        assert httptools is not None
        self._conn = conn
        self._parser = httptools.HttpResponseParser(self)
        # Accept what nginx accepts from an upstream: lines ended by a bare LF (busybox httpd CGIs).
        # Everything else stays strict (llhttp's default): a 502 that names what was wrong.
        self._parser.set_dangerous_leniencies(lenient_optional_cr_before_lf=True)
        self._headers: list[tuple[bytes, bytes]] = []
        self._chunked = False
        self._head_request = False
        self._informational = False
        self._in_body = False
        self._keep_alive = False

    def head(self, method: bytes, target: bytes, host: bytes, headers: list[tuple[bytes, bytes]],
             length: int) -> bytes:
        self._head_request = method == b"HEAD"
        self._chunked = length < 0
        self._keep_alive = False
        parts = [method, b" ", target, b" HTTP/1.1\r\nhost: ", host, b"\r\n"]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        body_framing = framing(method, length)
        if body_framing is not None:
            parts += (body_framing[0], b": ", body_framing[1], b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def data(self, chunk: bytes) -> bytes:
        return b"%x\r\n%b\r\n" % (len(chunk), chunk) if self._chunked else chunk

    def end(self) -> bytes:
        return b"0\r\n\r\n" if self._chunked else b""

    def feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._conn.on_protocol_error("the backend switched protocols")
        except httptools.HttpParserError as exc:
            self._conn.on_protocol_error(f"invalid response: {exc}")

    def feed_eof(self) -> None:
        # A response framed by neither Content-Length nor chunked encoding ends with the connection.
        if self._in_body and not any(name.lower() in (b"content-length", b"transfer-encoding")
                                     for name, _ in self._headers):
            self._in_body = False
            self._conn.on_end()

    def reusable(self) -> bool:
        return self._keep_alive

    # llhttp callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # 100 Continue, 103 Early Hints: the response follows
            self._informational = True
            self._headers = []
            return
        self._keep_alive = self._parser.should_keep_alive() and not self._head_request
        self._in_body = True
        self._conn.on_head(status, self._headers)
        if self._head_request:  # llhttp cannot be told that no body follows: end here, then close
            self._in_body = False
            self._conn.on_end()

    def on_body(self, body: bytes) -> None:
        if self._in_body:
            self._conn.on_body(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        if self._in_body:
            self._in_body = False
            self._headers = []
            self._conn.on_end()


class H11Codec:
    """The pure-Python fallback: h11 both ways."""

    def __init__(self, conn: CodecEvents) -> None:
        self._conn = conn
        self._h11 = h11.Connection(h11.CLIENT)

    def head(self, method: bytes, target: bytes, host: bytes, headers: list[tuple[bytes, bytes]],
             length: int) -> bytes:
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
        all_headers = [(b"host", host), *headers]
        body_framing = framing(method, length)
        if body_framing is not None:
            all_headers.append(body_framing)
        return self._h11.send(h11.Request(method=method, target=target, headers=all_headers)) or b""

    def data(self, chunk: bytes) -> bytes:
        return self._h11.send(h11.Data(data=chunk)) or b""

    def end(self) -> bytes:
        return self._h11.send(h11.EndOfMessage()) or b""

    def feed(self, data: bytes) -> None:
        self._h11.receive_data(data)
        self._events()

    def feed_eof(self) -> None:
        # Ends a body delimited by the connection's end; any other end is reported by connection_lost.
        with contextlib.suppress(h11.RemoteProtocolError):
            self._h11.receive_data(b"")
            self._events(report_errors=False)

    def reusable(self) -> bool:
        return self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE

    def _events(self, report_errors: bool = True) -> None:
        try:
            while True:
                event = self._h11.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                    return
                if isinstance(event, h11.Response):
                    self._conn.on_head(event.status_code, list(event.headers.raw_items()))
                elif isinstance(event, h11.Data):
                    self._conn.on_body(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    self._conn.on_end()
                    return
        except h11.RemoteProtocolError as exc:
            if not report_errors:
                raise
            self._conn.on_protocol_error(f"invalid response: {exc}")
