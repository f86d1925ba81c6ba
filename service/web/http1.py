"""What tally accepts of an HTTP/1.1 request before aiohttp sees it (the front door's rules,
service/web/frontdoor.py): the grammar of a request head (RFC 9112), its limits, and where the
request's body ends — functions over bytes, which raise :class:`Refused` with the answer.

The grammar is as strict as aiohttp's own parser on every point where the two could disagree
about where a request ends (framing fields, line endings, methods, protocol upgrades): the
door and aiohttp always agree on which bytes are the next head.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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


def refuse(status: int, detail: str, reason: str, *, quiet: bool = False) -> Refused:
    """The exception that refuses a request with ``status`` (``detail`` for the client, ``reason``
    a short code for the log line)."""
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
        raise refuse(414, f"the request line is longer than {limits.request_line} bytes", "request_line_too_long")
    check_method(parts[0], first=first)
    if len(parts) != 3 or not _IS_TARGET.fullmatch(parts[1]):
        raise refuse(400, "malformed HTTP request: a request line is METHOD SP target SP HTTP/1.1", "request_line")
    if parts[2] not in VERSIONS:
        raise refuse(400, "malformed HTTP request: the protocol is HTTP/1.1 (or HTTP/1.0)", "version")


def check_method(method: bytes, *, first: bool) -> None:
    if method in METHODS:
        return
    if method == b"CONNECT":
        raise refuse(400, "malformed HTTP request: tally serves no CONNECT tunnel", "connect")
    if _IS_TOKEN.fullmatch(method):
        raise refuse(400, "malformed HTTP request: unknown method", "method")
    # Not HTTP at all (TLS to the plain port, say): routine on a public port, so a debug line
    # when it opens the connection.
    raise refuse(400, "malformed HTTP request: not an HTTP request line", "not_http", quiet=first)


def check_partial_request_line(line: bytes, length: int, limits: Limits, *, first: bool) -> None:
    """Refuse an unfinished request line (``line``: its first bytes, ``length`` long so far) as
    early as its bytes allow: a method that cannot be one, or a line already past its limit."""
    method, space, _ = line[: LONGEST_METHOD + 1].partition(b" ")
    if space or len(method) > LONGEST_METHOD or (method and not _IS_TOKEN.fullmatch(method)):
        check_method(method, first=first)
    # The target's limit, plus the method, two spaces and the version.
    if length > limits.request_line + LONGEST_METHOD + 2 + len(b"HTTP/1.1"):
        raise refuse(414, f"the request line is longer than {limits.request_line} bytes", "request_line_too_long")


def field_size(line: bytes | bytearray) -> int:
    """A field's size as the limit counts it: name and value, leading whitespace excluded."""
    name, _, value = bytes(line).partition(b":")
    return len(name) + len(value.lstrip(OWS))


def check_field_size(line: bytes | bytearray, limits: Limits) -> None:
    # Whitespace is not counted, but a line of megabytes of it is not a field either.
    if field_size(line) > limits.field or len(line) > 2 * limits.field:
        raise refuse(431, f"a header field is longer than {limits.field} bytes", "field_too_large")


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
        """Check one field line (without its CRLF)."""
        if line[:1] in (b" ", b"\t"):
            raise refuse(400, "malformed HTTP request: folded header lines are obsolete", "obs_fold")
        if len(line) > self.limits.field:  # only then can it be too large
            check_field_size(line, self.limits)
        self.count += 1
        if self.count > self.limits.fields:
            raise refuse(431, f"more than {self.limits.fields} header fields", "too_many_fields")
        field = _FIELD.fullmatch(line)
        if field is None:
            if _FIELD_NAME.match(line):
                raise refuse(400, "malformed HTTP request: a control character in a header value", "field_value")
            raise refuse(400, "malformed HTTP request: a header field is NAME: value", "field")
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
                raise refuse(400, f"malformed HTTP request: more than one {name.decode()} field", "repeated_field")
            self.seen.add(key)
        if key == b"content-length":
            self.length = value
        elif key == b"transfer-encoding":
            self.encoding = value
        elif key == b"upgrade" and UPGRADES & {p.strip(OWS).partition(b"/")[0].lower() for p in value.split(b",")}:
            raise refuse(400, "malformed HTTP request: tally serves no protocol upgrade", "upgrade")

    def framing(self) -> Framing:
        """The body's framing, once the head is complete (RFC 9112 section 6)."""
        if self.version == b"HTTP/1.1" and b"host" not in self.seen:
            raise refuse(400, "malformed HTTP request: HTTP/1.1 requires a Host field", "host")
        if self.encoding is not None:
            if self.length is not None:
                raise refuse(400, "malformed HTTP request: both Transfer-Encoding and Content-Length", "framing")
            codings = [c.strip(OWS).lower() for c in self.encoding.split(b",")]
            if codings[-1] != b"chunked" or codings.count(b"chunked") != 1:
                raise refuse(400, "malformed HTTP request: Transfer-Encoding must end with chunked", "framing")
            return Framing(chunked=True)
        if self.length is not None:
            if not self.length.isdigit() or len(self.length) > MAX_LENGTH_DIGITS:
                raise refuse(400, "malformed HTTP request: Content-Length is not a number of bytes", "framing")
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
    return refuse(400, "malformed HTTP request: a chunked body that breaks its framing", "chunked_body")
