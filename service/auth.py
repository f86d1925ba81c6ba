"""Organizations and API keys.

A key is ``<client_key>.<client_secret>``: the client key (``tly_`` and 12 hex digits) is a
lookup handle stored in clear; the secret (32 random bytes) is stored only as its SHA-256.
A plain hash is right here, unlike for passwords: the secret is random and long, so there
is nothing to brute-force. The header pair ``x-client-key`` / ``x-client-secret`` is the same
credential split in two.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from uuid import UUID

import asyncpg

from service.errors import Conflict, Forbidden, NotFound, Unauthenticated

SCOPES = ("read", "write", "admin")
ENVIRONMENTS = ("prod", "test")
CLIENT_KEY_PREFIX = "tly_"
# NOTIFY channel on which a revocation names the client key, so API processes caching
# verified keys (service/api/keycache.py) drop it as the revocation commits.
KEYS_CHANNEL = "tally_keys"

# Compared against when a client key is unknown, so that an unknown key and a wrong secret
# take the same time.
_DUMMY_HASH = hashlib.sha256(b"tally-no-such-key").digest()


@dataclass(frozen=True)
class Principal:
    """Who a request acts for, resolved from an API key."""

    organization_id: UUID
    organization_name: str
    client_key: str
    scopes: frozenset[str]
    environment: str

    def require(self, scope: str) -> None:
        if scope not in self.scopes and "admin" not in self.scopes:
            raise Forbidden(f"this key lacks the '{scope}' scope")


@dataclass(frozen=True)
class NewKey:
    client_key: str
    client_secret: str
    organization_id: UUID
    scopes: tuple[str, ...]
    environment: str

    @property
    def key(self) -> str:
        return f"{self.client_key}.{self.client_secret}"


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def split_bearer(key: str) -> tuple[str, str]:
    """``(client_key, client_secret)`` of a bearer key; raises Unauthenticated if malformed."""
    client_key, dot, secret = key.partition(".")
    if not dot or not client_key.startswith(CLIENT_KEY_PREFIX) or not secret:
        raise Unauthenticated("malformed API key")
    return client_key, secret


INSERT_ORG = "INSERT INTO organizations (name) VALUES ($1) RETURNING id"
SELECT_ORG = "SELECT id, name FROM organizations WHERE name = $1 OR id::text = $1"


async def create_organization(conn: asyncpg.Connection, name: str) -> UUID:
    """Create an organization; Conflict if the name is taken."""
    try:
        return await conn.fetchval(INSERT_ORG, name)
    except asyncpg.UniqueViolationError:
        raise Conflict(f"organization '{name}' already exists") from None


async def find_organization(conn: asyncpg.Connection, name_or_id: str) -> tuple[UUID, str]:
    row = await conn.fetchrow(SELECT_ORG, name_or_id)
    if row is None:
        raise NotFound(f"no organization named '{name_or_id}'")
    return row["id"], row["name"]


INSERT_KEY = """
INSERT INTO api_keys (prefix, organization_id, secret_hash, scopes, environment, name)
VALUES ($1, $2, $3, $4, $5, $6)
"""


async def create_key(
    conn: asyncpg.Connection,
    organization: str,
    scopes: tuple[str, ...],
    environment: str = "prod",
    name: str | None = None,
) -> NewKey:
    """Make a key for ``organization`` (name or id). The secret is returned once, never stored."""
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise ValueError(f"scopes must be a non-empty subset of {', '.join(SCOPES)}")
    if environment not in ENVIRONMENTS:
        raise ValueError(f"environment must be one of {', '.join(ENVIRONMENTS)}")
    org_id, _ = await find_organization(conn, organization)
    client_key = CLIENT_KEY_PREFIX + secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    await conn.execute(INSERT_KEY, client_key, org_id, hash_secret(secret), list(scopes), environment, name)
    return NewKey(client_key, secret, org_id, tuple(scopes), environment)


REVOKE_KEY = "UPDATE api_keys SET revoked_at = now() WHERE prefix = $1 AND revoked_at IS NULL"


async def revoke_key(conn: asyncpg.Connection, client_key: str) -> None:
    """Revoke a key by its client key (the part before the dot); NotFound if none is live.
    Listeners on KEYS_CHANNEL hear of it when the revocation commits."""
    client_key = client_key.partition(".")[0]
    async with conn.transaction():
        if await conn.execute(REVOKE_KEY, client_key) == "UPDATE 0":
            raise NotFound(f"no live key {client_key}")
        await conn.execute("SELECT pg_notify($1, $2)", KEYS_CHANNEL, client_key)


SELECT_KEY = """
SELECT k.organization_id, o.name, k.secret_hash, k.scopes, k.environment
FROM api_keys k JOIN organizations o ON o.id = k.organization_id
WHERE k.prefix = $1 AND k.revoked_at IS NULL
"""


async def authenticate(conn: asyncpg.Connection, client_key: str, secret: str) -> Principal:
    """The principal of a live key; Unauthenticated for unknown, revoked or wrong secrets."""
    row = await conn.fetchrow(SELECT_KEY, client_key) if client_key.startswith(CLIENT_KEY_PREFIX) else None
    stored = row["secret_hash"] if row else _DUMMY_HASH
    # Constant-time comparison: the time taken says nothing about how much of it matched.
    if not hmac.compare_digest(stored, hash_secret(secret)) or row is None:
        raise Unauthenticated("invalid or revoked API key")
    return Principal(
        organization_id=row["organization_id"],
        organization_name=row["name"],
        client_key=client_key,
        scopes=frozenset(row["scopes"]),
        environment=row["environment"],
    )
