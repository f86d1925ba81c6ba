"""The HTTP edge of a real `tally api` process against hostile connections:
oversized and endless headers, malformed request lines, credentials
that are not UTF-8, and floods of requests no key vouches for. Every refusal is a problem
document, and none of them is logged as an error."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import orjson
import pytest

from service.store import auth
from tests.eventkit import wait_until
from tests.factories import make_org
from tests.processes import ROOT, free_port

HEAD_TIMEOUT = 1  # seconds, TALLY_HTTP_HEADER_TIMEOUT of the process under test
IP_BURST = 20  # TALLY_IP_RATE_LIMIT_BURST of the process under test
# Bounds on waits (never sleeps): a refusal or a close that takes longer has failed.
ANSWER_TIMEOUT = 10
MB = 1_000_000


@dataclass
class Api:
    process: subprocess.Popen
    port: int
    log: Path
    key: str  # read
    write_key: str
    org_name: str

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def log_lines(self) -> list[dict]:
        return [orjson.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
async def api(settings, pool, tmp_path_factory) -> AsyncIterator[Api]:
    org = await make_org(pool)
    async with pool.acquire() as conn:
        key = (await auth.create_key(conn, org.name, ("read",))).key
        write_key = (await auth.create_key(conn, org.name, ("read", "write"))).key
    port = free_port()
    log = tmp_path_factory.mktemp("edge") / "api.log"
    env = {
        **os.environ,
        "TALLY_DATABASE_URL": settings.database_url,
        "TALLY_HTTP_PORT": str(port),
        "TALLY_HTTP_HOST": "127.0.0.1",
        "TALLY_AMQP_NAMESPACE": settings.amqp_namespace,
        "TALLY_LOG_FORMAT": "json",
        "TALLY_HTTP_HEADER_TIMEOUT": str(HEAD_TIMEOUT),
        "TALLY_IP_RATE_LIMIT_BURST": str(IP_BURST),
        "TALLY_IP_RATE_LIMIT_PER_SECOND": "0.5",
        # Refusals answered at once here (tests/test_fairness.py holds them back).
        "TALLY_SHED_DELAY": "0",
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "api"], cwd=ROOT, env=env, stdout=out, stderr=out
        )

    async def serving() -> bool:
        assert process.poll() is None, log.read_text()[-2000:]
        return "Running on" in log.read_text()

    try:
        await wait_until(serving, timeout=30, what="tally api to listen")
        yield Api(process, port, log, key, write_key, org.name)
    finally:
        process.terminate()
        process.wait(30)
    assert process.returncode == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert "Traceback" not in text, text[-4000:]


async def exchange(api: Api, *chunks: bytes) -> bytes:
    """Send ``chunks`` on a fresh connection while reading; everything the server sent
    before it closed (the server may close before it has read all of it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", api.port)

    async def send() -> None:
        try:
            for chunk in chunks:
                writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            pass  # refused mid-send: the answer is what was read

    sending = asyncio.ensure_future(send())
    received = bytearray()
    try:
        async with asyncio.timeout(ANSWER_TIMEOUT):
            while chunk := await reader.read(65536):
                received += chunk
    except ConnectionError:
        pass
    except TimeoutError:
        raise AssertionError(f"not answered and closed within {ANSWER_TIMEOUT} s: {bytes(received[:300])!r}") from None
    finally:
        sending.cancel()
        writer.close()
    return bytes(received)


def response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def statuses(raw: bytes) -> list[int]:
    """The statuses of the responses in ``raw``, in order (bodies here hold no status line)."""
    return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]


def assert_problem(raw: bytes, status: int) -> dict:
    assert raw, "the connection closed without an answer"
    got, headers, body = response(raw)
    assert got == status, raw[:500]
    assert headers["content-type"].startswith("application/problem+json"), raw[:500]
    problem = orjson.loads(body)
    assert problem["status"] == status and problem["type"].startswith("https://")
    assert problem["title"] and problem["detail"] and problem["request_id"]
    assert problem["errors"] == []
    return problem


def assert_no_errors_logged(api: Api) -> None:
    errors = [line for line in api.log_lines() if line.get("level") in ("error", "critical")]
    assert not errors, errors


