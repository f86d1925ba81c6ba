"""Which AMQP users may publish events for which organizations: the optional publisher
binding (``TALLY_AMQP_PUBLISHERS``).

An event names its organization itself, so without a binding anyone holding broker
credentials that may write to the events exchange writes any organization's events. With
one, the consumer checks each event's organization against the AMQP user that published
it. That user is the message's ``user_id`` property, which RabbitMQ validates: a connection
may set it only to the user it authenticated as (else the broker closes the channel), so the
consumer can trust it. A message without ``user_id`` has no publisher the consumer can name
and is refused too; tally's own publishers set it.

The rules, as a pure decision (:meth:`PublisherBinding.permits`) over organizations resolved
once from the database (service/store/publishers.py ``load_binding``):

- no binding configured: every publisher may write every organization;
- a user listed with ``*``, or one of tally's own AMQP users (those of TALLY_AMQP_URL: the API
  publishes for the organization of the key it was given, the dead-letter replay re-publishes
  what was refused): any organization;
- a user listed with organizations (names or ids): those, whichever of the two the event uses;
- anyone else, and a message without ``user_id``: none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

ANY_ORGANIZATION = "*"


@dataclass(frozen=True)
class PublisherBinding:
    """AMQP users and the organizations (names and ids alike) each may publish events for."""

    organizations: Mapping[str, frozenset[str]]
    # Users that may publish for any organization: listed with "*", and tally's own.
    unrestricted: frozenset[str] = frozenset()

    @property
    def enabled(self) -> bool:
        return bool(self.organizations) or bool(self.unrestricted)

    def permits(self, user_id: str | None, organization: str) -> bool:
        """Whether a message published by ``user_id`` may carry an event of ``organization``
        (its name or id, as the event gives it)."""
        if not self.enabled:
            return True
        if user_id is None:
            return False
        return user_id in self.unrestricted or organization in self.organizations.get(user_id, frozenset())

    def refusal(self, user_id: str | None, organization: str) -> str:
        """Why :meth:`permits` said no, for the dead letter."""
        if user_id is None:
            return (
                "forbidden publisher: the message has no user_id property, and publishers are bound to "
                "organizations (TALLY_AMQP_PUBLISHERS): set user_id to the AMQP user you connect as"
            )
        return f"forbidden publisher: AMQP user '{user_id}' may not publish events for organization '{organization}'"
