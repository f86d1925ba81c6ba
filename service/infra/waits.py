"""Waiting on an event with a bound."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set or ``timeout`` seconds have passed; True if it is set."""
    # (asyncio.timeout rather than wait_for: no task per wait, which a thousand waiting change
    # streams felt)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
    return event.is_set()


async def wait_any(events: Sequence[asyncio.Event], timeout: float) -> None:
    """Wait until one of ``events`` is set or ``timeout`` seconds have passed."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
