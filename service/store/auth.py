"""Organizations and API keys in PostgreSQL: created, resolved, revoked, and read back to
verify a request's key (the key format and the principal are service/domain/keys.py's)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from uuid import UUID

import asyncpg

from service.domain.errors import Conflict, NotFound, Unauthenticated
from service.domain.keys import (
    CLIENT_KEY_PREFIX,
    CREATED_MARK,
    KEYS_CHANNEL,
    SCOPES,
    LiveKey,
    NewKey,
    Organization,
    Principal,
    as_uuid,
    check_organization_name,
    check_time_zone,
    hash_secret,
)
from service.domain.vocabulary import ENVIRONMENTS
from service.store.changelog import CHANNEL, notice
from service.store.db import Connection

# Compared against when a client key is unknown, so that an unknown key and a wrong secret
# take the same time.
_DUMMY_HASH = hashlib.sha256(b"tally-no-such-key").digest()

INSERT_ORG = "INSERT INTO organizations (name, time_zone) VALUES ($1, $2) RETURNING id"
SET_TIME_ZONE = "UPDATE organizations SET time_zone = $2 WHERE id = $1"
# Ids win: a UUID-shaped reference is only ever looked up by id, anything else by name.
SELECT_ORGS = "SELECT id, name, time_zone FROM organizations WHERE id = ANY($1::uuid[]) OR name = ANY($2::text[])"


async def create_organization(conn: Connection, name: str, time_zone: str = "UTC") -> UUID:
    """Create an organization reporting in ``time_zone`` (an IANA name); ValueError for a name
    that reads as a UUID or a zone that is not one, Conflict if the name is taken."""
    check_organization_name(name)
    check_time_zone(time_zone)
    try:
        org_id: UUID = await conn.fetchval(INSERT_ORG, name, time_zone)
    except asyncpg.UniqueViolationError:
        raise Conflict(f"organization '{name}' already exists") from None
    except asyncpg.InvalidParameterValueError:
        raise ValueError(f"time zone '{time_zone}' is not known to PostgreSQL") from None
    return org_id


async def set_time_zone(conn: Connection, name_or_id: str, time_zone: str) -> Organization:
    """Change an organization's reporting time zone (ValueError for one that is not an IANA
    name both Python and PostgreSQL know). Days already folded keep the day they were folded
    on; new events, periods and "today" follow the new zone. Every API process is told, as by
    a write to each environment, so that no cached response shows the old zone's periods."""
    check_time_zone(time_zone)
    org = await find_organization(conn, name_or_id)
    try:
        async with conn.transaction():
            await conn.execute(SET_TIME_ZONE, org.id, time_zone)
            for environment in ENVIRONMENTS:
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, notice(org.id, environment))
    except asyncpg.InvalidParameterValueError:
        raise ValueError(f"time zone '{time_zone}' is not known to PostgreSQL") from None
    return org._replace(time_zone=time_zone)


async def resolve_organizations(conn: Connection, references: Iterable[str]) -> dict[str, Organization]:
    """``{reference: organization}`` for the references that name one: a reference that reads
    as a UUID is an id (never a name), any other is a name."""
    refs = set(references)
    by_id = {ref: u for ref in refs if (u := as_uuid(ref)) is not None}
    names = [ref for ref in refs if ref not in by_id]
    rows = [
        Organization(r["id"], r["name"], r["time_zone"])
        for r in await conn.fetch(SELECT_ORGS, list(set(by_id.values())), names)
    ]
    ids = {o.id: o for o in rows}
    named = {o.name: o for o in rows}
    out = {ref: ids[u] for ref, u in by_id.items() if u in ids}
    out.update({ref: named[ref] for ref in names if ref in named})
    return out


async def find_organization(conn: Connection, name_or_id: str) -> Organization:
    """The organization named, or with the id given (ids win); NotFound otherwise."""
    found = (await resolve_organizations(conn, [name_or_id])).get(name_or_id)
    if found is None:
        raise NotFound(f"no organization named '{name_or_id}'")
    return found


# The operator's overview (`tally orgs list`): each organization with its customers (the
# compacted count plus the deltas not yet folded into it) and its live keys.
SELECT_OVERVIEW = """
SELECT o.id, o.name, o.time_zone, o.created_at,
       (SELECT coalesce(sum(delta), 0)::bigint FROM customer_counts n WHERE n.organization_id = o.id) AS customers,
       (SELECT count(*) FROM api_keys k WHERE k.organization_id = o.id AND k.revoked_at IS NULL) AS keys
FROM organizations o ORDER BY o.name
"""
SELECT_NAMES = "SELECT id, name FROM organizations"


async def organizations(conn: Connection) -> list[asyncpg.Record]:
    """Every organization: id, name, time_zone, created_at, customers, keys (live ones), by name."""
    return await conn.fetch(SELECT_OVERVIEW)


