"""Failpoints: named places where a test can make the process die on the spot, to prove
that a crash there loses nothing and applies nothing twice.

Switched on only by the environment variable ``TALLY_FAILPOINTS`` (comma-separated names);
unset, as in production, every check is a frozenset lookup that finds nothing.

- ``fold.before_commit``: the batch's writes are done, the transaction is not committed.
- ``consumer.after_commit``: the batch is committed, its messages are not acked.
"""

from __future__ import annotations

import os

EXIT_CODE = 86
ACTIVE = frozenset(name.strip() for name in os.environ.get("TALLY_FAILPOINTS", "").split(",") if name.strip())


def hit(name: str) -> None:
    """Exit the process at once (no cleanup, like a crash) if failpoint ``name`` is on."""
    if name in ACTIVE:
        os._exit(EXIT_CODE)
