"""A LISTEN connection of a process's own, kept up for as long as the process runs: the key
store (service/api/keycache.py) and the change watch (service/api/changewatch.py) each follow
a NOTIFY channel through one."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from service.infra.errors import is_transient
from service.infra.waits import wait_event

log = logging.getLogger("tally.listener")
# After a failure, the listener connects again this many seconds later.
RELISTEN_DELAY = 1.0


async def keep_listening(
    dsn: str,
    connect_timeout: float,
    channel: str,
    on_notify: Callable[..., Any],
    *,
    what: str,
    stop: asyncio.Event,
    follow: Callable[[asyncpg.Connection, asyncio.Event], Awaitable[None]],
    ended: Callable[[], None],
    relisten_delay: float = RELISTEN_DELAY,
) -> None:
    """Until ``stop``: connect, LISTEN on ``channel`` (``on_notify`` hears it), and run
    ``follow(conn, lost)`` — ``lost`` is set when the connection ends — until it returns or
    fails; then ``ended()``, and again after ``relisten_delay``. ``what`` names the listener
    in its log lines (and says what the process does without it)."""
    while not stop.is_set():
        try:
            conn = await asyncpg.connect(dsn, timeout=connect_timeout)
        except Exception as exc:  # whatever it is, it tries again
            level = logging.WARNING if is_transient(exc) else logging.ERROR
            log.log(level, f"{what}: cannot connect", extra={"error": repr(exc)})
            await wait_event(stop, relisten_delay)
            continue
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _c, lost=lost: lost.set())
        try:
            await conn.add_listener(channel, on_notify)
            await follow(conn, lost)
        except Exception as exc:  # the listener starts again after relisten_delay, whatever it was
            level = logging.WARNING if is_transient(exc) else logging.ERROR
            log.log(level, f"{what}: failed", extra={"error": repr(exc)})
        finally:
            ended()
            if not conn.is_closed():
                await conn.close(timeout=connect_timeout)
        if not stop.is_set():
            await wait_event(stop, relisten_delay)
