"""The ``tally`` command line."""

from __future__ import annotations

import argparse
import asyncio
import errno
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import asyncpg
import orjson

from service import __version__
from service.domain.errors import DomainError
from service.domain.vocabulary import ENVIRONMENTS
from service.infra import logs
from service.infra.migrate import MigrationError, migrate
from service.infra.settings import Settings, redact_dsn
from service.store import auth
from service.store.db import Connection

if TYPE_CHECKING:  # the web stack loads only for the commands that serve
    from aiohttp import web


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    result: int = uvloop.run(coro)
    return result


def _print_json(value: object) -> None:
    sys.stdout.write(orjson.dumps(value, default=str, option=orjson.OPT_INDENT_2).decode() + "\n")


def _table(header: list[str], rows: list[list[object]]) -> None:
    """Rows under a header, columns aligned (``-`` for a missing value)."""
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


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


async def _with_conn(settings: Settings, work: Callable[[asyncpg.Connection], Awaitable[int]]) -> int:
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
async def _broker(settings: Settings) -> AsyncIterator[None]:
    """Broker failures in the block as :class:`Unreachable`."""
    import aio_pika

    try:
        yield
    except (OSError, TimeoutError, aio_pika.exceptions.AMQPConnectionError) as exc:
        raise broker_problem(exc, settings) from exc


async def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    await migrate(settings.database_url, settings.migrations_dir, report=lambda line: print(line, flush=True))
    return 0


async def cmd_orgs_create(args: argparse.Namespace, settings: Settings) -> int:
    async def work(conn: Connection) -> int:
        org_id = await auth.create_organization(conn, args.name)
        if args.json:
            _print_json({"id": org_id, "name": args.name})
        else:
            print(f"created organization {args.name} ({org_id})")
        return 0

    return await _with_conn(settings, work)


ORGANIZATIONS = """
SELECT o.id, o.name, o.created_at,
       (SELECT coalesce(sum(delta), 0)::bigint FROM customer_counts n WHERE n.organization_id = o.id) AS customers,
       (SELECT count(*) FROM api_keys k WHERE k.organization_id = o.id AND k.revoked_at IS NULL) AS keys
FROM organizations o ORDER BY o.name
"""


async def cmd_orgs_list(args: argparse.Namespace, settings: Settings) -> int:
    async def work(conn: Connection) -> int:
        rows = await conn.fetch(ORGANIZATIONS)
        if args.json:
            _print_json([dict(r) for r in rows])
        else:
            _table(
                ["NAME", "CUSTOMERS", "LIVE KEYS", "CREATED", "ID"],
                [[r["name"], r["customers"], r["keys"], f"{r['created_at']:%Y-%m-%d}", r["id"]] for r in rows],
            )
        return 0

    return await _with_conn(settings, work)


async def cmd_keys_create(args: argparse.Namespace, settings: Settings) -> int:
    scopes = tuple(s.strip() for s in args.scopes.split(",") if s.strip())

    async def work(conn: Connection) -> int:
        key = await auth.create_key(conn, args.org, scopes, args.environment, args.name)
        if args.json:
            _print_json(
                {
                    "key": key.key,
                    "client_key": key.client_key,
                    "client_secret": key.client_secret,
                    "organization_id": key.organization_id,
                    "scopes": list(key.scopes),
                    "environment": key.environment,
                }
            )
        else:
            print(f"organization {args.org}, scopes {','.join(scopes)}, environment {args.environment}")
            print(f"client key {key.client_key} (x-client-key); the key is shown once, store it now:")
            print(key.key)
        return 0

    return await _with_conn(settings, work)


async def cmd_keys_revoke(args: argparse.Namespace, settings: Settings) -> int:
    async def work(conn: Connection) -> int:
        await auth.revoke_key(conn, args.client_key)
        print(f"revoked {args.client_key.partition('.')[0]}")
        return 0

    return await _with_conn(settings, work)


async def cmd_keys_list(args: argparse.Namespace, settings: Settings) -> int:
    async def work(conn: Connection) -> int:
        org_id, org_name = await auth.find_organization(conn, args.org)
        rows = await conn.fetch(
            "SELECT prefix AS client_key, scopes, environment, name, created_at, revoked_at"
            " FROM api_keys WHERE organization_id = $1 ORDER BY created_at",
            org_id,
        )
        if args.json:
            _print_json([dict(r) for r in rows])
        else:
            print(f"keys of {org_name} ({org_id}); secrets are never shown again")
            _table(
                ["CLIENT KEY", "SCOPES", "ENVIRONMENT", "STATE", "CREATED", "NAME"],
                [
                    [
                        r["client_key"],
                        ",".join(r["scopes"]),
                        r["environment"],
                        "revoked" if r["revoked_at"] else "live",
                        f"{r['created_at']:%Y-%m-%d}",
                        r["name"],
                    ]
                    for r in rows
                ],
            )
        return 0

    return await _with_conn(settings, work)


