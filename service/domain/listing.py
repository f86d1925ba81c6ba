"""The customer list query as the domain states it: what may be sorted and filtered on, how a
client's filter values are typed and bounded, the query object every list route builds, and the
signed cursors that continue it. Pure: no SQL here — service/store/listing.py turns a
:class:`ListQuery` into one statement, taking only the names these allow-lists admit.

Sorting is keyset-friendly: each sort field is unique together with the customer's id, so a
cursor (a :class:`Position`) is a row comparison on that pair, at constant cost at any depth.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, date, datetime
from decimal import Decimal
from functools import cached_property
from uuid import UUID

import orjson

from service.domain.errors import InvalidInput
from service.domain.profile import parse_instant

# The fields a list may be sorted by (each has a keyset index: service/store/listing.py).
SORT_FIELD_NAMES = (
    "customer_identifier",
    "name",
    "email",
    "status",
    "created_at",
    "updated_at",
    "first_seen",
    "last_active",
    "active_days",
    "number_of_requests",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "total_cost",
    "average_latency",
    "average_ttft",
    "total_budget",
    "period_budget",
)

MAX_LIMIT = 1000

# Fields a generic condition may filter on, and the kind of value each takes (the database
# type its values are sent as). Only these names ever reach SQL text; every value is a parameter.
FILTER_FIELDS: dict[str, str] = {
    "customer_identifier": "text",
    "name": "text",
    "email": "text",
    "environment": "text",
    "status": "text",
    "first_seen": "timestamptz",
    "last_active": "timestamptz",
    "created_at": "timestamptz",
    "updated_at": "timestamptz",
    "active_days": "int8",
    "number_of_requests": "int8",
    "prompt_tokens": "int8",
    "completion_tokens": "int8",
    "total_tokens": "int8",
    "total_cost": "numeric",
    "average_latency": "float8",
    "average_ttft": "float8",
}
# Operators: ``eq``/``ne`` match any/none of one or more values; the comparisons and the text
# matches take one value (the matches only on text fields); ``empty``/``not_empty`` take none.
MULTI_VALUE_OPERATORS = frozenset({"eq", "ne"})
COMPARISONS = frozenset({"lt", "lte", "gt", "gte"})
TEXT_MATCHES = frozenset(
    {"contains", "not_contains", "icontains", "startswith", "not_startswith", "endswith", "not_endswith"}
)
PRESENCE_OPERATORS = frozenset({"empty", "not_empty"})
OPERATORS = frozenset({*MULTI_VALUE_OPERATORS, *COMPARISONS, *TEXT_MATCHES, *PRESENCE_OPERATORS})

# Bounds on what one request may ask for, so a filter stays one bounded statement (and a 400,
# not a 500, says so): conditions per query, values per condition and in all, characters per
# text value. Each condition is evaluated on every customer a filtered count scans (~50-75 ns
# per customer here): 10 conditions sharing 1,000 values count 300k customers in ~150 ms.
MAX_CONDITIONS = 10
MAX_CONDITION_VALUES = 1000
# Every condition is evaluated on every customer a filter scans: the work a filter asks of the
# database grows with the values of all its conditions together, so they share one bound.
MAX_FILTER_VALUES = 1000
MAX_TEXT_VALUE = 1000
_INT8 = (-(2**63), 2**63 - 1)
_MAX_MONEY = Decimal("1e15")
# A number filter value: at most this many characters as text, and (for exact numbers) at most
# as many decimal places as a stored amount has (events' cost: 12). PostgreSQL's numeric and
# the driver refuse exponents past ±16383 (a 500 before these bounds), and a million-digit
# string costs parsing time for nothing: no stored amount has more than 25 digits.
MAX_NUMBER_TEXT = 40
MAX_DECIMAL_PLACES = 12
_EARLIEST, _LATEST = datetime(1, 1, 2, tzinfo=UTC), datetime(9999, 12, 30, tzinfo=UTC)

FilterValue = str | int | Decimal | float | datetime


@dataclass(frozen=True)
class Condition:
    """One generic filter condition: ``field`` (a key of FILTER_FIELDS) ``operator`` (one of
    OPERATORS) ``values`` (typed for the field). Build it with :func:`condition`."""

    field: str
    operator: str
    values: tuple[FilterValue, ...] = ()


def condition(field_name: str, operator: str, values: Sequence[object], param: str) -> Condition:
    """A checked :class:`Condition` from a client's field, operator and values (JSON values:
    strings, numbers; ISO 8601 strings for times). InvalidInput naming ``param`` when the
    field or operator is unknown, the count of values is wrong for the operator, or a value
    does not fit the field's type."""
    if field_name not in FILTER_FIELDS:
        raise InvalidInput(param, f"cannot filter on '{field_name}'; filterable: {', '.join(FILTER_FIELDS)}")
    if operator not in OPERATORS:
        raise InvalidInput(param, f"unknown operator '{operator}'")
    kind = FILTER_FIELDS[field_name]
    if operator in PRESENCE_OPERATORS:
        return Condition(field_name, operator)
    if operator in TEXT_MATCHES and kind != "text":
        raise InvalidInput(param, f"operator '{operator}' applies to text fields only")
    if not values:
        raise InvalidInput(param, f"operator '{operator}' needs a value")
    if operator in MULTI_VALUE_OPERATORS:
        if len(values) > MAX_CONDITION_VALUES:
            raise InvalidInput(param, f"at most {MAX_CONDITION_VALUES} values")
    elif len(values) != 1:
        raise InvalidInput(param, f"operator '{operator}' takes exactly one value")
    return Condition(field_name, operator, tuple(_typed(v, kind, param) for v in values))


