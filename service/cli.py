"""The ``tally`` command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

from service import __version__
from service.core import auth
from service.core.db import Connection
from service.core.errors import DomainError
from service.core.vocabulary import ENVIRONMENTS
from service.infra import logs
from service.infra.migrate import MigrationError, migrate
from service.infra.settings import Settings

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


async def _with_conn(settings: Settings, work: Callable[[asyncpg.Connection], Awaitable[int]]) -> int:
    conn = await asyncpg.connect(settings.database_url, timeout=settings.db_connect_timeout)
    try:
        return await work(conn)
    finally:
        await conn.close()


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


async def cmd_orgs_list(args: argparse.Namespace, settings: Settings) -> int:
    async def work(conn: Connection) -> int:
        rows = await conn.fetch("SELECT id, name, created_at FROM organizations ORDER BY name")
        if args.json:
            _print_json([dict(r) for r in rows])
        else:
            for r in rows:
                print(f"{r['name']}\t{r['id']}\t{r['created_at']:%Y-%m-%d}")
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
        org_id, _ = await auth.find_organization(conn, args.org)
        rows = await conn.fetch(
            "SELECT prefix AS client_key, scopes, environment, name, created_at, revoked_at"
            " FROM api_keys WHERE organization_id = $1 ORDER BY created_at",
            org_id,
        )
        if args.json:
            _print_json([dict(r) for r in rows])
        else:
            for r in rows:
                state = "revoked" if r["revoked_at"] else "live"
                print(f"{r['client_key']}\t{','.join(r['scopes'])}\t{r['environment']}\t{state}\t{r['name'] or ''}")
        return 0

    return await _with_conn(settings, work)


def _serve(app: web.Application, settings: Settings, host: str, port: int) -> int:
    """Serve until SIGTERM, then drain (service/web/server.py: tally's limits on aiohttp)."""
    from service.web.server import serve

    _install_uvloop()
    serve(app, settings, host, port)
    return 0


def cmd_api(args: argparse.Namespace, settings: Settings) -> int:
    from service.api.app import create_app

    return _serve(create_app(settings), settings, settings.http_host, settings.http_port)


def cmd_consume(args: argparse.Namespace, settings: Settings) -> int:
    """The consumer, with /healthz, /readyz and /metrics on TALLY_CONSUMER_HTTP_PORT."""
    from consumers.app import create_consumer_app

    return _serve(create_consumer_app(settings), settings, settings.http_host, settings.consumer_http_port)


def cmd_dev(args: argparse.Namespace, settings: Settings) -> int:
    """The API and the consumer in one process: the laptop default."""
    from consumers.app import add_consumer
    from service.api.app import create_app

    app = create_app(settings)
    add_consumer(app)
    return _serve(app, settings, settings.http_host, settings.http_port)


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
    from service.infra.queues import queue_stats

    stats = await queue_stats(settings.amqp_url, settings.amqp_management_url, Names(settings.amqp_namespace))
    if args.json:
        _print_json([s.model_dump() for s in stats])
        return 0
    print(f"{'queue':<24} {'ready':>9} {'unacked':>9} {'consumers':>9} {'publish/s':>10} {'deliver/s':>10}")
    for s in stats:
        print(
            f"{s.name:<24} {s.ready:>9} {_cell(s.unacknowledged, 'd'):>9} {s.consumers:>9} "
            f"{_cell(s.publish_rate, '.1f'):>10} {_cell(s.deliver_rate, '.1f'):>10}"
        )
    if stats and stats[0].source == "amqp":
        print("(management API unreachable: unacked and rates need it; see TALLY_AMQP_MANAGEMENT_URL)")
    return 0


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
    from consumers.deadletters import DeadLetters
    from service.infra.broker import Names

    async with DeadLetters(settings.amqp_url, Names(settings.amqp_namespace)) as dlq:
        if args.dlq_command == "list":
            infos = await dlq.list(limit=args.limit, reason=args.reason)
            if args.json:
                _print_json([i.as_dict() for i in infos])
            else:
                for i in infos:
                    print(
                        f"{i.first_death or '-':<32} {i.event_type or '-':<22} {i.event_id or '-':<38} "
                        f"{i.organization or '-':<20} {i.reason}"
                    )
                print(f"{len(infos)} dead letter(s) shown", file=sys.stderr)
            return 0
        if args.dlq_command == "replay":
            replayed, kept = await dlq.replay(reason=args.reason, limit=args.limit, progress=_counter("replayed"))
            print(f"\nreplayed {replayed}, left {kept} in {dlq.names.dead}", file=sys.stderr)
            return 0
        if not args.yes:
            if not sys.stdin.isatty():
                print("tally: refusing to purge without --yes (no terminal to ask)", file=sys.stderr)
                return 2
            scope = f"matching '{args.reason}'" if args.reason else "ALL"
            if input(f"Delete {scope} dead letters in {dlq.names.dead}? [y/N] ").strip().lower() not in ("y", "yes"):
                print("nothing purged")
                return 1
        purged, kept = await dlq.purge(reason=args.reason, progress=_counter("purged"))
        print(f"\npurged {purged}, left {kept} in {dlq.names.dead}", file=sys.stderr)
        return 0


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tally", description="Customer read-model service.")
    parser.add_argument("--version", action="version", version=f"tally {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("migrate", help="create the database if missing and apply migrations").set_defaults(run=cmd_migrate)
    sub.add_parser("api", help="serve the HTTP API").set_defaults(sync=cmd_api)
    sub.add_parser("consume", help="run the event consumer (health on TALLY_CONSUMER_HTTP_PORT)").set_defaults(
        sync=cmd_consume
    )
    sub.add_parser("dev", help="API and consumer in one process (laptop default)").set_defaults(sync=cmd_dev)

    demo = sub.add_parser("demo", help="publish a realistic synthetic event stream (prints a read key)")
    demo.add_argument("--orgs", type=int, default=3, help="organizations, 1-5 (default 3)")
    demo.add_argument("--customers", type=int, default=3000, help="customers (default 3000)")
    demo.add_argument("--events", type=int, default=100_000, help="usage events (default 100000)")
    demo.add_argument("--days", type=int, default=21, help="days of history (default 21)")
    demo.add_argument("--batch", type=int, default=500, help="events per broker message (default 500)")
    demo.add_argument("--seed", type=int, default=7)
    demo.set_defaults(run=cmd_demo)

    queues = sub.add_parser("queues", help="depth, consumers and rates of the ingest and dead-letter queues")
    queues.add_argument("--json", action="store_true")
    queues.set_defaults(run=cmd_queues)

    dlq = sub.add_parser("dlq", help="dead letters: list, replay, purge").add_subparsers(
        dest="dlq_command", required=True
    )
    dl = dlq.add_parser("list", help="reason, event type, id, organization, first death time")
    dl.add_argument("--limit", type=int, default=100)
    dl.add_argument("--reason", help="only those whose reason contains this text")
    dl.add_argument("--json", action="store_true")
    dl.set_defaults(run=cmd_dlq)
    dr = dlq.add_parser("replay", help="re-publish to the events exchange (deduped: never double counts)")
    dr.add_argument("--reason", help="only those whose reason contains this text")
    dr.add_argument("--limit", type=int, help="at most this many")
    dr.set_defaults(run=cmd_dlq)
    dp = dlq.add_parser("purge", help="delete dead letters (asks first unless --yes)")
    dp.add_argument("--reason", help="only those whose reason contains this text")
    dp.add_argument("--yes", action="store_true")
    dp.set_defaults(run=cmd_dlq)

    orgs = sub.add_parser("orgs", help="organizations").add_subparsers(dest="orgs_command", required=True)
    create = orgs.add_parser("create", help="create an organization")
    create.add_argument("name")
    create.add_argument("--json", action="store_true")
    create.set_defaults(run=cmd_orgs_create)
    listing = orgs.add_parser("list", help="list organizations")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=cmd_orgs_list)

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    kc = keys.add_parser("create", help="create a key; it is printed once, on the last line")
    kc.add_argument("--org", required=True, help="organization name or id")
    kc.add_argument("--scopes", default="read", help="comma-separated: read,write,admin (default read)")
    kc.add_argument("--environment", default="prod", choices=ENVIRONMENTS)
    kc.add_argument("--name", help="a label for the key")
    kc.add_argument("--json", action="store_true", help="print one JSON object (key, client_key, client_secret)")
    kc.set_defaults(run=cmd_keys_create)
    kr = keys.add_parser("revoke", help="revoke a key by its client key (tly_…)")
    kr.add_argument("client_key")
    kr.set_defaults(run=cmd_keys_revoke)
    kl = keys.add_parser("list", help="list an organization's keys (never the secrets)")
    kl.add_argument("--org", required=True)
    kl.add_argument("--json", action="store_true")
    kl.set_defaults(run=cmd_keys_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"tally: cannot reach a dependency: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
