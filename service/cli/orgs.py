"""``tally orgs`` and ``tally keys``: organizations and their API keys (the SQL is
service/store/auth.py's)."""

from __future__ import annotations

import argparse

from service.cli.common import JSON_HELP, print_json, table, with_connection
from service.domain.vocabulary import ENVIRONMENTS
from service.infra.settings import Settings
from service.store import auth
from service.store.db import Connection


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    orgs = commands.add_parser("orgs", help="organizations").add_subparsers(
        dest="orgs_command", required=True, metavar="ACTION"
    )
    create = orgs.add_parser("create", help="create an organization")
    create.add_argument("name", help="its name (1-200 characters, not a UUID)")
    create.add_argument(
        "--time-zone",
        default="UTC",
        help="its reporting time zone, an IANA name such as Europe/Berlin (default UTC): "
        "its days, months and budget periods",
    )
    create.add_argument("--json", action="store_true", help="print the new organization as JSON")
    create.set_defaults(run=cmd_orgs_create)
    zone = orgs.add_parser(
        "set-time-zone",
        help="change an organization's reporting time zone (days already folded keep theirs)",
    )
    zone.add_argument("org", help="organization name or id")
    zone.add_argument("time_zone", help="an IANA name such as Europe/Berlin, or UTC")
    zone.add_argument("--json", action="store_true", help="print the organization as JSON")
    zone.set_defaults(run=cmd_orgs_set_time_zone)
    listing = orgs.add_parser("list", help="organizations with their customers and live keys")
    listing.add_argument("--json", action="store_true", help=JSON_HELP)
    listing.set_defaults(run=cmd_orgs_list)

    keys = commands.add_parser("keys", help="API keys").add_subparsers(
        dest="keys_command", required=True, metavar="ACTION"
    )
    create_key = keys.add_parser("create", help="create a key; it is printed once, on the last line")
    create_key.add_argument("--org", required=True, help="organization name or id")
    create_key.add_argument("--scopes", default="read", help="comma-separated: read, write, admin, ops (default read)")
    create_key.add_argument("--environment", default="prod", choices=ENVIRONMENTS, help="the key's default environment")
    create_key.add_argument("--name", help="a label for the key")
    create_key.add_argument(
        "--json", action="store_true", help="print one JSON object (key, client_key, client_secret)"
    )
    create_key.set_defaults(run=cmd_keys_create)
    revoke = keys.add_parser("revoke", help="revoke a key by its client key (tly_…)")
    revoke.add_argument("client_key", help="the key's client key (tly_ and 12 hex digits) or the whole key")
    revoke.set_defaults(run=cmd_keys_revoke)
    listing = keys.add_parser("list", help="an organization's keys (never the secrets)")
    listing.add_argument("--org", required=True, help="organization name or id")
    listing.add_argument("--json", action="store_true", help=JSON_HELP)
    listing.set_defaults(run=cmd_keys_list)


async def cmd_orgs_create(args: argparse.Namespace, settings: Settings) -> int:
    async def work(conn: Connection) -> int:
        org_id = await auth.create_organization(conn, args.name, args.time_zone)
        if args.json:
            print_json({"id": org_id, "name": args.name, "time_zone": args.time_zone})
        else:
            print(f"created organization {args.name} ({org_id}), reporting in {args.time_zone}")
        return 0

    return await with_connection(settings, work)


async def cmd_orgs_set_time_zone(args: argparse.Namespace, settings: Settings) -> int:
    async def work(conn: Connection) -> int:
        org = await auth.set_time_zone(conn, args.org, args.time_zone)
        if args.json:
            print_json(org._asdict())
        else:
            print(
                f"organization {org.name} now reports in {org.time_zone}: new events, budget periods and "
                "'today' follow it; days already folded keep the day they were folded on"
            )
        return 0

    return await with_connection(settings, work)


async def cmd_orgs_list(args: argparse.Namespace, settings: Settings) -> int:
    async def work(conn: Connection) -> int:
        rows = await auth.organizations(conn)
        if args.json:
            print_json([dict(r) for r in rows])
        else:
            table(
                ["NAME", "TIME ZONE", "CUSTOMERS", "LIVE KEYS", "CREATED", "ID"],
                [
                    [r["name"], r["time_zone"], r["customers"], r["keys"], f"{r['created_at']:%Y-%m-%d}", r["id"]]
                    for r in rows
                ],
            )
        return 0

    return await with_connection(settings, work)


async def cmd_keys_create(args: argparse.Namespace, settings: Settings) -> int:
    scopes = tuple(s.strip() for s in args.scopes.split(",") if s.strip())

    async def work(conn: Connection) -> int:
        key = await auth.create_key(conn, args.org, scopes, args.environment, args.name)
        if args.json:
            print_json(
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

    return await with_connection(settings, work)


async def cmd_keys_revoke(args: argparse.Namespace, settings: Settings) -> int:
    async def work(conn: Connection) -> int:
        await auth.revoke_key(conn, args.client_key)
        print(f"revoked {args.client_key.partition('.')[0]}")
        return 0

    return await with_connection(settings, work)


async def cmd_keys_list(args: argparse.Namespace, settings: Settings) -> int:
    async def work(conn: Connection) -> int:
        org_id, org_name, _ = await auth.find_organization(conn, args.org)
        rows = await auth.keys_of(conn, org_id)
        if args.json:
            print_json([dict(r) for r in rows])
        else:
            print(f"keys of {org_name} ({org_id}); secrets are never shown again")
            table(
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

    return await with_connection(settings, work)