async def organization_names(conn: Connection) -> dict[str, str]:
    """Organization id (as text) → name, to show names where messages carry ids."""
    return {str(r["id"]): r["name"] for r in await conn.fetch(SELECT_NAMES)}


INSERT_KEY = """
INSERT INTO api_keys (prefix, organization_id, secret_hash, scopes, environment, name)
VALUES ($1, $2, $3, $4, $5, $6)
"""


async def create_key(
    conn: Connection,
    organization: str,
    scopes: tuple[str, ...],
    environment: str = "prod",
    name: str | None = None,
) -> NewKey:
    """Make a key for ``organization`` (name or id). The secret is returned once, never stored."""
    bad = [scope for scope in scopes if scope not in SCOPES]
    if bad or not scopes:
        raise ValueError(f"scopes must be a non-empty subset of {', '.join(SCOPES)}")
    if environment not in ENVIRONMENTS:
        raise ValueError(f"environment must be one of {', '.join(ENVIRONMENTS)}")
    org_id = (await find_organization(conn, organization)).id
    client_key = CLIENT_KEY_PREFIX + secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    async with conn.transaction():
        await conn.execute(INSERT_KEY, client_key, org_id, hash_secret(secret), list(scopes), environment, name)
        await conn.execute("SELECT pg_notify($1, $2)", KEYS_CHANNEL, CREATED_MARK + client_key)
    return NewKey(client_key, secret, org_id, tuple(scopes), environment)


REVOKE_KEY = "UPDATE api_keys SET revoked_at = now() WHERE prefix = $1 AND revoked_at IS NULL"


async def revoke_key(conn: Connection, client_key: str) -> None:
    """Revoke a key by its client key (the part before the dot); NotFound if none is live.
    Listeners on KEYS_CHANNEL hear of it when the revocation commits."""
    client_key = client_key.partition(".")[0]
    async with conn.transaction():
        if await conn.execute(REVOKE_KEY, client_key) == "UPDATE 0":
            raise NotFound(f"no live key {client_key}")
        await conn.execute("SELECT pg_notify($1, $2)", KEYS_CHANNEL, client_key)


SELECT_KEYS_OF = """
SELECT prefix AS client_key, scopes, environment, name, created_at, revoked_at
FROM api_keys WHERE organization_id = $1 ORDER BY created_at
"""


async def keys_of(conn: Connection, organization_id: UUID) -> list[asyncpg.Record]:
    """An organization's keys, revoked ones included, oldest first (never their secrets:
    only their hashes are stored)."""
    return await conn.fetch(SELECT_KEYS_OF, organization_id)


SELECT_KEY = """
SELECT k.organization_id, o.name, k.secret_hash, k.scopes, k.environment
FROM api_keys k JOIN organizations o ON o.id = k.organization_id
WHERE k.prefix = $1 AND k.revoked_at IS NULL
"""
SELECT_LIVE_KEYS = """
SELECT k.prefix, k.organization_id, o.name, k.secret_hash, k.scopes, k.environment
FROM api_keys k JOIN organizations o ON o.id = k.organization_id
WHERE k.revoked_at IS NULL
ORDER BY k.prefix
LIMIT $1
"""


def _live_key(client_key: str, row: asyncpg.Record) -> LiveKey:
    secret_hash, scopes = row["secret_hash"], row["scopes"]
    assert isinstance(secret_hash, bytes) and isinstance(scopes, list)
    organization_id, name, environment = row["organization_id"], row["name"], row["environment"]
    assert isinstance(organization_id, UUID) and isinstance(name, str) and isinstance(environment, str)
    return LiveKey(secret_hash, Principal(organization_id, name, client_key, frozenset(scopes), environment))


async def live_keys(conn: Connection, limit: int) -> dict[str, LiveKey]:
    """Every live key (at most ``limit``, by client key), by client key."""
    return {r["prefix"]: _live_key(r["prefix"], r) for r in await conn.fetch(SELECT_LIVE_KEYS, limit)}


async def live_key(conn: Connection, client_key: str) -> LiveKey | None:
    """The live key ``client_key`` names, if any."""
    row = await conn.fetchrow(SELECT_KEY, client_key) if client_key.startswith(CLIENT_KEY_PREFIX) else None
    return _live_key(client_key, row) if row is not None else None


async def authenticate(conn: Connection, client_key: str, secret: str) -> Principal:
    """The principal of a live key; Unauthenticated for unknown, revoked or wrong secrets."""
    key = await live_key(conn, client_key)
    stored = key.secret_hash if key is not None else _DUMMY_HASH
    # Constant-time comparison: the time taken says nothing about how much of it matched.
    if not hmac.compare_digest(stored, hash_secret(secret)) or key is None:
        raise Unauthenticated("invalid or revoked API key")
    return key.principal
