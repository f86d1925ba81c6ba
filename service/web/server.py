"""Serving an application: aiohttp's runner with the limits a deployment needs and aiohttp
lacks, used alike by ``tally api``, ``tally consume`` and ``tally dev``.

- **Head timeout.** aiohttp times out idle keep-alive connections, but nothing bounds how
  long a request's head (request line and headers) may take to arrive: a client trickling
  one header byte at a time holds its connection (and its buffered bytes) indefinitely.
  :class:`TallyRequestHandler` arms a timer when the first byte of a head arrives and closes
  the connection with a 408 if the head is not complete ``TALLY_HTTP_HEADER_TIMEOUT``
  seconds later. (A head that begins in the same read as the end of the previous request
  is left to the keep-alive timeout instead: the parser does not say where a head starts.)
- **Problem documents for protocol refusals.** aiohttp answers a request it cannot parse
  (a malformed request line, a header over the size limit, too many headers) in text/plain
  and logs an ERROR with a traceback, so anyone could fill the logs. Here those refusals are
  ``application/problem+json`` like every other error (414 for a request line over the
  limit, 431 for header fields, 400 otherwise), logged as one warning line.
- **SIGTERM drains** as with ``web.run_app``: the listening sockets close, requests in
  flight finish (up to ``SHUTDOWN_TIMEOUT``), then every cleanup context runs (the consumer
  commits and acks its batch) and the process exits 0.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import uuid
from collections.abc import Callable
from contextlib import suppress
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.web_runner import GracefulExit

from service.infra import metrics
from service.infra.settings import Settings
from service.web.problems import PROBLEM_CONTENT_TYPE, REQUEST_ID, problem_body

log = logging.getLogger("tally.http")

# Header limits. A field (name and value) is at most aiohttp's default of 8190 bytes and a
# head carries at most 64 fields: what real clients and proxies send fits many times over,
# and a connection can pin at most ~0.5 MiB of header bytes (the old 1 MiB x 128 let one
# connection hold 128 MiB).
MAX_FIELD_SIZE = 8190
MAX_HEADERS = 64
# The request line may be up to 1 MiB (aiohttp's default is 8 KiB): a list's documented
# filter bounds must fit in it (1000 customer_identifiers of up to 255 characters,
# percent-encoded, are ~770 KB). It costs at most 1 MiB per connection, for at most the
# head timeout.
MAX_REQUEST_LINE = 1_048_576
# Seconds a connection whose request was refused stays half-open, discarding input, so that
# the client reads the refusal before the connection goes (nginx's lingering close).
LINGER = 2.0
# Seconds SIGTERM waits for requests in flight before cancelling them (run_app's default).
SHUTDOWN_TIMEOUT = 60.0


class TallyRequestHandler(web.RequestHandler):
    """aiohttp's HTTP/1.1 protocol with a head timeout and problem+json refusals."""

    def __init__(self, manager: web.Server, *, head_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout = head_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        # The body of the last request parsed: while it is incomplete, bytes are body, not head.
        self._body: Any = None
        self._refused = False  # a refusal is being answered: linger before closing
        self._peer_gone: asyncio.Future[None] | None = None

    def data_received(self, data: bytes) -> None:
        if data and self._head_timer is None and self._awaiting_head():
            self._head_timer = self._loop.call_later(self._head_timeout, self._head_timed_out)
        parsed = self._request_count
        super().data_received(data)
        if self._request_count != parsed and self._messages:  # at least one head is complete
            self._cancel_head_timer()
            message, self._body = self._messages[-1]
            if not isinstance(message, RawRequestMessage):
                # A refused head: the connection closes after the refusal, so parse nothing
                # more. (The parser would raise again on every further read, and aiohttp would
                # queue each error with a copy of the bytes read: ~15 MB per connection that
                # sends 60 headers of 1 MB.)
                self.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        if self._peer_gone is not None and not self._peer_gone.done():
            self._peer_gone.set_result(None)
        super().connection_lost(exc)

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        result = await super().finish_response(request, resp, start_time)
        if self._refused and not result[1]:
            await self._linger()
        return result

    async def _linger(self) -> None:
        """Half-close after a refusal and discard what the client still sends, until it
        closes or LINGER seconds pass. A refused client is usually still sending (60 MB of
        headers, say); closing at once with its bytes unread makes the kernel send a reset,
        which can destroy the refusal before the client has read it."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
        self._peer_gone = self._loop.create_future()
        with suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._peer_gone), LINGER)

    def _awaiting_head(self) -> bool:
        if self._force_close or self._close or self._upgraded:
            return False
        return self._body is None or self._body.is_eof()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport is None or self._force_close:
            return
        metrics.HTTP_REFUSED.labels("header_timeout").inc()
        log.warning(
            "closed a connection whose request head was incomplete after %gs",
            self._head_timeout,
            extra={"remote": _remote(self.peername)},
        )
        if not self._request_in_progress and not self._messages:
            # Idle between requests: nothing else is being written, so say why before closing.
            body = problem_body(
                408,
                "Request Timeout",
                f"the request line and headers did not arrive within {self._head_timeout:g} s",
                instance=None,
                request_id=uuid.uuid4().hex,
            )
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\nContent-Type: "
                + PROBLEM_CONTENT_TYPE.encode()
                + b"\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + body
            )
        self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The response to a request aiohttp refused, or whose handler failed past every
        middleware: a problem document; the connection is closed after it, as aiohttp does."""
        if request.writer.output_size > 0:
            # Some of a response is out already: the connection is broken either way.
            raise ConnectionError("response already started; cannot send the error")
        request_id = request.get(REQUEST_ID) or uuid.uuid4().hex
        instance: str | None = request.path
        if status >= 500:
            # Past every middleware (which answer every error of tally's own): a bug, logged as one.
            self.log_exception("Error handling request", exc_info=exc)
            title, detail = HTTPStatus(status).phrase, "unexpected error; quote the request_id"
        else:
            # A request aiohttp could not parse has no path of its own.
            instance = None
            status, title, detail = self._refusal(status, exc)
            self._refused = True
            metrics.HTTP_REFUSED.labels("bad_request").inc()
            reason = type(exc).__name__ if exc is not None else "unknown"
            # One line, no traceback, no request bytes (a header value may be a key). Non-HTTP
            # traffic on the port (TLS, scanners) is routine: debug, as aiohttp does.
            level = logging.DEBUG if self._request_count == 1 and isinstance(exc, BadHttpMethod) else logging.WARNING
            log.log(
                level,
                "refused a malformed request",
                extra={"status": status, "reason": reason, "remote": request.remote},
            )
        body = problem_body(status, title, detail, instance=instance, request_id=request_id)
        response = web.Response(
            body=body, status=status, content_type=PROBLEM_CONTENT_TYPE, headers={"X-Request-ID": request_id}
        )
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        # aiohttp reads what is left of a body after the response and logs its decoding
        # error at ERROR; the request was already refused (400) and logged by the middleware.
        if isinstance(kwargs.get("exc_info"), web.RequestPayloadError):
            log.debug("discarded the rest of a malformed body", extra={"reason": type(kwargs["exc_info"]).__name__})
            return
        super().log_exception(*args, **kwargs)

    def _refusal(self, status: int, exc: BaseException | None) -> tuple[int, str, str]:
        if isinstance(exc, LineTooLong):
            if exc.args[1] == self.max_field_size:
                return (
                    431,
                    "Request Header Fields Too Large",
                    f"a header field is longer than {self.max_field_size} bytes",
                )
            return 414, "URI Too Long", f"the request line is longer than {self.max_line_size} bytes"
        if isinstance(exc, HttpProcessingError) and "Too many headers" in exc.message:
            return 431, "Request Header Fields Too Large", f"more than {self.max_headers} header fields"
        text = exc.message if isinstance(exc, HttpProcessingError) else ""
        # The client's own bytes, echoed to the client only, escaped and bounded.
        detail = "malformed HTTP request" + (": " + _printable(text)[:200] if text else "")
        return status, "Bad Request", detail


def _printable(text: str) -> str:
    return text.encode("ascii", "backslashreplace").decode("ascii")


def _remote(peername: object) -> str | None:
    return str(peername[0]) if isinstance(peername, tuple) and peername else None


class TallyServer(web.Server):
    """aiohttp's low-level server, making :class:`TallyRequestHandler` protocols."""

    def __init__(self, *args: Any, head_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_timeout = head_timeout

    def __call__(self) -> TallyRequestHandler:
        return TallyRequestHandler(self, loop=self._loop, head_timeout=self.head_timeout, **self._kwargs)


class TallyRunner(web.AppRunner):
    """An AppRunner whose server is a :class:`TallyServer` (startup and cleanup as usual)."""

    def __init__(self, app: web.Application, *, head_timeout: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._head_timeout = head_timeout

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()  # runs the app's startup and cleanup contexts' first half
        return TallyServer(
            server.request_handler,
            request_factory=server.request_factory,
            loop=server._loop,
            handler_cancellation=server.handler_cancellation,
            head_timeout=self._head_timeout,
            **server._kwargs,
        )


def handler_args(settings: Settings) -> dict[str, Any]:
    """The protocol limits every tally server uses (``web.Application(handler_args=...)``)."""
    return {
        "max_line_size": MAX_REQUEST_LINE,
        "max_field_size": MAX_FIELD_SIZE,
        "max_headers": MAX_HEADERS,
        "keepalive_timeout": settings.http_keepalive_timeout,
    }


def runner(app: web.Application, settings: Settings, *, handle_signals: bool = False) -> TallyRunner:
    """A runner for ``app`` with tally's limits (tests start one without signal handlers)."""
    return TallyRunner(
        app,
        head_timeout=settings.http_header_timeout,
        handle_signals=handle_signals,
        access_log=None,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        **handler_args(settings),
    )


async def _serve(
    app: web.Application, settings: Settings, host: str, port: int, say: Callable[[str], None], banner: list[str]
) -> None:
    app_runner = runner(app, settings, handle_signals=True)
    await app_runner.setup()
    # Everything made while starting (modules, models, compiled SQL, pools) lives as long as
    # the process: out of the collector's sight, a full collection scans only what requests
    # made since. Measured under a flood of refused bodies: full collections of 30-70 ms, each
    # a stall of every request in flight, fell to 7-20 ms.
    gc.collect()
    gc.freeze()
    try:
        site = web.TCPSite(app_runner, host, port)
        await site.start()
        say(f"======== Running on {site.name} ========")
        for line in banner:
            say(line)
        await asyncio.Event().wait()  # until SIGINT/SIGTERM raise GracefulExit
    finally:
        await app_runner.cleanup()


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def serve(app: web.Application, settings: Settings, host: str, port: int, banner: list[str] | None = None) -> None:
    """Serve ``app`` until SIGTERM or SIGINT, then drain and clean up (``web.run_app``'s
    lifecycle, with tally's runner); ``banner`` lines are printed once it listens."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    main = loop.create_task(_serve(app, settings, host, port, _say, banner or []))
    try:
        loop.run_until_complete(main)
    except (GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main.done():
                main.cancel()
                with suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