def _typed(value: object, kind: str, param: str) -> FilterValue:
    """``value`` as the Python type asyncpg sends for ``kind``; InvalidInput if it cannot be."""
    if isinstance(value, bool):
        raise InvalidInput(param, "booleans are not filter values")
    if kind == "text":
        if not isinstance(value, (str, int, float, Decimal)):
            raise InvalidInput(param, "must be a string")
        text = str(value)
        if len(text) > MAX_TEXT_VALUE or "\x00" in text:
            raise InvalidInput(param, f"must be at most {MAX_TEXT_VALUE} characters, without NUL")
        return text
    if kind == "timestamptz":
        # The canonical parameters' rules (service/domain/profile.py): a date is midnight UTC, a
        # date-time must carry its zone.
        try:
            moment = parse_instant(value)
        except ValueError as exc:
            raise InvalidInput(param, str(exc)) from None
        if not _EARLIEST < moment < _LATEST:  # the driver cannot send what is outside
            raise InvalidInput(param, "must be between 0001-01-02 and 9999-12-30")
        return moment
    digits = str(value).strip() if isinstance(value, (str, int, float, Decimal)) else None
    if digits is not None and len(digits) > MAX_NUMBER_TEXT:
        raise InvalidInput(param, f"must be a number of at most {MAX_NUMBER_TEXT} characters")
    try:
        number = Decimal(digits) if digits is not None else None
    except ArithmeticError:
        number = None
    if number is None or not number.is_finite():
        raise InvalidInput(param, "must be a number")
    if kind == "int8":
        if number != number.to_integral_value() or not _INT8[0] <= number <= _INT8[1]:
            raise InvalidInput(param, "must be a whole number within 64 bits")
        return int(number)
    if abs(number) >= _MAX_MONEY:
        raise InvalidInput(param, "is out of range")
    if kind == "float8":
        return float(number)
    exponent = number.normalize().as_tuple().exponent
    if isinstance(exponent, int) and -exponent > MAX_DECIMAL_PLACES:
        raise InvalidInput(param, f"has more than {MAX_DECIMAL_PLACES} decimal places")
    return number


# How far usage_to may be after usage_from, in days (as a usage series' to after its from).
MAX_WINDOW_DAYS = 400