def _serve(app: web.Application, settings: Settings, host: str, port: int, setting: str, banner: list[str]) -> int:
    """Serve until SIGTERM, then drain (service/web/server.py: tally's limits on aiohttp).
    ``setting`` names the port's variable, for the message when the port is taken."""
    from service.web.server import serve

    _install_uvloop()
    try:
        serve(app, settings, host, port, banner)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise Unreachable(
                f"port {port} on {host} is in use ({setting}): stop what holds it, or set {setting} to a free port"
            ) from exc
        raise database_problem(exc, settings) or exc from exc
    except asyncpg.PostgresError as exc:
        raise database_problem(exc, settings) or exc from exc
    return 0


def _base_url(settings: Settings, port: int) -> str:
    host = settings.http_host if settings.http_host not in ("0.0.0.0", "::", "") else "localhost"
    return settings.public_url.rstrip("/") if settings.public_url else f"http://{host}:{port}"


def _api_banner(settings: Settings, dev: bool) -> list[str]:
    base = _base_url(settings, settings.http_port)
    lines = [f"tally API: {base} — interactive docs at {base}/docs, OpenAPI at {base}/openapi.json"]
    if dev:
        lines.append(f"consumer (in this process): health, readiness and metrics at {base}/healthz, /readyz, /metrics")
    lines += [
        "next: 'tally orgs create NAME', then 'tally keys create --org NAME --scopes read,write' for a key,",
        "      or 'tally demo' for data at once; 'tally status' shows the queues and dead letters",
    ]
    return lines


def cmd_api(args: argparse.Namespace, settings: Settings) -> int:
    from service.api.app import create_app

    return _serve(
        create_app(settings),
        settings,
        settings.http_host,
        settings.http_port,
        "TALLY_HTTP_PORT",
        _api_banner(settings, dev=False),
    )


def cmd_consume(args: argparse.Namespace, settings: Settings) -> int:
    """The consumer, with /healthz, /readyz and /metrics on TALLY_CONSUMER_HTTP_PORT."""
    from consumers.app import create_consumer_app

    base = _base_url(settings, settings.consumer_http_port)
    banner = [f"tally consumer: health, readiness and metrics at {base}/healthz, /readyz, /metrics"]
    return _serve(
        create_consumer_app(settings),
        settings,
        settings.http_host,
        settings.consumer_http_port,
        "TALLY_CONSUMER_HTTP_PORT",
        banner,
    )


def cmd_dev(args: argparse.Namespace, settings: Settings) -> int:
    """The API and the consumer in one process: the laptop default."""
    from consumers.app import add_consumer
    from service.api.app import create_app

    app = create_app(settings)
    add_consumer(app)
    return _serve(
        app, settings, settings.http_host, settings.http_port, "TALLY_HTTP_PORT", _api_banner(settings, dev=True)
    )


async def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from consumers.demo import run_demo

    return await run_demo(
        settings,
        orgs=args.orgs,
        customers=args.customers,
        events=args.events,
        days=args.days,
        batch=args.batch,
        seed=args.seed,
    )


async def cmd_queues(args: argparse.Namespace, settings: Settings) -> int:
    from service.infra.broker import Names
    from service.infra.queues import queue_report

    async with _broker(settings):
        report = await queue_report(settings.amqp_url, settings.amqp_management_url, Names(settings.amqp_namespace))
    if args.json:
        _print_json([s.model_dump() for s in report.queues])
        return 0
    _queue_table(report.queues)
    if report.management_problem:
        print(
            f"\nunacked and rates are n/a: they come from the RabbitMQ management API, and {report.management_problem}"
        )
    return 0


def _queue_table(stats: list[Any]) -> None:
    _table(
        ["QUEUE", "READY", "UNACKED", "CONSUMERS", "PUBLISH/S", "DELIVER/S"],
        [
            [
                q.name,
                q.ready,
                _cell(q.unacknowledged, "d"),
                q.consumers,
                _cell(q.publish_rate, ".1f"),
                _cell(q.deliver_rate, ".1f"),
            ]
            for q in stats
        ],
    )


