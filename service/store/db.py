"""What every store function shares: the connection it takes (a connection, or one borrowed
from a pool: asyncpg hands out a proxy), and rows turned into the column arrays that
``unnest()`` zips back into rows (how the store writes a batch in one statement)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, TypeAlias

import asyncpg

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]
else:
    Connection = asyncpg.Connection


def columns(rows: Iterable[tuple[object, ...]]) -> list[list[object]]:
    """Rows turned into one list per column: the arrays that unnest() zips back into rows."""
    return [list(column) for column in zip(*rows, strict=True)]
