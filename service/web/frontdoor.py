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

The grammar checked is RFC 9112's, as strict as aiohttp's own parser on every point where the
two could disagree about where a request ends (framing headers, line endings, methods,
protocol upgrades): the door and aiohttp always agree on which bytes are the next head.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from typing import cast

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from service.infra import metrics
from service.web.problems import PROBLEM_CONTENT_TYPE, problem_body

log = logging.getLogger("tally.http")

# Seconds a connection whose request was refused stays half-open, discarding input, so that
# the client reads the refusal before the connection goes (nginx's lingering close).
LINGER = 2.0

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_IS_TOKEN = re.compile(_TOKEN)
# The request target: visible ASCII (aiohttp's parser refuses controls, DEL and non-ASCII).
_IS_TARGET = re.compile(rb"[\x21-\x7e]+")
# A field: a token, a colon, and a value of visible characters, obs-text, spaces and tabs
# (never another control character).
_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([\t\x20-\x7e\x80-\xff]*)")
_FIELD_NAME = re.compile(_TOKEN + rb":")
# Every field of a head at once, each line preceded by its CRLF: the usual head is checked
# in one pass, and only the fields that frame the request are looked at one by one.
_FIELDS = re.compile(rb"(?:\r\n" + _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*)*")
# The methods aiohttp's parser (llhttp) knows, which the router answers (405 for those no
# route has); it refuses any other. Not CONNECT: tally serves no tunnel, and the parser reads
# what follows a CONNECT head as the tunnel's bytes. tests/test_frontdoor.py holds this list
# to the parser's.
METHODS = frozenset(
    {
        *(b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS", b"TRACE", b"QUERY", b"SEARCH"),
        *(b"PURGE", b"LINK", b"UNLINK", b"SOURCE", b"COPY", b"LOCK", b"UNLOCK", b"MKCOL", b"MOVE", b"PROPFIND"),
        *(b"PROPPATCH", b"BIND", b"REBIND", b"UNBIND", b"ACL", b"REPORT", b"MKACTIVITY", b"CHECKOUT", b"MERGE"),
        *(b"M-SEARCH", b"NOTIFY", b"SUBSCRIBE", b"UNSUBSCRIBE", b"MKCALENDAR"),
    }
)
LONGEST_METHOD = max(len(m) for m in METHODS)
VERSIONS = frozenset({b"HTTP/1.1", b"HTTP/1.0"})
# Fields RFC 9110 defines with a single value: a repeat is refused (as aiohttp's parser does).
SINGLE_VALUED = frozenset(
    {
        b"content-length",
        b"content-location",
        b"content-range",
        b"content-type",
        b"etag",
        b"host",
        b"max-forwards",
        b"server",
        b"transfer-encoding",
        b"user-agent",
    }
)
# The fields whose values the door reads (the rest it checks for form and size only).
FRAMING_FIELDS = SINGLE_VALUED | {b"upgrade"}
_FRAMING_FIELD = re.compile(
    rb"\r\n(" + b"|".join(re.escape(f) for f in sorted(FRAMING_FIELDS)) + rb"):[ \t]*([^\r]*)", re.IGNORECASE
)
# A request asking to switch to one of these protocols is refused: tally serves none, and
# aiohttp's parser would read what follows the head as the new protocol, not as a body.
UPGRADES = frozenset({b"websocket", b"tcp"})
OWS = b" \t"
# A Content-Length of more digits than this is refused before it can overflow anything.
MAX_LENGTH_DIGITS = 18
# The longest chunk-size line (size and extensions) a chunked body may carry.
MAX_CHUNK_LINE = 4096


@dataclass(frozen=True)
class Limits:
    """The head limits (the same numbers aiohttp's parser is given: it never sees more)."""

    request_line: int  # bytes of request target
    field: int  # bytes of a field's name and value (leading whitespace not counted)
    fields: int  # header fields in a head
    head_timeout: float  # seconds from a head's first byte to its end


@dataclass(frozen=True)
class Refusal:
    status: int
    detail: str
    reason: str  # a short code for the log line
    quiet: bool = False  # logged at debug: non-HTTP traffic on the port (TLS, scanners) is routine


class Refused(Exception):
    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.detail)
        self.refusal = refusal


def _refuse(status: int, detail: str, reason: str, *, quiet: bool = False) -> Refused:
    return Refused(Refusal(status, detail, reason, quiet))


