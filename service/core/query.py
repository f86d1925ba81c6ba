"""The customer list query: one object built from validated parameters, one SQL statement.

Every list route (canonical or compatibility) builds a ``ListQuery`` and a ``Projection``
(which output key is which customer field) and calls :func:`service.core.customers.list_customers`.
Only names from the allow-lists below ever reach SQL text; every value is a ``$n`` parameter.

Sorting is keyset-friendly: each sort field is a NOT NULL expression (missing values sort
lowest) with a matching index ``(organization_id, environment, expr, id)``, and ``id`` breaks
ties, so ``(expr, id)`` is unique and a cursor is a row comparison on that tuple.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Union
from uuid import UUID

import orjson

from service.core.errors import InvalidInput
from service.core.profile import parse_instant


@dataclass(frozen=True)
class SortField:
    expr: str  # SQL over the customer_rows alias ``c``; never NULL
    sql_type: str  # the cast that turns a cursor's text back into the expression's type
    # The id that breaks ties: the id column of the table whose index holds ``expr``, so that
    # the keyset comparison ``(expr, id) < (…)`` is a condition inside that one index.
    tiebreak: str = "c.id"


def _usage(expr: str, sql_type: str) -> SortField:
    """A sort over a usage aggregate: its index is on customer_usage (see customer_rows)."""
    return SortField(expr, sql_type, "c.usage_id")


# Must match the index expressions in the migrations (profile fields on customers, usage
# fields on customer_usage: 0007).
SORT_FIELDS: dict[str, SortField] = {
    "customer_identifier": SortField("c.customer_identifier", "text"),
    "name": SortField("coalesce(c.name, '')", "text"),
    "email": SortField("coalesce(c.email, '')", "text"),
    "status": SortField("c.status", "text"),
    "created_at": SortField("c.created_at", "timestamptz"),
    "updated_at": SortField("c.updated_at", "timestamptz"),
    "first_seen": _usage("coalesce(c.first_seen, '-infinity'::timestamptz)", "timestamptz"),
    "last_active": _usage("coalesce(c.last_active, '-infinity'::timestamptz)", "timestamptz"),
    "active_days": _usage("c.active_days", "int4"),
    "number_of_requests": _usage("c.number_of_requests", "int8"),
    "prompt_tokens": _usage("c.prompt_tokens", "int8"),
    "completion_tokens": _usage("c.completion_tokens", "int8"),
    "total_tokens": _usage("c.total_tokens", "int8"),
    "total_cost": _usage("c.total_cost", "numeric"),
    "average_latency": _usage("coalesce(c.average_latency, '-infinity'::float8)", "float8"),
    "average_ttft": _usage("coalesce(c.average_ttft, '-infinity'::float8)", "float8"),
    "total_budget": SortField("coalesce(c.total_budget, '-infinity'::numeric)", "numeric"),
    "period_budget": SortField("coalesce(c.period_budget, '-infinity'::numeric)", "numeric"),
}

MAX_LIMIT = 1000

# Output fields: name -> SQL over a customers alias ``{t}``, rendered into JSON by
# row_to_json. Money is text so that no client parses it into a float by accident.
_PERIOD = "{t}.budget_duration, now()"
CUSTOMER_FIELDS: dict[str, str] = {
    "id": "{t}.id",
    "organization_id": "{t}.organization_id",
    "customer_identifier": "{t}.customer_identifier",
    "environment": "{t}.environment",
    "name": "{t}.name",
    "first_name": "{t}.first_name",
    "last_name": "{t}.last_name",
    "email": "{t}.email",
    "phone": "{t}.phone",
    "customer_type": "{t}.customer_type",
    "status": "{t}.status",
    "parent_customer_id": "{t}.parent_customer_id",
    "address_line1": "{t}.address_line1",
    "address_line2": "{t}.address_line2",
    "address_city": "{t}.address_city",
    "address_state": "{t}.address_state",
    "address_postal_code": "{t}.address_postal_code",
    "address_country": "{t}.address_country",
    "metadata": "{t}.metadata",
    "stripe_customer_id": "{t}.stripe_customer_id",
    "application_id": "{t}.application_id",
    "last_transaction_amount": "{t}.last_transaction_amount",
    "last_purchase_date": "{t}.last_purchase_date",
    "total_budget": "{t}.total_budget",
    "period_budget": "{t}.period_budget",
    "budget_duration": "{t}.budget_duration",
    "period_start": f"tally_period_start({_PERIOD})",
    "period_end": f"tally_period_end({_PERIOD})",
    # Inline rather than tally_period_usage(): a function holding a sub-select cannot be
    # inlined and costs a function call per row; this is a plain SubPlan, run only for
    # customers that have a budget duration.
    "total_period_usage": (
        "CASE WHEN {t}.budget_duration IS NULL THEN {t}.total_cost ELSE (SELECT coalesce(sum(d.cost), 0)"
        " FROM daily_usage d WHERE d.organization_id = {t}.organization_id AND d.customer_id = {t}.id"
        f" AND d.day >= (tally_period_start({_PERIOD}) AT TIME ZONE 'UTC')::date"
        f" AND d.day < (tally_period_end({_PERIOD}) AT TIME ZONE 'UTC')::date) END"
    ),
    "first_seen": "{t}.first_seen",
    "last_active": "{t}.last_active",
    "active_days": "{t}.active_days",
    "number_of_requests": "{t}.number_of_requests",
    "prompt_tokens": "{t}.prompt_tokens",
    "completion_tokens": "{t}.completion_tokens",
    "total_tokens": "{t}.total_tokens",
    "total_cost": "{t}.total_cost",
    "average_latency": "{t}.average_latency",
    "average_ttft": "{t}.average_ttft",
    "created_at": "{t}.created_at",
    "updated_at": "{t}.updated_at",
    # Derived: the identifier qualified by environment and organization (globally unique).
    "scoped_id": "{t}.customer_identifier || {t}.environment || {t}.organization_id::text",
    "organization_name": "(SELECT o.name FROM organizations o WHERE o.id = {t}.organization_id)",
    "has_active_subscription": (
        "EXISTS (SELECT 1 FROM subscriptions s WHERE s.organization_id = {t}.organization_id"
        " AND s.customer_id = {t}.id AND s.status IN ('active', 'trialing'))"
    ),
}
# Money renders as a decimal string unless a projection asks for a JSON number.
MONEY_FIELDS = frozenset(
    {"total_cost", "total_budget", "period_budget", "last_transaction_amount", "total_period_usage"}
)

SUBSCRIPTION_FIELDS: dict[str, str] = {
    "id": "s.id",
    "status": "s.status",
    "current_period_start": "s.current_period_start",
    "current_period_end": "s.current_period_end",
    "plan_stripe_price_id": "s.plan_stripe_price_id",
    "plan_name": "s.plan_name",
    "plan_amount": "s.plan_amount",
    "plan_currency": "s.plan_currency",
    "plan_interval": "s.plan_interval",
    "created_at": "s.created_at",
    "updated_at": "s.updated_at",
}


@dataclass(frozen=True)
class Col:
    """An output value: a catalogue field, optionally formatted.

    ``fmt``: ``number`` (money as a JSON number rather than a decimal string), ``iso_z``
    (``2024-01-15T10:30:00Z``), ``iso_ms`` (``2024-01-15T10:30:00.000Z``), ``upper``,
    ``text`` (a missing value as ``""``, for APIs whose strings are never null), ``string_map``
    (a JSON object whose non-string values become their JSON text, for APIs whose maps hold
    strings only).
    ``values`` renames values (``(("active", "published"),)``); others pass through.
    """

    field: str
    fmt: str | None = None
    values: tuple[tuple[str, str], ...] = ()


_FORMATS = {
    "number": "{e}",
    "iso_z": "to_char(({e}) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')",
    "iso_ms": "to_char(({e}) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')",
    "upper": "upper({e})",
    "text": "coalesce(({e})::text, '')",
    # A JSON object as a map of strings: string values as they are, any other value as its JSON
    # text (as PostgreSQL writes jsonb: true -> "true", 5 -> "5", {"a":1} -> "{\"a\": 1}").
    "string_map": (
        "(SELECT coalesce(jsonb_object_agg(m.key, CASE jsonb_typeof(m.value) WHEN 'string' THEN m.value #>> '{{}}'"
        " ELSE m.value::text END), '{{}}'::jsonb) FROM jsonb_each({e}) m)"
    ),
}
_PLAIN = re.compile(r"^[A-Za-z0-9_ -]*$")

# A projection maps output keys to fields of a catalogue; a nested mapping is a nested object.
Projection = Mapping[str, Union[str, Col, "Projection"]]


def _render(source: str | Col, catalogue: Mapping[str, str], alias: str) -> str:
    col = source if isinstance(source, Col) else Col(source)
    if col.field not in catalogue:
        raise ValueError(f"unknown field {col.field!r}")
    expr = catalogue[col.field].format(t=alias)
    if col.fmt is None:
        if col.field in MONEY_FIELDS:
            expr = f"({expr})::text"
    elif col.fmt in _FORMATS:
        expr = _FORMATS[col.fmt].format(e=expr)
    else:
        raise ValueError(f"unknown format {col.fmt!r}")
    if col.values:
        if not all(_PLAIN.match(a) and _PLAIN.match(b) for a, b in col.values):
            raise ValueError("value renames must be plain words")
        cases = " ".join(f"WHEN '{a}' THEN '{b}'" for a, b in col.values)
        expr = f"CASE {expr} {cases} ELSE {expr} END"
    return expr


@dataclass(frozen=True)
class Shape:
    """What each returned customer looks like.

    ``fields`` projects CUSTOMER_FIELDS; ``parent_key`` (if set) adds the parent customer
    under that key in the same projection (or null); ``subscriptions_key`` (if set) adds the
    customer's subscriptions as an array projected by ``subscription_fields``. A
    ``null_when_absent`` sub-object (a subscription's plan) is null when all its fields are.
    """

    fields: Projection
    parent_key: str | None = None
    subscriptions_key: str | None = None
    subscription_fields: Projection = field(default_factory=dict)
    null_when_absent: tuple[str, ...] = ()


def _json_object(
    projection: Projection,
    catalogue: Mapping[str, str],
    alias: str,
    nullable: tuple[str, ...] = (),
    extras: list[tuple[str, str]] | None = None,
) -> str:
    """A JSON object of the projection's keys, in order. ``row_to_json`` of a one-row
    sub-select writes compact JSON (``{"a":1}``, the style of every other body tally sends;
    ``json_build_object`` writes ``{"a" : 1}``) and was measured faster as well. Only a
    jsonb value inside (metadata) keeps PostgreSQL's own spacing."""
    columns: list[tuple[str, str]] = []
    for key, source in projection.items():
        if not key.replace("_", "").isalnum():
            raise ValueError(f"output key {key!r} is not a plain name")
        if isinstance(source, (str, Col)):
            expr = _render(source, catalogue, alias)
        else:
            expr = _json_object(source, catalogue, alias)
            if key in nullable:
                leaves = [_render(f, catalogue, alias) for f in source.values() if isinstance(f, (str, Col))]
                absent = " AND ".join(f"{leaf} IS NULL" for leaf in leaves)
                expr = f"CASE WHEN {absent} THEN NULL ELSE {expr} END"
        columns.append((key, expr))
    columns.extend(extras or ())
    # Keys are plain names (checked above), quoted so that camelCase keys keep their case.
    selected = ", ".join(f'{expr} AS "{key}"' for key, expr in columns)
    return f"(SELECT row_to_json(o) FROM (SELECT {selected}) o)"


def json_array(element: str, order_by: str, source: str) -> str:
    """A compact JSON array of ``element`` per row of ``source`` (``[]`` when none)."""
    elements = f"string_agg(({element})::text, ',' ORDER BY {order_by})"
    return f"(SELECT coalesce('[' || {elements} || ']', '[]')::json {source})"


def shape_sql(shape: Shape, alias: str = "c") -> str:
    """The SQL expression that renders one customer row as a JSON object (keys in the
    projection's order, the parent and subscriptions last)."""
    extras: list[tuple[str, str]] = []
    if shape.parent_key:
        parent = _json_object(shape.fields, CUSTOMER_FIELDS, "p")
        extras.append((shape.parent_key, f"CASE WHEN p.id IS NULL THEN NULL ELSE {parent} END"))
    if shape.subscriptions_key:
        sub = _json_object(shape.subscription_fields, SUBSCRIPTION_FIELDS, "s", shape.null_when_absent)
        source = (
            f"FROM subscriptions s WHERE s.organization_id = {alias}.organization_id AND s.customer_id = {alias}.id"
        )
        extras.append((shape.subscriptions_key, json_array(sub, "s.created_at, s.id", source)))
    return _json_object(shape.fields, CUSTOMER_FIELDS, alias, extras=extras)


def join_sql(shape: Shape, alias: str = "c") -> str:
    if not shape.parent_key:
        return ""
    parent = f"p.organization_id = {alias}.organization_id AND p.id = {alias}.parent_customer_id"
    return f" LEFT JOIN customer_rows p ON {parent}"


# Fields a generic condition may filter on: name -> (SQL over the customer_rows alias ``c``, kind).
# Only these expressions ever reach SQL text; every value is a ``$n`` parameter of the kind's type.
FILTER_FIELDS: dict[str, tuple[str, str]] = {
    "customer_identifier": ("c.customer_identifier", "text"),
    "name": ("c.name", "text"),
    "email": ("c.email", "text"),
    "environment": ("c.environment", "text"),
    "status": ("c.status", "text"),
    "first_seen": ("c.first_seen", "timestamptz"),
    "last_active": ("c.last_active", "timestamptz"),
    "created_at": ("c.created_at", "timestamptz"),
    "updated_at": ("c.updated_at", "timestamptz"),
    "active_days": ("c.active_days", "int8"),
    "number_of_requests": ("c.number_of_requests", "int8"),
    "prompt_tokens": ("c.prompt_tokens", "int8"),
    "completion_tokens": ("c.completion_tokens", "int8"),
    "total_tokens": ("c.total_tokens", "int8"),
    "total_cost": ("c.total_cost", "numeric"),
    "average_latency": ("c.average_latency", "float8"),
    "average_ttft": ("c.average_ttft", "float8"),
}
# Operators: ``eq``/``ne`` match any/none of one or more values; the comparisons and the text
# matches take one value (the matches only on text fields); ``empty``/``not_empty`` take none.
MULTI_VALUE_OPERATORS = frozenset({"eq", "ne"})
COMPARISONS = {"lt": "<", "lte": "<=", "gt": ">", "gte": ">="}
# operator -> (LIKE or ILIKE, pattern around the escaped value, negated)
TEXT_MATCHES: dict[str, tuple[str, str, bool]] = {
    "contains": ("LIKE", "%{}%", False),
    "not_contains": ("LIKE", "%{}%", True),
    "icontains": ("ILIKE", "%{}%", False),
    "startswith": ("LIKE", "{}%", False),
    "not_startswith": ("LIKE", "{}%", True),
    "endswith": ("LIKE", "%{}", False),
    "not_endswith": ("LIKE", "%{}", True),
}
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
    kind = FILTER_FIELDS[field_name][1]
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
        # The canonical parameters' rules (service/core/profile.py): a date is midnight UTC, a
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


def condition_sql(cond: Condition, p: _Params) -> str:
    """One condition as SQL over ``c``: the field's expression from the allow-list, the values
    as parameters. A missing value (NULL) matches ``ne``, the negated text matches and
    ``empty``, and nothing else."""
    expr, kind = FILTER_FIELDS[cond.field]
    if cond.operator == "eq":
        return f"{expr} = ANY({p(list(cond.values), kind + '[]')})"
    if cond.operator == "ne":
        return f"coalesce({expr} <> ALL({p(list(cond.values), kind + '[]')}), true)"
    if cond.operator in COMPARISONS:
        return f"{expr} {COMPARISONS[cond.operator]} {p(cond.values[0], kind)}"
    if cond.operator in TEXT_MATCHES:
        like, pattern, negated = TEXT_MATCHES[cond.operator]
        match = f"{expr} {like} {p(pattern.format(escape_like(str(cond.values[0]))))}"
        return f"coalesce(NOT ({match}), true)" if negated else match
    blank = f"({expr} IS NULL OR {expr} = '')" if kind == "text" else f"{expr} IS NULL"
    return blank if cond.operator == "empty" else f"NOT {blank}"


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

    def __post_init__(self) -> None:
        if len(self.conditions) > MAX_CONDITIONS:
            raise InvalidInput("filters", f"at most {MAX_CONDITIONS} conditions")
        if sum(len(c.values) for c in self.conditions) > MAX_FILTER_VALUES:
            raise InvalidInput("filters", f"at most {MAX_FILTER_VALUES} values in all conditions together")

    def fingerprint(self) -> str:
        """A short digest of the filter, so a cursor cannot be replayed against another one."""
        canonical = orjson.dumps(asdict(self), default=str, option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(canonical).hexdigest()[:16]


@dataclass(frozen=True)
class Sort:
    field: str = "first_seen"
    descending: bool = True

    @classmethod
    def parse(cls, text: str, param: str = "sort_by") -> Sort:
        name = text[1:] if text.startswith("-") else text
        if name not in SORT_FIELDS:
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


class _Params:
    """Collects values and hands out their ``$n`` placeholders."""

    def __init__(self) -> None:
        self.values: list[object] = []

    def __call__(self, value: object, cast: str = "") -> str:
        self.values.append(value)
        return f"${len(self.values)}{'::' + cast if cast else ''}"


def escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def where_sql(q: ListQuery, p: _Params) -> str:
    f = q.filter
    clauses = [f"c.organization_id = {p(q.organization_id)}", f"c.environment = {p(q.environment)}"]
    if f.statuses:
        clauses.append(f"c.status = ANY({p(list(f.statuses), 'text[]')})")
    if f.name_contains:
        clauses.append(f"c.name ILIKE {p('%' + escape_like(f.name_contains) + '%')}")
    if f.email:
        clauses.append(f"lower(c.email) = lower({p(f.email)})")
    if f.ids:
        clauses.append(f"c.id = ANY({p(list(f.ids), 'uuid[]')})")
    if f.identifiers:
        clauses.append(f"c.customer_identifier = ANY({p(list(f.identifiers), 'text[]')})")
    if f.parent_ids:
        clauses.append(f"c.parent_customer_id = ANY({p(list(f.parent_ids), 'uuid[]')})")
    for column, op, value in (
        ("first_seen", ">=", f.first_seen_gte),
        ("first_seen", "<=", f.first_seen_lte),
        ("last_active", ">=", f.last_active_gte),
        ("last_active", "<=", f.last_active_lte),
        ("total_cost", ">=", f.total_cost_gte),
        ("total_cost", "<=", f.total_cost_lte),
    ):
        if value is not None:
            clauses.append(f"c.{column} {op} {p(value)}")
    if f.metadata:
        clauses.append(f"c.metadata @> {p(dict(f.metadata), 'jsonb')}")
    if f.period_budget_share_gte is not None:
        usage = CUSTOMER_FIELDS["total_period_usage"].format(t="c")
        clauses.append(f"c.period_budget > 0 AND {usage} >= c.period_budget * {p(f.period_budget_share_gte)}")
    clauses.extend(condition_sql(cond, p) for cond in f.conditions)
    if f.nothing:
        clauses.append("false")
    return " AND ".join(clauses)


def page_sql(q: ListQuery, shape: Shape, p: _Params | None = None) -> tuple[str, list[object]]:
    """One statement returning up to ``limit + 1`` rows of (doc, k, kid, sort_key, id): the
    JSON document, and the sort key and id as text for the cursor. The extra row says
    whether more follow."""
    p = p or _Params()
    sort = SORT_FIELDS[q.sort.field]
    where = where_sql(q, p)
    # Walking backwards reverses the scan; the caller puts the rows back in order.
    descending = q.sort.descending != bool(q.position and q.position.backwards)
    if q.position is not None:
        op = "<" if descending else ">"
        # The key travels as text (the driver would want a typed object for a typed parameter);
        # PostgreSQL casts it back to the sort expression's type.
        key = f"{p(q.position.key, 'text')}::{sort.sql_type}"
        where += f" AND ({sort.expr}, {sort.tiebreak}) {op} ({key}, {p(q.position.id, 'uuid')})"
    direction = "DESC" if descending else "ASC"
    # The inner query picks the page's rows (an index scan, skipping OFFSET rows cheaply);
    # the outer one renders only those. Rendering in the inner query would build a JSON
    # document for every skipped row of a deep OFFSET.
    sql = (
        f"SELECT {shape_sql(shape)}::text AS doc, c.k, c.id::text AS kid, c.sort_key, c.id FROM ("
        f"SELECT c.*, {sort.expr} AS sort_key, ({sort.expr})::text AS k"
        f" FROM customer_rows c WHERE {where}"
        f" ORDER BY {sort.expr} {direction}, {sort.tiebreak} {direction}"
        f" LIMIT {p(q.limit + 1)} OFFSET {p(q.offset)}"
        f") c{join_sql(shape)} ORDER BY c.sort_key {direction}, c.id {direction}"
    )
    return sql, p.values


def count_sql(q: ListQuery, p: _Params | None = None) -> tuple[str, list[object]]:
    """The total for ``q``. Unfiltered and status-only lists read the trigger-maintained
    counters (a few rows); any other filter counts the matching rows."""
    p = p or _Params()
    if replace(q.filter, statuses=()) == CustomerFilter():
        statuses = f" AND status = ANY({p(list(q.filter.statuses), 'text[]')})" if q.filter.statuses else ""
        sql = (
            "SELECT coalesce(sum(delta), 0)::bigint FROM customer_counts"
            f" WHERE organization_id = {p(q.organization_id)} AND environment = {p(q.environment)}{statuses}"
        )
        return sql, p.values
    # Every customer has exactly one usage row (migration 0007), so a filter on profile fields
    # alone counts customers, and one on usage fields alone counts usage rows, without the join
    # (which costs several times the scan itself: 200 ms against 30 for 300k customers here).
    usage, profile = touches_usage(q.filter), touches_profile(q.filter)
    source = "customer_rows" if usage and profile else "customer_usage" if usage else "customers"
    return f"SELECT count(*) FROM {source} c WHERE {where_sql(q, p)}", p.values


# The columns of customer_rows that live in customer_usage (migration 0007).
USAGE_COLUMNS = frozenset(
    {
        "first_seen",
        "last_active",
        "active_days",
        "number_of_requests",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "total_cost",
        "latency_sum",
        "latency_count",
        "ttft_sum",
        "ttft_count",
        "average_latency",
        "average_ttft",
    }
)


def touches_usage(f: CustomerFilter) -> bool:
    """Whether the filter's SQL reads a usage column (the period-budget share reads total_cost)."""
    ranges = (
        f.first_seen_gte,
        f.first_seen_lte,
        f.last_active_gte,
        f.last_active_lte,
        f.total_cost_gte,
        f.total_cost_lte,
    )
    return (
        any(v is not None for v in ranges)
        or f.period_budget_share_gte is not None
        or any(c.field in USAGE_COLUMNS for c in f.conditions)
    )


# Columns that customer_usage holds as well as customers (the keys, copied on insert).
SHARED_COLUMNS = frozenset({"id", "organization_id", "environment"})


def touches_profile(f: CustomerFilter) -> bool:
    """Whether the filter's SQL reads a column only customers holds."""
    return bool(
        f.statuses
        or f.name_contains
        or f.email
        or f.identifiers
        or f.parent_ids
        or f.metadata
        or f.period_budget_share_gte is not None
        or any(c.field not in USAGE_COLUMNS | SHARED_COLUMNS for c in f.conditions)
    )


def list_sql(q: ListQuery, shape: Shape) -> tuple[str, list[object]]:
    """The page and (when ``q.count``) the total in one round trip: rows of
    (total, doc, k, kid); with no rows on the page, one row whose doc is NULL."""
    if not q.count:
        sql, args = page_sql(q, shape)
        return f"SELECT NULL::bigint AS total, page.doc, page.k, page.kid FROM ({sql}) page", args
    p = _Params()
    total, _ = count_sql(q, p)
    page, _ = page_sql(q, shape, p)
    descending = q.sort.descending != bool(q.position and q.position.backwards)
    direction = "DESC" if descending else "ASC"
    sql = (
        f"SELECT t.total, page.doc, page.k, page.kid FROM ({total}) t(total)"
        f" LEFT JOIN LATERAL ({page}) page ON true ORDER BY page.sort_key {direction}, page.id {direction}"
    )
    return sql, p.values


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