async def test_sixty_headers_of_a_megabyte_are_refused_and_memory_stays_bounded(api: Api) -> None:
    """The probe: 60 headers of 1 MB to /healthz took RSS from 60 to 184 MB, five connections
    to 637 MB. Now the first oversized field is refused (431) and nothing more is parsed."""
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    headers = [b"X-Pad-%d: " % i + b"a" * MB + b"\r\n" for i in range(60)]
    before = api.rss_kb()
    answers = await asyncio.gather(*(exchange(api, head, *headers, b"\r\n") for _ in range(5)))
    for raw in answers:
        assert_problem(raw, 431)
    grown_mb = (api.rss_kb() - before) / 1024
    assert grown_mb < 32, f"RSS grew by {grown_mb:.0f} MB"
    assert_no_errors_logged(api)


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        pytest.param(b"GET /healthz HTTP/1.1 trailing\r\nHost: a\r\n\r\n", 400, id="malformed-request-line"),
        pytest.param(b"GET /healthz HTTP/1.1\r\nHost: a\r\nNo colon here\r\n\r\n", 400, id="malformed-header"),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 431, id="field-too-large"
        ),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(100)) + b"\r\n",
            431,
            id="too-many-headers",
        ),
        pytest.param(
            b"GET /healthz?" + b"q" * 1_100_000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414, id="request-line-too-long"
        ),
        # The grammar the front door holds heads to, where it decides where a request ends.
        pytest.param(b"GET /healthz HTTP/1.1\nHost: a\n\n", 400, id="bare-lf"),
        pytest.param(b"BREW /healthz HTTP/1.1\r\nHost: a\r\n\r\n", 400, id="unknown-method"),
        pytest.param(b"GET /healthz HTTP/2.0\r\nHost: a\r\n\r\n", 400, id="version"),
        pytest.param(b"GET /healthz HTTP/1.1\r\n\r\n", 400, id="no-host"),
        pytest.param(b"GET /h\x01 HTTP/1.1\r\nHost: a\r\n\r\n", 400, id="control-in-target"),
        pytest.param(b"GET /healthz HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n", 400, id="control-in-value"),
        pytest.param(b"GET /healthz HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400, id="folded-header"),
        pytest.param(b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, id="two-hosts"),
        pytest.param(
            b"POST /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
            400,
            id="two-content-lengths",
        ),
        pytest.param(b"POST /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 1x\r\n\r\nx", 400, id="bad-length"),
        pytest.param(
            b"POST /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            id="length-and-chunked",
        ),
        pytest.param(b"POST /healthz HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 400, id="not-chunked"),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            400,
            id="upgrade",
        ),
    ],
)
async def test_protocol_refusals_are_problem_documents(api: Api, raw: bytes, status: int) -> None:
    before = len(api.log_lines())
    assert_problem(await exchange(api, raw), status)

    async def logged() -> bool:
        return len(api.log_lines()) > before

    await wait_until(logged, timeout=ANSWER_TIMEOUT, what="the refusal's log line")
    refusals = [line for line in api.log_lines()[before:] if line["message"] == "refused a malformed request"]
    assert [(line["level"], line["status"]) for line in refusals] == [("warning", status)]
    assert_no_errors_logged(api)


