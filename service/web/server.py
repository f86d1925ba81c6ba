"""Serving an application: aiohttp's ``AppRunner`` behind tally's front door
(service/web/frontdoor.py: head timeout, problem+json protocol refusals, lingering close),
used alike by ``tally api``, ``tally consume`` and ``tally dev``. Public aiohttp API only: the
runner, the protocol factory it makes (``runner.server``), its documented keyword arguments.

**SIGTERM drains** as with ``web.run_app``: the listening socket closes, requests in flight
finish (up to ``SHUTDOWN_TIMEOUT``), then every cleanup context runs (the consumer commits
and acks its batch) and the process exits 0.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from aiohttp import web
from aiohttp.http import HttpProcessingError
from yarl import URL

from service.infra import metrics
from service.infra.settings import Settings
from service.web.frontdoor import FrontDoor, ResponseWritten
from service.web.http1 import Limits

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
# Seconds SIGTERM waits for requests in flight before cancelling them (run_app's default).
SHUTDOWN_TIMEOUT = 60.0
# The listening socket's queue of connections not yet accepted (aiohttp's sites' default).
BACKLOG = 128


class AiohttpLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The logger aiohttp's protocol reports to (its documented ``logger`` argument). The
    front door refuses malformed heads before aiohttp sees them; what aiohttp still refuses
    itself (a malformed chunked body, which only its parser follows to the end) is the
    client's fault, so one warning line — not an error with a traceback."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError) and level >= logging.ERROR:
            metrics.HTTP_REFUSED.labels("bad_request").inc()
            log.warning("refused a malformed request", extra={"status": exc.code, "reason": type(exc).__name__})
            return
        if isinstance(exc, web.RequestPayloadError) and level >= logging.ERROR:
            # aiohttp reads what is left of a body after the response and reports its
            # decoding error; the request was already refused (400) and logged by the middleware.
            log.debug("discarded the rest of a malformed body", extra={"reason": type(exc).__name__})
            return
        super().log(level, msg, *args, **kwargs)


def handler_args(settings: Settings) -> dict[str, Any]:
    """The protocol limits every tally server uses (``web.Application(handler_args=...)``)."""
    return {
        "max_line_size": MAX_REQUEST_LINE,
        "max_field_size": MAX_FIELD_SIZE,
        "max_headers": MAX_HEADERS,
        "keepalive_timeout": settings.http_keepalive_timeout,
    }


def runner(app: web.Application, *, handle_signals: bool = False) -> web.AppRunner:
    """A runner for ``app``, whose protocols report written responses to the front door."""
    return web.AppRunner(
        app,
        handle_signals=handle_signals,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        access_log_class=ResponseWritten,
        access_log=log,
        logger=AiohttpLog(logging.getLogger("aiohttp.server")),
    )


def limits(settings: Settings) -> Limits:
    return Limits(MAX_REQUEST_LINE, MAX_FIELD_SIZE, MAX_HEADERS, settings.http_header_timeout)


async def listen(app_runner: web.AppRunner, settings: Settings, host: str, port: int) -> asyncio.Server:
    """Accept connections on ``host:port``, each behind a front door (``app_runner`` set up)."""
    server = app_runner.server
    assert server is not None, "the runner is set up first"
    door_limits = limits(settings)
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: FrontDoor(server(), door_limits), host, port, backlog=BACKLOG)


async def _serve(
    app: web.Application, settings: Settings, host: str, port: int, say: Callable[[str], None], banner: list[str]
) -> None:
    app_runner = runner(app, handle_signals=True)
    await app_runner.setup()
    # Everything made while starting (modules, models, compiled SQL, pools) lives as long as
    # the process: out of the collector's sight, a full collection scans only what requests
    # made since. Measured under a flood of refused bodies: full collections of 30-70 ms, each
    # a stall of every request in flight, fell to 7-20 ms.
    gc.collect()
    gc.freeze()
    listener: asyncio.Server | None = None
    try:
        listener = await listen(app_runner, settings, host, port)
        say(f"======== Running on {URL.build(scheme='http', host=host, port=port)} ========")
        for line in banner:
            say(line)
        await asyncio.Event().wait()  # until SIGINT/SIGTERM raise GracefulExit
    finally:
        if listener is not None:
            listener.close()  # no new connections; the runner drains the open ones
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
    except (web.GracefulExit, KeyboardInterrupt):
        # Draining: a repeated SIGTERM (systemd signals every process of a service, and
        # `tally consume` passes its own on too) must not cut the drain short; the drain is
        # bounded, and SIGKILL is the way to stop at once.
        with suppress(NotImplementedError):
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, lambda: log.info("already stopping: draining"))
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
