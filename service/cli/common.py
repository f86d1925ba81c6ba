"""What every command group shares: running a command's coroutine, printing tables and JSON,
asking before destroying, and saying a dependency tally could not use the way an operator
can act on it."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import orjson

from service.infra.settings import Settings, redact_dsn
from service.store.db import Connection

JSON_HELP = "print JSON instead of a table"


def run(coro: Coroutine[Any, Any, int]) -> int:
    """Run a command's coroutine on uvloop where it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    result: int = uvloop.run(coro)
    return result


def install_uvloop() -> None:
    """uvloop for the event loop the serving commands create themselves, where installed."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def print_json(value: object) -> None:
    sys.stdout.write(orjson.dumps(value, default=str, option=orjson.OPT_INDENT_2).decode() + "\n")


def table(header: list[str], rows: list[list[object]]) -> None:
    """Rows under a header, columns aligned (``-`` for a missing value)."""
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def confirmed(yes: bool, question: str, what: str) -> bool:
    """True with --yes, or when the person at the terminal says so; refuses without one."""
    if yes:
        return True
    if not sys.stdin.isatty():
        raise ValueError(f"refusing to {what} without --yes (no terminal to ask)")
    return input(question).strip().lower() in ("y", "yes")


def counter(label: str) -> Callable[[int, int], None]:
    """Progress on stderr: a rewritten line on a terminal, a line every 100 otherwise."""
    tty = sys.stderr.isatty()

    def show(done: int, kept: int) -> None:
        if tty:
            sys.stderr.write(f"\r{label} {done} (left in queue: {kept})")
        elif done % 100 == 0:
            sys.stderr.write(f"{label} {done} (left in queue: {kept})\n")
        sys.stderr.flush()

    return show


class Unreachable(Exception):
    """A dependency tally could not use, said the way an operator can act on: what, where,
    which setting points at it, and what to do."""


def _address(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or ''}".rstrip(":")


def database_problem(exc: BaseException, settings: Settings) -> Unreachable | None:
    """``exc`` as an :class:`Unreachable` if it says the database is missing or unreachable."""
    where, name = _address(settings.database_url), urlsplit(settings.database_url).path.lstrip("/")
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return Unreachable(
            f"database '{name}' does not exist on PostgreSQL at {where} (TALLY_DATABASE_URL): "
            "run 'tally migrate' to create it"
        )
    if isinstance(exc, asyncpg.UndefinedTableError):
        return Unreachable(f"database '{name}' at {where} has no tally schema, or an old one: run 'tally migrate'")
    if isinstance(
        exc, (OSError, TimeoutError, asyncpg.CannotConnectNowError, asyncpg.InvalidAuthorizationSpecificationError)
    ):
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        return Unreachable(
            f"cannot reach PostgreSQL at {where} ({reason}; TALLY_DATABASE_URL="
            f"{redact_dsn(settings.database_url)}): is it running? Start it, or point "
            "TALLY_DATABASE_URL at it"
        )
    return None


def broker_problem(exc: BaseException, settings: Settings) -> Unreachable:
    from service.infra.broker import broker_urls

    return Unreachable(
        f"cannot reach RabbitMQ at {', '.join(_address(u) for u in broker_urls(settings.amqp_url))} "
        f"({type(exc).__name__}; TALLY_AMQP_URL={','.join(redact_dsn(u) for u in broker_urls(settings.amqp_url))}): "
        "is it running? Start it, or point "
        "TALLY_AMQP_URL at it"
    )


async def with_connection(settings: Settings, work: Callable[[Connection], Awaitable[int]]) -> int:
    """``work`` on a connection of its own, with a missing or unreachable database said as
    :class:`Unreachable`."""
    try:
        conn = await asyncpg.connect(settings.database_url, timeout=settings.db_connect_timeout)
    except Exception as exc:
        problem = database_problem(exc, settings)
        if problem is None:
            raise
        raise problem from exc
    try:
        return await work(conn)
    except asyncpg.UndefinedTableError as exc:
        raise database_problem(exc, settings) or exc from exc
    finally:
        await conn.close()


@asynccontextmanager
async def broker(settings: Settings) -> AsyncIterator[None]:
    """Broker failures in the block as :class:`Unreachable`."""
    import aio_pika

    try:
        yield
    except (OSError, TimeoutError, aio_pika.exceptions.AMQPConnectionError) as exc:
        raise broker_problem(exc, settings) from exc