async def test_non_http_traffic_is_refused_with_a_debug_line_only(api: Api) -> None:
    """TLS sent to the plain port (a scanner, a misconfigured client) is routine on a public
    port: a 400, and no warning to fill the logs."""
    before = len(api.log_lines())
    assert_problem(await exchange(api, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"), 400)
    assert not [line for line in api.log_lines()[before:] if line["message"] == "refused a malformed request"]
    assert_no_errors_logged(api)


async def test_pipelined_requests_are_answered_in_order_before_a_refusal(api: Api) -> None:
    """A refused head after accepted ones on the same connection: each accepted request is
    answered first, then the refusal, then the connection closes."""
    raw = await exchange(
        api,
        b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nbody"
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nNo colon here\r\n\r\n",
    )
    assert statuses(raw) == [200, 405, 400], raw[:2000]
    assert_problem(raw[raw.rindex(b"HTTP/1.1 400") :], 400)
    assert_no_errors_logged(api)


async def test_a_chunked_body_is_followed_to_the_next_request(api: Api) -> None:
    """The front door follows a chunked body (extensions and trailers included) to its end:
    the head after it is a request of its own, answered on the same connection."""
    raw = await exchange(
        api,
        b"POST /healthz HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"4;ext=1\r\nGET \r\n",
        b"a\r\n/healthz H\r\n0\r\nX-Trailer: t\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    assert statuses(raw) == [405, 200], raw[:2000]
    assert_no_errors_logged(api)


@pytest.mark.parametrize("split", [False, True], ids=["one-read", "body-later"])
async def test_a_chunked_body_that_breaks_its_framing_is_a_problem_400(api: Api, split: bool) -> None:
    """A chunk size that is not one, arriving with the head or while the handler waits for
    the body: a problem document and a warning, never an error."""
    head = (
        b"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer " + api.write_key.encode() + b"\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    body = b"2\r\n[{\r\nzz\r\n}]\r\n0\r\n\r\n"
    before = len(api.log_lines())
    raw = await exchange(api, head, body) if split else await exchange(api, head + body)
    problem = assert_problem(raw, 400)
    assert "chunked" in problem["detail"]
    refusals = [line for line in api.log_lines()[before:] if line["message"] == "refused a malformed request"]
    assert [line["level"] for line in refusals] == ["warning"]
    assert_no_errors_logged(api)


async def test_a_body_that_cannot_be_decoded_is_a_problem_400(api: Api) -> None:
    """A Content-Encoding the body does not match was a 500 and two ERROR tracebacks."""
    raw = await exchange(
        api,
        b"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Authorization: Bearer " + api.write_key.encode() + b"\r\nContent-Type: application/json\r\n"
        b"Content-Encoding: gzip\r\nContent-Length: 10\r\n\r\n0123456789",
    )
    problem = assert_problem(raw, 400)
    assert problem["detail"].startswith("malformed request body")
    assert_no_errors_logged(api)


async def test_a_partial_head_is_closed_after_the_header_timeout(api: Api) -> None:
    """The probe held 300 connections for 80 s by never finishing their headers."""
    raw = await exchange(api, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a")
    problem = assert_problem(raw, 408)
    assert f"{HEAD_TIMEOUT} s" in problem["detail"]
    assert response(raw)[1]["connection"] == "close"


async def test_a_partial_head_behind_a_request_is_timed_from_its_first_byte(api: Api) -> None:
    """A head that starts in the same read as the request before it ends is timed too: the
    request is answered, then the unfinished head is refused with 408."""
    raw = await exchange(api, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /healthz HTTP/1.1\r\nHo")
    assert raw.startswith(b"HTTP/1.1 200"), raw[:500]
    problem = assert_problem(raw[raw.index(b"HTTP/1.1 408") :], 408)
    assert f"{HEAD_TIMEOUT} s" in problem["detail"]


async def test_a_keep_alive_connection_serves_request_after_request(api: Api) -> None:
    """The header timer runs from a head's first byte, not from the connection's start:
    a keep-alive connection serves a second request sent after a first one."""
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
    try:
        for _ in range(2):
            writer.write(request)
            async with asyncio.timeout(ANSWER_TIMEOUT):
                status_line = await reader.readline()
                assert status_line.startswith(b"HTTP/1.1 200"), status_line
                length = 0
                while (line := await reader.readline()) != b"\r\n":
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
    finally:
        writer.close()


@pytest.mark.parametrize(
    "credentials",
    [
        pytest.param(b"Authorization: Bearer tly_0123456789ab.\xff\xfe\xfd", id="bearer"),
        pytest.param(b"x-client-key: tly_\xc3\x28\xa0\xa1\r\nx-client-secret: abc", id="x-client-key"),
        pytest.param(b"x-client-key: tly_0123456789ab\r\nx-client-secret: \xff\xfe\xfd", id="x-client-secret"),
    ],
)
async def test_credentials_that_are_not_utf8_are_a_401_not_a_500(api: Api, credentials: bytes) -> None:
    raw = await exchange(
        api, b"GET /v1/customers HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + credentials + b"\r\n\r\n"
    )
    got, _, body = response(raw)
    assert got == 401, raw[:500]
    problem = orjson.loads(body)
    assert problem["status"] == 401 and problem["detail"] == "malformed API key"
    assert_no_errors_logged(api)


async def test_failed_authentication_from_one_address_is_rate_limited(api: Api, pool: asyncpg.Pool) -> None:
    """Guessing keys is limited per client address before any database lookup; health and
    readiness probes are never limited, and a valid key — held before the flood, or created
    during it — is served from the same address while its failures go on."""
    good = f"Authorization: Bearer {api.key}\r\n".encode()
    bad = b"Authorization: Bearer tly_000000000000.not-a-secret\r\n"

    async def get(credentials: bytes, path: bytes = b"/v1/customers") -> bytes:
        return await exchange(
            api, b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + credentials + b"\r\n"
        )

    assert response(await get(good))[0] == 200
    statuses = []
    for _ in range(IP_BURST + 5):
        raw = await get(bad)
        statuses.append(response(raw)[0])
    assert statuses[0] == 401 and statuses[-1] == 429, statuses
    assert set(statuses) == {401, 429}
    problem = assert_problem(raw, 429)
    _, headers, _ = response(raw)
    assert int(headers["retry-after"]) >= 1
    assert headers["ratelimit-policy"].startswith('"per-ip"')
    assert "unauthenticated" in problem["detail"]
    # Public routes draw on the same bucket, but never the probes.
    assert response(await get(b""))[0] == 429
    assert response(await get(b"", b"/openapi.json"))[0] == 429
    for probe in (b"/healthz", b"/readyz"):
        assert response(await get(b"", probe))[0] == 200, probe
    # The verified key is not a guess, and a wrong secret for it is refused without a lookup.
    assert response(await get(good))[0] == 200
    # A key created during the flood is served as soon as the process has heard of it: polled
    # with a failed key sent before each try, so no refilled token could be what let it in.
    async with pool.acquire() as conn:
        fresh = (await auth.create_key(conn, api.org_name, ("read",))).key
    fresh_header = f"Authorization: Bearer {fresh}\r\n".encode()

    async def fresh_key_served() -> bool:
        assert response(await get(bad))[0] in (401, 429)  # takes any token refilled meanwhile
        return response(await get(fresh_header))[0] == 200

    await wait_until(fresh_key_served, timeout=10, what="a key created during the flood to be served")