def _cell(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _counter(label: str) -> Callable[[int, int], None]:
    """Progress on stderr: a rewritten line on a terminal, a line every 100 otherwise."""
    tty = sys.stderr.isatty()

    def show(done: int, kept: int) -> None:
        if tty:
            sys.stderr.write(f"\r{label} {done} (left in queue: {kept})")
        elif done % 100 == 0:
            sys.stderr.write(f"{label} {done} (left in queue: {kept})\n")
        sys.stderr.flush()

    return show


async def cmd_dlq(args: argparse.Namespace, settings: Settings) -> int:
    async with _broker(settings):
        return await _dlq(args, settings)


async def _organization_names(settings: Settings) -> dict[str, str]:
    """Organization id → name, to show names where messages carry ids (empty if the
    database cannot be reached: the broker tools work without it)."""
    try:
        conn = await asyncpg.connect(settings.database_url, timeout=settings.db_connect_timeout)
    except (OSError, TimeoutError, asyncpg.PostgresError):
        return {}
    try:
        return {str(r["id"]): r["name"] for r in await conn.fetch("SELECT id, name FROM organizations")}
    except asyncpg.PostgresError:
        return {}
    finally:
        await conn.close()


async def _dlq(args: argparse.Namespace, settings: Settings) -> int:
    from consumers.deadletters import DeadLetters
    from service.infra.broker import Names

    async with DeadLetters(settings.amqp_url, Names(settings.amqp_namespace)) as dlq:
        if args.dlq_command == "list":
            infos = await dlq.list(limit=args.limit, reason=args.reason)
            if args.json:
                _print_json([i.as_dict() for i in infos])
            else:
                names = await _organization_names(settings) if infos else {}
                _table(
                    ["DIED AT", "TYPE", "EVENT ID", "ORGANIZATION", "REASON"],
                    [
                        [
                            i.first_death,
                            i.event_type,
                            i.event_id,
                            names.get(i.organization or "", i.organization),
                            i.reason,
                        ]
                        for i in infos
                    ],
                )
                print(f"{len(infos)} dead letter(s) shown", file=sys.stderr)
            return 0
        if args.dlq_command == "replay":
            replayed, kept = await dlq.replay(reason=args.reason, limit=args.limit, progress=_counter("replayed"))
            print(f"\nreplayed {replayed}, left {kept} in {dlq.names.dead}", file=sys.stderr)
            return 0
        scope = f"matching '{args.reason}'" if args.reason else "ALL"
        if not _confirmed(args.yes, f"Delete {scope} dead letters in {dlq.names.dead}? [y/N] ", "purge"):
            print("nothing purged")
            return 1
        purged, kept = await dlq.purge(reason=args.reason, progress=_counter("purged"))
        print(f"\npurged {purged}, left {kept} in {dlq.names.dead}", file=sys.stderr)
        return 0


async def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    """One screen: can tally reach its database (migrated?) and broker; queue depths,
    consumers and rates; the backlog (ready and held unacknowledged by consumers) and how long
    it takes to drain; dead letters; budget alerts waiting for downstream services."""
    from service.infra.broker import ALERTS_MAX_LENGTH, Names
    from service.infra.migrate import pending
    from service.infra.queues import queue_report

    names = Names(settings.amqp_namespace)
    checks: dict[str, str] = {}
    try:
        conn = await asyncpg.connect(settings.database_url, timeout=settings.db_connect_timeout)
        try:
            waiting = await pending(conn, settings.migrations_dir)
        finally:
            await conn.close()
        checks["database"] = "ok" if not waiting else f"{len(waiting)} migration(s) pending: run 'tally migrate'"
    except Exception as exc:
        checks["database"] = f"down: {database_problem(exc, settings) or exc}"
    stats = []
    management: str | None = None
    try:
        report = await queue_report(settings.amqp_url, settings.amqp_management_url, names)
        stats, management = report.queues, report.management_problem
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"down: {broker_problem(exc, settings)}"
    notes = []
    by_name = {q.name: q for q in stats}
    ingest, dead, alerts = by_name.get(names.ingest), by_name.get(names.dead), by_name.get(names.alerts)
    if management and stats:
        notes.append(f"UNACKED and rates are n/a: they come from the RabbitMQ management API, and {management}")
    if ingest is not None:
        if ingest.consumers == 0:
            notes.append(f"no consumer on {names.ingest}: start 'tally consume' (or 'tally dev')")
        notes += backlog_notes(ingest.ready, ingest.unacknowledged, ingest.deliver_rate)
    if dead is not None and dead.ready:
        notes.append(f"{dead.ready} dead letter(s) in {names.dead}: 'tally dlq list' says why")
    if alerts is not None and alerts.ready:
        notes.append(
            f"{alerts.ready} budget alert(s) waiting in {names.alerts} for your services to consume "
            f"(at most {ALERTS_MAX_LENGTH:,} are kept; older ones are dropped)"
        )
    healthy = all(state == "ok" for state in checks.values())
    if args.json:
        _print_json(
            {
                "checks": checks,
                "queues": [q.model_dump() for q in stats],
                "management": management or "ok",
                "notes": notes,
                "ok": healthy,
            }
        )
    else:
        _table(["CHECK", "STATE"], [[name, state] for name, state in checks.items()])
        if stats:
            print()
            _queue_table(stats)
        if notes:
            print()
            for note in notes:
                print(f"- {note}")
    return 0 if healthy else 1


def backlog_notes(ready: int, unacknowledged: int | None, deliver_rate: float | None) -> list[str]:
    """The ingest backlog in messages: ready ones, and those consumers hold unacknowledged
    (prefetched, or in the batch being folded: a backlog can sit there with 0 ready)."""
    if unacknowledged is None:
        held = "plus any held unacknowledged by consumers, which only the management API can count"
        return [f"backlog: {ready} message(s) ready, {held}"] if ready else [f"backlog: 0 ready ({held})"]
    backlog = ready + unacknowledged
    if not backlog:
        return []
    text = f"backlog: {backlog} message(s) ({ready} ready, {unacknowledged} held unacknowledged by consumers)"
    if deliver_rate:
        return [f"{text}, draining at {deliver_rate:.0f}/s (~{backlog / deliver_rate:.0f} s)"]
    return [f"{text}, not draining" if ready else text]


async def cmd_namespace_delete(args: argparse.Namespace, settings: Settings) -> int:
    """Delete a namespace's queues and exchanges (messages in them are lost), after asking."""
    from service.infra.broker import BrokerNodes, Names
    from service.infra.queues import queue_stats

    names = Names(args.namespace or settings.amqp_namespace)
    async with _broker(settings):
        stats = await queue_stats(settings.amqp_url, settings.amqp_management_url, names)
        held = ", ".join(f"{q.name}: {q.ready} message(s), {q.consumers} consumer(s)" for q in stats)
        question = (
            f"Delete namespace '{names.namespace}' ({', '.join((*names.exchanges, *names.queues))}; {held})? "
            "Messages in it are lost. [y/N] "
        )
        if not _confirmed(args.yes, question, "delete a namespace"):
            print("nothing deleted")
            return 1
        connection = await BrokerNodes(settings.amqp_url).connect(timeout=10)
        try:
            for queue in names.queues:
                channel = await connection.channel()
                await channel.queue_delete(queue)
            for exchange in names.exchanges:
                channel = await connection.channel()
                await channel.exchange_delete(exchange)
        finally:
            await connection.close()
    print(f"deleted namespace '{names.namespace}'")
    return 0


def _confirmed(yes: bool, question: str, what: str) -> bool:
    """True with --yes, or when the person at the terminal says so; refuses without one."""
    if yes:
        return True
    if not sys.stdin.isatty():
        raise ValueError(f"refusing to {what} without --yes (no terminal to ask)")
    return input(question).strip().lower() in ("y", "yes")


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


JSON_HELP = "print JSON instead of a table"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tally",
        description="tally: a customer read-model service (events in over RabbitMQ, customer lists out over HTTP).",
        epilog="Start with 'tally migrate', then 'tally dev' (API and consumer in one process) and 'tally demo'. "
        "Settings come from TALLY_* environment variables (docs/configuration.md).",
    )
    parser.add_argument("--version", action="version", version=f"tally {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    migrate_ = sub.add_parser("migrate", help="create the database if missing and apply migrations")
    migrate_.set_defaults(run=cmd_migrate)
    sub.add_parser("api", help="serve the HTTP API (TALLY_HTTP_PORT)").set_defaults(sync=cmd_api)
    sub.add_parser(
        "consume", help="run the event consumer (health and metrics on TALLY_CONSUMER_HTTP_PORT)"
    ).set_defaults(sync=cmd_consume)
    sub.add_parser("dev", help="API and consumer in one process, all on TALLY_HTTP_PORT (laptop default)").set_defaults(
        sync=cmd_dev
    )
    status = sub.add_parser("status", help="database, broker, queues, backlog and dead letters on one screen")
    status.add_argument("--json", action="store_true", help=JSON_HELP)
    status.set_defaults(run=cmd_status)

    demo = sub.add_parser(
        "demo",
        help="publish a synthetic event stream, with a budget alert that fires (prints a write and a read key)",
    )
    demo.add_argument("--orgs", type=int, default=3, help="organizations, 1-5 (default 3)")
    demo.add_argument("--customers", type=int, default=3000, help="customers (default 3000)")
    demo.add_argument("--events", type=int, default=100_000, help="usage events (default 100000)")
    demo.add_argument("--days", type=int, default=21, help="days of history (default 21)")
    demo.add_argument("--batch", type=int, default=500, help="events per broker message (default 500)")
    demo.add_argument(
        "--seed", type=int, default=7, help="random seed: the same seed gives the same stream (default 7)"
    )
    demo.set_defaults(run=cmd_demo)

    queues = sub.add_parser("queues", help="depth, consumers and rates of the ingest and dead-letter queues")
    queues.add_argument("--json", action="store_true", help=JSON_HELP)
    queues.set_defaults(run=cmd_queues)

    dlq = sub.add_parser("dlq", help="dead letters: list, replay, purge").add_subparsers(
        dest="dlq_command", required=True, metavar="ACTION"
    )
    reason_help = (
        "only letters whose reason contains this text (case-insensitive), or whose reason code it is "
        "(unknown_organization, unroutable, ...)"
    )
    dl = dlq.add_parser("list", help="reason, event type, id, organization, time of death")
    dl.add_argument("--limit", type=int, default=100, help="show at most this many (default 100)")
    dl.add_argument("--reason", help=reason_help)
    dl.add_argument("--json", action="store_true", help=JSON_HELP)
    dl.set_defaults(run=cmd_dlq)
    dr = dlq.add_parser(
        "replay",
        help="re-publish to the events exchange (deduped: never double counts); forbidden_publisher "
        "letters only with --reason",
    )
    dr.add_argument("--reason", help=reason_help)
    dr.add_argument("--limit", type=int, help="replay at most this many")
    dr.set_defaults(run=cmd_dlq)
    dp = dlq.add_parser("purge", help="delete dead letters (asks first unless --yes)")
    dp.add_argument("--reason", help=reason_help)
    dp.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    dp.set_defaults(run=cmd_dlq)

    namespace = sub.add_parser("namespace", help="the broker namespace (TALLY_AMQP_NAMESPACE)").add_subparsers(
        dest="namespace_command", required=True, metavar="ACTION"
    )
    nd = namespace.add_parser("delete", help="delete a namespace's queues and exchanges (asks first unless --yes)")
    nd.add_argument("--namespace", help="which one (default: TALLY_AMQP_NAMESPACE)")
    nd.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    nd.set_defaults(run=cmd_namespace_delete)

    orgs = sub.add_parser("orgs", help="organizations").add_subparsers(
        dest="orgs_command", required=True, metavar="ACTION"
    )
    create = orgs.add_parser("create", help="create an organization")
    create.add_argument("name", help="its name (1-200 characters, not a UUID)")
    create.add_argument("--json", action="store_true", help="print the new organization as JSON")
    create.set_defaults(run=cmd_orgs_create)
    listing = orgs.add_parser("list", help="organizations with their customers and live keys")
    listing.add_argument("--json", action="store_true", help=JSON_HELP)
    listing.set_defaults(run=cmd_orgs_list)

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    kc = keys.add_parser("create", help="create a key; it is printed once, on the last line")
    kc.add_argument("--org", required=True, help="organization name or id")
    kc.add_argument("--scopes", default="read", help="comma-separated: read, write, admin, ops (default read)")
    kc.add_argument("--environment", default="prod", choices=ENVIRONMENTS, help="the key's default environment")
    kc.add_argument("--name", help="a label for the key")
    kc.add_argument("--json", action="store_true", help="print one JSON object (key, client_key, client_secret)")
    kc.set_defaults(run=cmd_keys_create)
    kr = keys.add_parser("revoke", help="revoke a key by its client key (tly_…)")
    kr.add_argument("client_key", help="the key's client key (tly_ and 12 hex digits) or the whole key")
    kr.set_defaults(run=cmd_keys_revoke)
    kl = keys.add_parser("list", help="an organization's keys (never the secrets)")
    kl.add_argument("--org", required=True, help="organization name or id")
    kl.add_argument("--json", action="store_true", help=JSON_HELP)
    kl.set_defaults(run=cmd_keys_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    settings = Settings()
    logs.configure(settings.log_level, settings.log_format)
    try:
        if hasattr(args, "sync"):
            result: int = args.sync(args, settings)
            return result
        return _run(args.run(args, settings))
    except (DomainError, MigrationError, ValueError) as exc:
        print(f"tally: {exc}", file=sys.stderr)
        return 2
    except Unreachable as exc:
        print(f"tally: {exc}", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError) as exc:
        problem = database_problem(exc, settings)
        print(f"tally: {problem or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
