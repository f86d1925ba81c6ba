"""The front door of every tally connection: an asyncio protocol of tally's own that reads the
bytes first, holds each request head until it is complete and within tally's limits, and only
then hands it to aiohttp's protocol. aiohttp is driven through public interfaces alone: the
protocol ``web.Server`` makes (asyncio's Protocol methods), and the access-log hook it calls
once a response is written (``AbstractAccessLogger``).

What it adds to aiohttp:

- **Head timeout.** aiohttp times out idle keep-alive connections, but nothing bounds how
  long a request's head (request line and headers) may take to arrive: a client trickling
  one header byte at a time would hold its connection indefinitely. A timer starts at a
  head's first byte; if the head is not complete ``TALLY_HTTP_HEADER_TIMEOUT`` seconds later
  the connection is answered 408 and closed.
- **Problem documents for protocol refusals.** A request line over the limit (414), a header
  field over the limit or too many of them (431), or a head that breaks HTTP/1.1's grammar
  (400) is answered in ``application/problem+json`` like every other error and logged as one
  warning line — never passed to aiohttp, which would answer in text/plain and log an error
  with a traceback, so that anyone could fill the logs.
- **Lingering close.** After a refusal the connection is half-closed and what the client still
  sends is discarded for up to LINGER seconds, so that the client reads the refusal.

What it checks of each head, and how it finds where a body ends: service/web/http1.py.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from http import HTTPStatus
from typing import cast

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from service.infra import metrics
from service.web.http1 import (
    LONGEST_METHOD,
    Chunks,
    Head,
    Limits,
    Refusal,
    Refused,
    check_field_size,
    check_partial_request_line,
    check_request_line,
    refuse,
)
from service.web.problems import PROBLEM_CONTENT_TYPE, problem_body

log = logging.getLogger("tally.http")

# Seconds a connection whose request was refused stays half-open, discarding input, so that
# the client reads the refusal before the connection goes (nginx's lingering close).
LINGER = 2.0


class FrontDoor(asyncio.Protocol):
    """One connection, in front of aiohttp's protocol for it (see the module's docstring)."""

    def __init__(self, inner: asyncio.Protocol, limits: Limits) -> None:
        self.inner = inner
        self.limits = limits
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.head = bytearray()  # the unfinished head, held back from aiohttp
        self.line_start = 0  # where its unfinished line starts
        self.fields: Head | None = None  # its fields, once its request line is complete
        self.body = 0  # bytes of a Content-Length body still to pass
        self.chunks: Chunks | None = None  # a chunked body being passed
        self.chunked_at: int | None = None  # where its head starts in this read's output
        self.heads = 0  # heads handed to aiohttp
        self.answered = 0  # responses aiohttp has written
        self.timer: asyncio.TimerHandle | None = None  # the head timeout
        self.linger: asyncio.TimerHandle | None = None
        self.refusal: Refusal | None = None  # answered once aiohttp has answered what it holds
        self.refused = False  # the refusal is written: discard input, linger, close
        self.peer: str | None = None

    # ---- asyncio's Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is one without subclassing asyncio's).
        self.transport = cast(asyncio.Transport, transport)
        peername = self.transport.get_extra_info("peername")
        self.peer = str(peername[0]) if isinstance(peername, tuple) and peername else None
        self.inner.connection_made(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        if self.linger is not None:
            self.linger.cancel()
        self.transport = None
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def data_received(self, data: bytes) -> None:
        if self.refusal is not None:
            return  # refused: what follows is discarded, never parsed
        out = bytearray()
        self.chunked_at = None
        try:
            self._follow(data, out)
        except Refused as exc:
            # A body refused mid-way leaves its request unfinished in aiohttp's hands, unless
            # its head came in this same read: then aiohttp never sees the request at all.
            unfinished = self.chunks is not None
            if unfinished and self.chunked_at is not None:
                del out[self.chunked_at :]
                self.heads -= 1
                unfinished = False
            self.chunks = None
            self._drop_head()
            if out:
                self.inner.data_received(bytes(out))
            self.refuse(exc.refusal, unfinished=unfinished)
            return
        if out:
            self.inner.data_received(bytes(out))

    # ---- following requests --------------------------------------------------------------

    def _follow(self, data: bytes, out: bytearray) -> None:
        """Append to ``out`` the bytes of ``data`` that may go to aiohttp: complete, accepted
        heads and their bodies (an unfinished head is held back). Raises Refused at the first
        thing it refuses (what ``out`` holds by then is still passed on)."""
        i = 0
        while i < len(data):
            if self.body:
                step = min(self.body, len(data) - i)
                out += data[i : i + step]
                self.body -= step
                i += step
            elif self.chunks is not None:
                end = self.chunks.feed(data, i)
                if end < 0:
                    out += data[i:]
                    return
                out += data[i:end]
                self.chunks = None
                i = end
            else:
                i = self._take_head(data, i, out)

    def _take_head(self, data: bytes, i: int, out: bytearray) -> int:
        """Read head bytes from ``data[i:]``, checking each line as it completes (and an
        unfinished one as far as it goes); a complete head is appended to ``out``. The offset
        reached."""
        if not self.head:
            while data.startswith(b"\r\n", i):
                i += 2  # empty lines before a request line are ignored (RFC 9112 section 2.2)
            end = data.find(b"\r\n\r\n", i)
            if end >= 0:
                # The usual case, a whole head in one read: checked at once, and no timer.
                self._whole_head(data[i:end])
                if self.chunks is not None:
                    self.chunked_at = len(out)
                out += data[i : end + 4]
                return end + 4
            if i == len(data):
                return i
            self._start_timer()
        while i < len(data):
            end = data.find(b"\n", i)
            if end < 0:
                self.head += data[i:]
                self._check_unfinished_line()
                return len(data)
            self.head += data[i : end + 1]
            i = end + 1
            line = bytes(self.head[self.line_start :])
            self.line_start = len(self.head)
            if not line.endswith(b"\r\n"):
                raise refuse(400, "malformed HTTP request: lines end with CRLF", "line_ending")
            if self.fields is None and line == b"\r\n":
                # Empty lines before a request line are ignored (RFC 9112 section 2.2): some
                # clients send a CRLF after a body. Not a head: no timer.
                self._drop_head()
                return i
            if self._line_done(line[:-2]):
                if self.chunks is not None:
                    self.chunked_at = len(out)
                out += self.head
                self._drop_head()
                return i
        return i

    def _whole_head(self, head: bytes) -> None:
        """Check a head that arrived whole (without the empty line that ends it)."""
        request_line, crlf, fields = head.partition(b"\r\n")
        self._line_done(request_line)
        assert self.fields is not None
        if not self.fields.add_all(crlf + fields):
            for line in head.split(b"\r\n")[1:]:
                self._line_done(line)
        self._line_done(b"")
        self.fields = None

    def _drop_head(self) -> None:
        """Forget the head (passed on, or refused) and its timer."""
        self.head.clear()
        self.line_start = 0
        self.fields = None
        self._stop_timer()

    def _check_unfinished_line(self) -> None:
        # Not counting a CR at the end: the LF that ends the line may be in the next read.
        end = len(self.head) - self.head.endswith(b"\r")
        length = end - self.line_start
        if self.fields is None:
            start = bytes(self.head[self.line_start : min(end, self.line_start + LONGEST_METHOD + 1)])
            check_partial_request_line(start, length, self.limits, first=self.heads == 0)
        elif length > self.limits.field:  # only then can it be too large
            check_field_size(self.head[self.line_start :], self.limits)

    def _line_done(self, line: bytes) -> bool:
        """Check one complete line of the head; True when it ends the head."""
        if self.fields is None:
            check_request_line(line, self.limits, first=self.heads == 0)
            self.fields = Head(self.limits, line.rpartition(b" ")[2])
            return False
        if line:
            self.fields.add(line)
            return False
        framing = self.fields.framing()
        self.heads += 1
        if framing.chunked:
            self.chunks = Chunks(self.limits)
        self.body = framing.length
        return True

    # ---- the head timer, refusals, aiohttp's answers ---------------------------------------

    def _start_timer(self) -> None:
        if self.timer is None:
            self.timer = self.loop.call_later(self.limits.head_timeout, self._head_timed_out)

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _head_timed_out(self) -> None:
        self.timer = None
        if self.transport is None or self.refusal is not None:
            return
        metrics.HTTP_REFUSED.labels("header_timeout").inc()
        log.warning(
            "closed a connection whose request head was incomplete after %gs",
            self.limits.head_timeout,
            extra={"remote": self.peer},
        )
        self._drop_head()
        self._answer(
            Refusal(
                408,
                f"the request line and headers did not arrive within {self.limits.head_timeout:g} s",
                "header_timeout",
            )
        )

    def refuse(self, refusal: Refusal, *, unfinished: bool = False) -> None:
        metrics.HTTP_REFUSED.labels("bad_request").inc()
        # One line, no traceback, no request bytes (a header value may be a key).
        log.log(
            logging.DEBUG if refusal.quiet else logging.WARNING,
            "refused a malformed request",
            extra={"status": refusal.status, "reason": refusal.reason, "remote": self.peer},
        )
        self._answer(refusal, unfinished=unfinished)

    def _answer(self, refusal: Refusal, *, unfinished: bool = False) -> None:
        """Answer ``refusal`` as soon as aiohttp has answered every request it was given
        (pipelined requests are answered in order), then linger and close."""
        self.refusal = refusal
        if self.answered == self.heads:
            self._write_refusal()
        elif unfinished and self.transport is not None:
            # aiohttp holds a request whose body was refused, so will never be complete: its
            # handler would wait for the rest. The refusal answers it instead, and closing the
            # connection ends the handler's wait. (Unless aiohttp is writing a response, which
            # the refusal must not interleave: then the connection just closes.)
            if self.transport.get_write_buffer_size() == 0:
                self.refused = True
                self.transport.write(self._refusal_bytes())
            self.transport.close()

    def response_written(self) -> None:
        """aiohttp wrote a response on this connection (its access-log hook)."""
        self.answered += 1
        if self.refusal is not None and not self.refused and self.answered == self.heads:
            self._write_refusal()

    def _refusal_bytes(self) -> bytes:
        assert self.refusal is not None
        status = self.refusal.status
        request_id = uuid.uuid4().hex
        title = HTTPStatus(status).phrase
        body = problem_body(status, title, self.refusal.detail, instance=None, request_id=request_id)
        head = (
            f"HTTP/1.1 {status} {title}\r\nContent-Type: {PROBLEM_CONTENT_TYPE}\r\n"
            f"Content-Length: {len(body)}\r\nX-Request-ID: {request_id}\r\nConnection: close\r\n\r\n"
        )
        return head.encode() + body

    def _write_refusal(self) -> None:
        self.refused = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(self._refusal_bytes())
        # Half-close and discard what the client still sends, until it closes or LINGER
        # seconds pass. A refused client is usually still sending (60 MB of headers, say);
        # closing at once with its bytes unread makes the kernel send a reset, which can
        # destroy the refusal before the client has read it.
        if transport.can_write_eof():
            transport.write_eof()
        self.linger = self.loop.call_later(LINGER, transport.close)


class ResponseWritten(AbstractAccessLogger):
    """aiohttp's access-log hook (``access_log_class``), called once each response is written:
    tells the connection's front door, which writes a refusal only between responses. It
    logs nothing (tally logs requests in its middlewares)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        transport = request.transport
        door = transport.get_protocol() if transport is not None else None
        if isinstance(door, FrontDoor):
            door.response_written()
