"""The publisher binding's organizations, resolved from the database (the rules are
service/domain/publishers.py's)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from service.domain.publishers import ANY_ORGANIZATION, PublisherBinding
from service.store.db import Connection

ORGANIZATIONS = """
SELECT id::text, name FROM organizations WHERE name = ANY($1::text[]) OR id::text = ANY($1::text[])
"""


async def load_binding(
    conn: Connection, configured: Mapping[str, Sequence[str]], own_users: Iterable[str]
) -> PublisherBinding:
    """The binding ``configured`` describes (user → organization names or ids, or ``*``),
    each organization known by both its name and its id, with ``own_users`` unrestricted.
    Disabled (nothing is checked) when nothing is configured. Organizations that do not exist
    yet are kept as listed, so that one created later by that name matches at once; the
    caller loads the binding again to learn the id of one created since."""
    if not configured:
        return PublisherBinding({})
    listed = sorted({org for orgs in configured.values() for org in orgs if org != ANY_ORGANIZATION})
    aliases: dict[str, set[str]] = {org: {org} for org in listed}
    for row in await conn.fetch(ORGANIZATIONS, listed):
        both = {row["id"], row["name"]}
        for key in both:
            aliases.setdefault(key, set()).update(both)
    unrestricted = {user for user, orgs in configured.items() if ANY_ORGANIZATION in orgs} | set(own_users)
    organizations = {
        user: frozenset(alias for org in orgs if org != ANY_ORGANIZATION for alias in aliases.get(org, {org}))
        for user, orgs in configured.items()
        if user not in unrestricted
    }
    return PublisherBinding(organizations, frozenset(unrestricted))