@dataclass
class Framing:
    """How the body of a head the door accepted is delimited."""

    length: int = 0  # Content-Length (0: no body)
    chunked: bool = False


def check_request_line(line: bytes, limits: Limits, *, first: bool) -> None:
    """Refuse a request line that is too long or not ``method SP target SP HTTP/1.x``."""
    parts = line.split(b" ")
    if len(parts) == 3 and len(parts[1]) > limits.request_line:
        raise _refuse(414, f"the request line is longer than {limits.request_line} bytes", "request_line_too_long")
    check_method(parts[0], first=first)
    if len(parts) != 3 or not _IS_TARGET.fullmatch(parts[1]):
        raise _refuse(400, "malformed HTTP request: a request line is METHOD SP target SP HTTP/1.1", "request_line")
    if parts[2] not in VERSIONS:
        raise _refuse(400, "malformed HTTP request: the protocol is HTTP/1.1 (or HTTP/1.0)", "version")


def check_method(method: bytes, *, first: bool) -> None:
    if method in METHODS:
        return
    if method == b"CONNECT":
        raise _refuse(400, "malformed HTTP request: tally serves no CONNECT tunnel", "connect")
    if _IS_TOKEN.fullmatch(method):
        raise _refuse(400, "malformed HTTP request: unknown method", "method")
    # Not HTTP at all (TLS to the plain port, say): routine on a public port, so a debug line
    # when it opens the connection.
    raise _refuse(400, "malformed HTTP request: not an HTTP request line", "not_http", quiet=first)


def check_partial_request_line(line: bytes, length: int, limits: Limits, *, first: bool) -> None:
    """Refuse an unfinished request line (``line``: its first bytes, ``length`` long so far) as
    early as its bytes allow: a method that cannot be one, or a line already past its limit."""
    method, space, _ = line[: LONGEST_METHOD + 1].partition(b" ")
    if space or len(method) > LONGEST_METHOD or (method and not _IS_TOKEN.fullmatch(method)):
        check_method(method, first=first)
    # The target's limit, plus the method, two spaces and the version.
    if length > limits.request_line + LONGEST_METHOD + 2 + len(b"HTTP/1.1"):
        raise _refuse(414, f"the request line is longer than {limits.request_line} bytes", "request_line_too_long")


def field_size(line: bytes | bytearray) -> int:
    """A field's size as the limit counts it: name and value, leading whitespace excluded."""
    name, _, value = bytes(line).partition(b":")
    return len(name) + len(value.lstrip(OWS))


def check_field_size(line: bytes | bytearray, limits: Limits) -> None:
    # Whitespace is not counted, but a line of megabytes of it is not a field either.
    if field_size(line) > limits.field or len(line) > 2 * limits.field:
        raise _refuse(431, f"a header field is longer than {limits.field} bytes", "field_too_large")