@dataclass(frozen=True)
class CustomerFilter:
    statuses: tuple[str, ...] = ()
    name_contains: str | None = None
    email: str | None = None
    ids: tuple[UUID, ...] = ()
    identifiers: tuple[str, ...] = ()
    parent_ids: tuple[UUID, ...] = ()
    first_seen_gte: datetime | None = None
    first_seen_lte: datetime | None = None
    last_active_gte: datetime | None = None
    last_active_lte: datetime | None = None
    total_cost_gte: Decimal | None = None
    total_cost_lte: Decimal | None = None
    metadata: tuple[tuple[str, str], ...] = ()
    # Customers whose current-period usage is at least this share of their period budget.
    period_budget_share_gte: Decimal | None = None
    # Generic conditions (all must hold), built by :func:`condition`.
    conditions: tuple[Condition, ...] = ()
    # True: the filter matches nothing (a status the route's vocabulary has and tally never holds).
    nothing: bool = False
    # A usage window (the organization's local days, both inclusive): every usage aggregate the list shows, sorts and
    # filters by is the window's; ``usage_only`` leaves out customers without usage in it.
    usage_from: date | None = None
    usage_to: date | None = None
    usage_only: bool = False
    # Customers with usage of one of these models in the window (which it needs).
    models: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.usage_from is None) != (self.usage_to is None):
            missing = "usage_to" if self.usage_to is None else "usage_from"
            raise InvalidInput(missing, "give usage_from and usage_to together (days, both inclusive)")
        if self.usage_from is not None and self.usage_to is not None:
            if self.usage_to < self.usage_from:
                raise InvalidInput("usage_to", "must not be before usage_from")
            if (self.usage_to - self.usage_from).days > MAX_WINDOW_DAYS:
                raise InvalidInput("usage_to", f"at most {MAX_WINDOW_DAYS} days after usage_from")
        elif self.usage_only:
            raise InvalidInput("usage_only", "needs a window: usage_from and usage_to")
        elif self.models:
            raise InvalidInput("model", "needs a window: usage_from and usage_to")
        if len(self.conditions) > MAX_CONDITIONS:
            raise InvalidInput("filters", f"at most {MAX_CONDITIONS} conditions")
        if sum(len(c.values) for c in self.conditions) > MAX_FILTER_VALUES:
            raise InvalidInput("filters", f"at most {MAX_FILTER_VALUES} values in all conditions together")

    @property
    def windowed(self) -> bool:
        return self.usage_from is not None

    @cached_property
    def _fingerprint(self) -> str:
        canonical = orjson.dumps(asdict(self), default=str, option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(canonical).hexdigest()[:16]

    def fingerprint(self) -> str:
        """A short digest of the filter, so a cursor cannot be replayed against another one
        (computed once per filter: a page signs two cursors and checks one)."""
        return self._fingerprint


@dataclass(frozen=True)
class Sort:
    field: str = "first_seen"
    descending: bool = True

    @classmethod
    def parse(cls, text: str, param: str = "sort_by") -> Sort:
        name = text[1:] if text.startswith("-") else text
        if name not in SORT_FIELD_NAMES:
            raise InvalidInput(param, f"cannot sort by '{name}'")
        return cls(name, text.startswith("-"))

    def __str__(self) -> str:
        return ("-" if self.descending else "") + self.field


@dataclass(frozen=True)
class Position:
    """Where a keyset page starts: after (or, ``backwards``, before) the row (key, id)."""

    key: str
    id: str
    backwards: bool = False


@dataclass(frozen=True)
class ListQuery:
    organization_id: UUID
    environment: str
    filter: CustomerFilter = CustomerFilter()
    sort: Sort = Sort()
    limit: int = 50
    offset: int = 0
    position: Position | None = None
    count: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.limit <= MAX_LIMIT:
            raise InvalidInput("limit", f"must be between 1 and {MAX_LIMIT}")
        if self.offset < 0:
            raise InvalidInput("offset", "must be 0 or more")
        if self.position and self.offset:
            raise InvalidInput("cursor", "cannot be combined with an offset")


class CursorCodec:
    """Opaque, signed cursors. The payload binds the organization, environment, sort and
    filter it was made for; anything else (tampered, foreign, stale) is refused."""

    VERSION = 1

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _sign(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, payload, hashlib.sha256).digest()[:16]

    def encode(self, q: ListQuery, position: Position) -> str:
        payload = orjson.dumps(
            [
                self.VERSION,
                str(q.organization_id),
                q.environment,
                str(q.sort),
                q.filter.fingerprint(),
                position.key,
                position.id,
                position.backwards,
            ]
        )
        return _b64(payload) + "." + _b64(self._sign(payload))

    def decode(self, token: str) -> CursorClaims:
        """Verify a cursor's signature and return what it claims; :func:`resume` checks the
        claims against the request."""
        invalid = InvalidInput("cursor", "is not a cursor this server issued")
        body, dot, sig = token.partition(".")
        try:
            payload, signature = _unb64(body), _unb64(sig)
        except ValueError:
            raise invalid from None
        if not dot or not hmac.compare_digest(self._sign(payload), signature):
            raise invalid
        try:
            version, org, env, sort, fingerprint, key, kid, backwards = orjson.loads(payload)
        except (orjson.JSONDecodeError, ValueError, TypeError):
            raise invalid from None
        if version != self.VERSION:
            raise invalid
        return CursorClaims(org, env, sort, fingerprint, Position(key, kid, bool(backwards)))


@dataclass(frozen=True)
class CursorClaims:
    organization_id: str
    environment: str
    sort: str
    fingerprint: str
    position: Position


def resume(q: ListQuery, claims: CursorClaims, explicit_sort: bool) -> ListQuery:
    """``q`` continued from a cursor. The cursor must have been made for this organization,
    environment and filter; its sort applies unless the request named the same one."""
    if claims.organization_id != str(q.organization_id) or claims.environment != q.environment:
        raise InvalidInput("cursor", "was not issued for this organization and environment")
    if claims.fingerprint != q.filter.fingerprint():
        raise InvalidInput("cursor", "was issued for different filters; repeat the original filters")
    if explicit_sort and str(q.sort) != claims.sort:
        raise InvalidInput("cursor", f"was issued for sort_by={claims.sort}")
    return replace(q, sort=Sort.parse(claims.sort, "cursor"), position=claims.position, offset=0)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise ValueError(str(exc)) from None
