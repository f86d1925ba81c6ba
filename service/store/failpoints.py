"""Failpoints: named places where a test makes the process fail on the spot, to prove that a
crash there loses nothing and applies nothing twice.

- ``fold.before_commit``: the batch's writes are done, the transaction is not committed.
- ``consumer.after_commit``: the batch is committed, its messages are not acked.

A process started with ``TALLY_FAILPOINTS`` (comma-separated names) exits at once at each one
named, like a crash. A test in the same process arms one with :func:`arm` instead, to raise
the exception of its choice there. Unset, as in production, a check is a lookup that finds
nothing.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

EXIT_CODE = 86
ACTIVE = frozenset(name.strip() for name in os.environ.get("TALLY_FAILPOINTS", "").split(",") if name.strip())
Action = Callable[[], Awaitable[None]]
_ARMED: dict[str, Action] = {}


async def hit(name: str) -> None:
    """Fail here if failpoint ``name`` is on: exit (environment) or run what was armed."""
    if name in ACTIVE:
        os._exit(EXIT_CODE)
    action = _ARMED.get(name)
    if action is not None:
        await action()


@contextmanager
def arm(name: str, action: Action) -> Iterator[None]:
    """Run ``action`` (typically raising) each time failpoint ``name`` is hit, while the
    context lasts."""
    _ARMED[name] = action
    try:
        yield
    finally:
        _ARMED.pop(name, None)