class Head:
    """The fields of one head, checked as each line completes."""

    def __init__(self, limits: Limits, version: bytes) -> None:
        self.limits = limits
        self.version = version
        self.count = 0
        self.seen: set[bytes] = set()
        self.length: bytes | None = None
        self.encoding: bytes | None = None

    def add(self, line: bytes) -> None:
        if len(line) > self.limits.field:  # only then can it be too large
            check_field_size(line, self.limits)
        self.count += 1
        if self.count > self.limits.fields:
            raise _refuse(431, f"more than {self.limits.fields} header fields", "too_many_fields")
        field = _FIELD.fullmatch(line)
        if field is None:
            if _FIELD_NAME.match(line):
                raise _refuse(400, "malformed HTTP request: a control character in a header value", "field_value")
            raise _refuse(400, "malformed HTTP request: a header field is NAME: value", "field")
        self.note(field[1], field[2])

    def add_all(self, block: bytes) -> bool:
        """Check every field of ``block`` (each line preceded by CRLF) at once; False if
        they need checking one by one (one may be refused: the lines say which and why)."""
        count = block.count(b"\r\n")
        if len(block) > self.limits.field or count > self.limits.fields or not _FIELDS.fullmatch(block):
            return False
        self.count = count
        for field in _FRAMING_FIELD.finditer(block):
            self.note(field[1], field[2])
        return True

    def note(self, name: bytes, value: bytes) -> None:
        """Hold on to what a field says about framing (others are checked for form only)."""
        key = name.lower()
        if key not in FRAMING_FIELDS:
            return
        value = value.rstrip(OWS)
        if key in SINGLE_VALUED:
            if key in self.seen:
                raise _refuse(400, f"malformed HTTP request: more than one {name.decode()} field", "repeated_field")
            self.seen.add(key)
        if key == b"content-length":
            self.length = value
        elif key == b"transfer-encoding":
            self.encoding = value
        elif key == b"upgrade" and UPGRADES & {p.strip(OWS).partition(b"/")[0].lower() for p in value.split(b",")}:
            raise _refuse(400, "malformed HTTP request: tally serves no protocol upgrade", "upgrade")

    def framing(self) -> Framing:
        """The body's framing, once the head is complete (RFC 9112 section 6)."""
        if self.version == b"HTTP/1.1" and b"host" not in self.seen:
            raise _refuse(400, "malformed HTTP request: HTTP/1.1 requires a Host field", "host")
        if self.encoding is not None:
            if self.length is not None:
                raise _refuse(400, "malformed HTTP request: both Transfer-Encoding and Content-Length", "framing")
            codings = [c.strip(OWS).lower() for c in self.encoding.split(b",")]
            if codings[-1] != b"chunked" or codings.count(b"chunked") != 1:
                raise _refuse(400, "malformed HTTP request: Transfer-Encoding must end with chunked", "framing")
            return Framing(chunked=True)
        if self.length is not None:
            if not self.length.isdigit() or len(self.length) > MAX_LENGTH_DIGITS:
                raise _refuse(400, "malformed HTTP request: Content-Length is not a number of bytes", "framing")
            return Framing(length=int(self.length))
        return Framing()


class Chunks:
    """Follows a chunked body to its end (RFC 9112 section 7.1); refuses one that breaks its
    framing (aiohttp's parser would answer it in text/plain, and leave a handler waiting for
    the rest of the body)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.line = bytearray()  # an unfinished line: a chunk size, a data CRLF, a trailer
        self.remaining = 0  # bytes of chunk data still to come
        self.data_ends = False  # the next line is the empty one that ends a chunk's data
        self.trailers: int | None = None  # trailer fields seen, once the last chunk came

    def feed(self, data: bytes, start: int) -> int:
        """Consume body bytes from ``data[start:]``; the offset where the body ends, or -1 if
        it goes on past ``data``."""
        i = start
        while i < len(data):
            if self.remaining:
                step = min(self.remaining, len(data) - i)
                self.remaining -= step
                i += step
                self.data_ends = not self.remaining
                continue
            end = data.find(b"\n", i)
            if end < 0:
                self.line += data[i:]
                if len(self.line) > MAX_CHUNK_LINE:
                    raise _malformed_chunks()
                return -1
            self.line += data[i : end + 1]
            i = end + 1
            line, self.line = bytes(self.line), bytearray()
            if len(line) > MAX_CHUNK_LINE or not line.endswith(b"\r\n"):
                raise _malformed_chunks()
            if self._line_ends_body(line[:-2]):
                return i
        return -1

    def _line_ends_body(self, line: bytes) -> bool:
        if self.data_ends:
            if line:
                raise _malformed_chunks()
            self.data_ends = False
        elif self.trailers is not None:
            if not line:
                return True
            self.trailers += 1
            if self.trailers > self.limits.fields or field_size(line) > self.limits.field:
                raise _malformed_chunks()
        else:
            size = line.partition(b";")[0]
            if not size or len(size) > 16 or size.strip(b"0123456789abcdefABCDEF"):
                raise _malformed_chunks()
            self.remaining = int(size, 16)
            if self.remaining:
                self.data_ends = False
            else:
                self.trailers = 0
        return False


def _malformed_chunks() -> Refused:
    return _refuse(400, "malformed HTTP request: a chunked body that breaks its framing", "chunked_body")


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
            self._refuse(exc.refusal, unfinished=unfinished)
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
                raise _refuse(400, "malformed HTTP request: lines end with CRLF", "line_ending")
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
            if line[0] in OWS:
                raise _refuse(400, "malformed HTTP request: folded header lines are obsolete", "obs_fold")
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

    def _refuse(self, refusal: Refusal, *, unfinished: bool = False) -> None:
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
