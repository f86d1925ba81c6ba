"""API keys and who a request acts for, as the domain states them.

A key is ``<client_key>.<client_secret>``: the client key (``tly_`` and 12 hex digits) is a
lookup handle stored in clear; the secret (32 random bytes) is stored only as its SHA-256.
A plain hash is right here, unlike for passwords: the secret is random and long, so there
is nothing to brute-force. The header pair ``x-client-key`` / ``x-client-secret`` is the same
credential split in two. Where keys and organizations are kept is service/store/auth.py.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import NamedTuple
from uuid import UUID
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from service.domain.errors import Forbidden, OtherEnvironment, Unauthenticated

SCOPES = ("read", "write", "admin", "ops")
# 'admin' implies the scopes of its own organization; 'ops' (broker-wide queue statistics,
# which show every tenant's traffic) is never implied and is granted only explicitly.
ORGANIZATION_SCOPES = ("read", "write", "admin")
CLIENT_KEY_PREFIX = "tly_"
# NOTIFY channel of key changes, for API processes that hold the live keys in memory
# (service/api/keycache.py): a revocation's payload is the client key, a creation's the client
# key after CREATED_MARK. Each is sent in the change's own transaction, so it is heard as the
# change commits.
KEYS_CHANNEL = "tally_keys"
CREATED_MARK = "+"


@dataclass(frozen=True)
class Principal:
    """Who a request acts for, resolved from an API key."""

    organization_id: UUID
    organization_name: str
    client_key: str
    scopes: frozenset[str]
    environment: str

    def require(self, scope: str) -> None:
        implied = "admin" in self.scopes and scope in ORGANIZATION_SCOPES
        if scope not in self.scopes and not implied:
            raise Forbidden(f"this key lacks the '{scope}' scope")

    def environment_for(self, named: str | None, field: str = "environment") -> str:
        """The environment a request acts in: the key's. Naming it is allowed; naming the
        other one is OtherEnvironment (a key reaches its own environment only)."""
        if named is not None and named != self.environment:
            raise OtherEnvironment(field, self.environment, named)
        return self.environment


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


def as_uuid(text: str) -> UUID | None:
    """``text`` as a UUID if it reads as one (in any form Python accepts), else None."""
    try:
        return UUID(text)
    except (ValueError, TypeError, AttributeError):
        return None


def check_organization_name(name: str) -> None:
    """Refuse a name that reads as a UUID: wherever an organization is named (events, keys,
    the CLI), text that reads as a UUID is its id, so such a name could never be addressed
    and, before ids won, could take over the organization whose id it spells."""
    if as_uuid(name) is not None:
        raise ValueError(f"organization name '{name}' reads as a UUID; choose a name that does not")
    if not 1 <= len(name) <= 200 or not name.strip():
        raise ValueError("an organization name has 1 to 200 characters, not only spaces")


class Organization(NamedTuple):
    """An organization as the fold and the CLI resolve it."""

    id: UUID
    name: str
    time_zone: str  # IANA name: its days, calendar months and budget periods


def check_time_zone(name: str) -> ZoneInfo:
    """The zone an IANA name (``Europe/Berlin``, ``UTC``) names; ValueError for any other text.
    Fixed offsets (``+02:00``) are refused: a place's offset changes with daylight saving, and
    a report's days should follow the place."""
    if not 1 <= len(name) <= 64 or name != name.strip() or name.startswith(("+", "-")) or name.lower() == "localtime":
        raise ValueError(f"time zone '{name}' is not an IANA time zone name such as Europe/Berlin or UTC")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"time zone '{name}' is not an IANA time zone name such as Europe/Berlin or UTC") from None


@dataclass(frozen=True)
class LiveKey:
    """A live key as a process may hold it in memory: only the hash of its secret."""

    secret_hash: bytes
    principal: Principal

    def verify(self, secret: str) -> Principal | None:
        """The principal if ``secret`` is this key's (compared in constant time), else None."""
        return self.principal if hmac.compare_digest(self.secret_hash, hash_secret(secret)) else None
