"""The front door (service/web/frontdoor.py, its rules service/web/http1.py's) at the protocol
level, in milliseconds: which bytes it passes to aiohttp's protocol, which it holds back, and
what it answers itself. A recording protocol stands in for aiohttp's and a recording transport
for the socket; tests/test_http_limits.py drives the same door in a real `tally api` process."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from aiohttp.http import HttpProcessingError, HttpRequestParser
from hypothesis import given, settings
from hypothesis import strategies as st

from service.web import frontdoor
from service.web.frontdoor import FrontDoor
from service.web.http1 import METHODS, Limits
from tests.eventkit import wait_until

LIMITS = Limits(request_line=64, field=32, fields=4, head_timeout=0.05)


class Transport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.eof = False
        self.closed = False

    def get_extra_info(self, name: str) -> object:
        return ("127.0.0.1", 5555) if name == "peername" else None

    def write(self, data: bytes) -> None:
        assert not self.eof and not self.closed
        self.written += data

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True


class Inner(asyncio.Protocol):
    """What aiohttp's protocol would be given."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.received += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


def door() -> tuple[FrontDoor, Inner, Transport]:
    inner, transport = Inner(), Transport()
    front = FrontDoor(inner, LIMITS)
    front.connection_made(transport)  # type: ignore[arg-type]
    return front, inner, transport


def status(transport: Transport) -> int:
    return int(transport.written.split(b" ", 2)[1])


def problem(transport: Transport) -> dict:
    head, _, body = bytes(transport.written).partition(b"\r\n\r\n")
    assert b"Content-Type: application/problem+json" in head and b"Connection: close" in head
    return orjson.loads(body)


GET = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n"
POST = b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED = b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nT: t\r\n\r\n"
STREAM = GET + POST + b"\r\n" + CHUNKED + GET


async def test_requests_pass_whole_and_in_order() -> None:
    front, inner, transport = door()
    front.data_received(STREAM)
    assert bytes(inner.received) == GET + POST + CHUNKED + GET  # the stray CRLF is not a request
    assert front.heads == 4 and not transport.written


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
async def test_any_split_of_the_stream_passes_the_same_bytes(cuts: list[int]) -> None:
    """However the reads split the bytes, the same requests pass, and a head is never passed
    before it is complete."""
    front, inner, transport = door()
    edges = [0, *sorted(cuts), len(STREAM)]
    for start, end in zip(edges, edges[1:], strict=False):
        front.data_received(STREAM[start:end])
        passed = bytes(inner.received)
        assert passed.count(b"HTTP/1.1\r\n") == front.heads
        last = passed.rfind(b" HTTP/1.1\r\n")
        assert last < 0 or b"\r\n\r\n" in passed[last:]
    assert bytes(inner.received) == GET + POST + CHUNKED + GET and front.heads == 4
    assert not transport.written


@pytest.mark.parametrize(
    ("raw", "code", "reason"),
    [
        (b"GET /" + b"a" * 65 + b" HTTP/1.1\r\nHost: h\r\n\r\n", 414, "request_line_too_long"),
        (b"GET /" + b"a" * 200, 414, "request_line_too_long"),  # refused before its end
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"v" * 32 + b"\r\n\r\n", 431, "field_too_large"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"v" * 100, 431, "field_too_large"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n", 431, "too_many_fields"),
        (b"\x16\x03\x01\x02", 400, "not_http"),
        (b"get / HTTP/1.1\r\nHost: h\r\n\r\n", 400, "method"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX : v\r\n\r\n", 400, "field"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n", 400, "chunked_body"),
    ],
)
async def test_refusals_are_answered_by_the_door(raw: bytes, code: int, reason: str) -> None:
    front, inner, transport = door()
    front.data_received(raw)
    assert not inner.received
    assert status(transport) == code and transport.eof
    assert problem(transport)["status"] == code
    assert front.refusal is not None and front.refusal.reason == reason
    front.data_received(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")  # after a refusal: discarded
    assert not inner.received


async def test_a_refusal_waits_for_the_answers_before_it() -> None:
    front, inner, transport = door()
    front.data_received(GET + POST + b"GET / HTTP/1.1\r\nbroken\r\n\r\n")
    assert bytes(inner.received) == GET + POST
    assert not transport.written  # aiohttp still owes two answers
    front.response_written()
    assert not transport.written
    front.response_written()
    assert status(transport) == 400


async def test_a_body_refused_after_its_head_passed_ends_the_request() -> None:
    """Its head is with aiohttp, which would wait for the rest of the body: the refusal
    answers the request, and the connection closes (which ends aiohttp's wait)."""
    front, inner, transport = door()
    front.data_received(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    front.data_received(b"zz\r\n")
    assert status(transport) == 400 and transport.closed


async def test_an_unfinished_head_is_answered_408_and_lingers_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(frontdoor, "LINGER", 0.05)
    front, inner, transport = door()
    front.data_received(GET + b"GET /slow HTTP/1.1\r\nHo")
    assert bytes(inner.received) == GET

    async def timed_out() -> bool:
        return front.refusal is not None

    async def closed() -> bool:
        return transport.closed

    await wait_until(timed_out, timeout=5, what="the head timeout")
    assert not transport.written  # aiohttp has not answered the first request yet
    front.response_written()
    assert status(transport) == 408 and transport.eof and not transport.closed
    await wait_until(closed, timeout=5, what="the lingering close")


async def test_a_head_in_one_read_and_an_idle_connection_start_no_timer() -> None:
    front, inner, transport = door()
    front.data_received(GET)
    front.data_received(b"\r\n")
    assert front.timer is None
    front.data_received(b"G")
    assert front.timer is not None
    front.connection_lost(None)
    assert front.timer is None and inner.lost


class ParserProtocol:
    transport = None

    def pause_reading(self, **_: object) -> None:
        pass

    def resume_reading(self, **_: object) -> None:
        pass


async def test_the_methods_are_those_aiohttps_parser_knows() -> None:
    """The door refuses a method aiohttp's parser would refuse (so the refusal is a problem
    document), and passes every other but CONNECT (so the router answers 405, not the door
    400): an aiohttp release that changes its parser's list fails here."""
    candidates = METHODS | {b"CONNECT", b"PRI", b"FOO", b"BREW", b"DESCRIBE", b"SETUP", b"get"}
    known = set()
    for method in candidates:
        parser = HttpRequestParser(ParserProtocol(), asyncio.get_running_loop(), 2**16)
        try:
            parser.feed_data(method + b" / HTTP/1.1\r\nHost: h\r\n\r\n")
        except HttpProcessingError:
            continue
        known.add(method)
    assert known - {b"CONNECT"} == METHODS
