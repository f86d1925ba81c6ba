"""How a customer is rendered: the catalogue of output fields (SQL over a customer's profile
row ``c`` and usage row ``u``), the formats vendors' APIs want, and :func:`shape_sql`, which
turns a :class:`Shape` (which output key is which field) into one SQL expression that
PostgreSQL renders as JSON; :func:`rows_sql` fetches the rows a shape reads, by primary key.
The list compiler (service/store/listing.py) and a single customer's read
(service/store/customers.py) both render through it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Union


# Budget periods are the calendar periods of the organization's reporting time zone: each is
# computed inside a sub-select that reads the zone from the organization's row, where it is a
# plain column. Passing the zone as a sub-select argument instead stops PostgreSQL inlining the
# period functions (an argument with a sub-plan used more than once is not inlined): measured
# 25 ms against 4 ms for 1,000 rows. Customers without a budget duration skip it.
def _in_zone(expr: str) -> str:
    return (
        "CASE WHEN {c}.budget_duration IS NOT NULL THEN (SELECT "
        + expr
        + " FROM organizations o WHERE o.id = {c}.organization_id) END"
    )


_PERIOD = "{c}.budget_duration, now(), o.time_zone"

# Output fields: name -> SQL over a customer's profile row ``{c}`` and usage row ``{u}``,
# rendered into JSON by row_to_json. Money is text so that no client parses it into a float by
# accident.
CUSTOMER_FIELDS: dict[str, str] = {
    "id": "{c}.id",
    "organization_id": "{c}.organization_id",
    "customer_identifier": "{c}.customer_identifier",
    "environment": "{c}.environment",
    "name": "{c}.name",
    "first_name": "{c}.first_name",
    "last_name": "{c}.last_name",
    "email": "{c}.email",
    "phone": "{c}.phone",
    "customer_type": "{c}.customer_type",
    "status": "{c}.status",
    "parent_customer_id": "{c}.parent_customer_id",
    "address_line1": "{c}.address_line1",
    "address_line2": "{c}.address_line2",
    "address_city": "{c}.address_city",
    "address_state": "{c}.address_state",
    "address_postal_code": "{c}.address_postal_code",
    "address_country": "{c}.address_country",
    "metadata": "{c}.metadata",
    "stripe_customer_id": "{c}.stripe_customer_id",
    "application_id": "{c}.application_id",
    "last_transaction_amount": "{c}.last_transaction_amount",
    "last_purchase_date": "{c}.last_purchase_date",
    "total_budget": "{c}.total_budget",
    "period_budget": "{c}.period_budget",
    "budget_duration": "{c}.budget_duration",
    "period_start": _in_zone(f"tally_period_start({_PERIOD})"),
    "period_end": _in_zone(f"tally_period_end({_PERIOD})"),
    # Inline rather than tally_period_usage(): a function holding a sub-select cannot be
    # inlined and costs a function call per row; this is a plain SubPlan, run only for
    # customers that have a budget duration.
    "total_period_usage": (
        "CASE WHEN {c}.budget_duration IS NULL THEN {u}.total_cost ELSE (SELECT coalesce(sum(d.cost), 0)"
        " FROM organizations o JOIN daily_usage d ON d.organization_id = o.id"
        " WHERE o.id = {c}.organization_id AND d.customer_id = {c}.id"
        f" AND d.day >= (tally_period_start({_PERIOD}) AT TIME ZONE o.time_zone)::date"
        f" AND d.day < (tally_period_end({_PERIOD}) AT TIME ZONE o.time_zone)::date) END"
    ),
    "first_seen": "{u}.first_seen",
    "last_active": "{u}.last_active",
    "active_days": "{u}.active_days",
    "number_of_requests": "{u}.number_of_requests",
    "prompt_tokens": "{u}.prompt_tokens",
    "completion_tokens": "{u}.completion_tokens",
    "total_tokens": "{u}.total_tokens",
    "total_cost": "{u}.total_cost",
    "average_latency": "{u}.average_latency",
    "average_ttft": "{u}.average_ttft",
    "created_at": "{c}.created_at",
    "updated_at": "{c}.updated_at",
    # Derived: the identifier qualified by environment and organization (globally unique).
    "scoped_id": "{c}.customer_identifier || {c}.environment || {c}.organization_id::text",
    "organization_name": "(SELECT o.name FROM organizations o WHERE o.id = {c}.organization_id)",
    "has_active_subscription": (
        "EXISTS (SELECT 1 FROM subscriptions s WHERE s.organization_id = {c}.organization_id"
        " AND s.customer_id = {c}.id AND s.status IN ('active', 'trialing'))"
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


# The aliases a catalogue's templates are written over: a customer's profile and usage rows.
Aliases = Mapping[str, str]
ROWS: Aliases = {"c": "c", "u": "u"}


def _render(source: str | Col, catalogue: Mapping[str, str], aliases: Aliases) -> str:
    col = source if isinstance(source, Col) else Col(source)
    if col.field not in catalogue:
        raise ValueError(f"unknown field {col.field!r}")
    expr = catalogue[col.field].format(**aliases)
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
    aliases: Aliases,
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
            expr = _render(source, catalogue, aliases)
        else:
            expr = _json_object(source, catalogue, aliases)
            if key in nullable:
                leaves = [_render(f, catalogue, aliases) for f in source.values() if isinstance(f, (str, Col))]
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


def _fields(projection: Projection) -> set[str]:
    """The catalogue fields a projection renders."""
    out: set[str] = set()
    for source in projection.values():
        if isinstance(source, (str, Col)):
            out.add(source.field if isinstance(source, Col) else source)
        else:
            out |= _fields(source)
    return out


def renders_usage(shape: Shape) -> bool:
    """Whether the shape shows anything from the usage row (else it is never read)."""
    return any("{u}" in CUSTOMER_FIELDS[f] for f in _fields(shape.fields) if f in CUSTOMER_FIELDS)


PARENT: Aliases = {"c": "p", "u": "pu"}


# shape_sql's text by (shape, aliases): shapes are a route's constants, and building the text
# cost a fifth of a retrieve's CPU (py-spy, bench/read.py's retrieve with the cache off). The
# entry holds the shape itself, so its id cannot be reused while it is here; bounded for shapes
# made on the fly.
_RENDERED: dict[tuple[int, tuple[tuple[str, str], ...]], tuple[Shape, str]] = {}
_RENDERED_MAX = 256


def shape_sql(shape: Shape, aliases: Aliases = ROWS) -> str:
    """The SQL expression that renders one customer as a JSON object (keys in the projection's
    order, the parent and subscriptions last), over its profile and usage rows ``aliases``
    (and the parent's, ``p`` and ``pu``: :func:`rows_sql`)."""
    key = (id(shape), tuple(sorted(aliases.items())))
    held = _RENDERED.get(key)
    if held is not None and held[0] is shape:
        return held[1]
    sql = _shape_sql(shape, aliases)
    if len(_RENDERED) < _RENDERED_MAX:
        _RENDERED[key] = (shape, sql)
    return sql


def _shape_sql(shape: Shape, aliases: Aliases) -> str:
    extras: list[tuple[str, str]] = []
    if shape.parent_key:
        parent = _json_object(shape.fields, CUSTOMER_FIELDS, PARENT)
        extras.append((shape.parent_key, f"CASE WHEN p.id IS NULL THEN NULL ELSE {parent} END"))
    if shape.subscriptions_key:
        c = aliases["c"]
        sub = _json_object(shape.subscription_fields, SUBSCRIPTION_FIELDS, {}, shape.null_when_absent)
        source = f"FROM subscriptions s WHERE s.organization_id = {c}.organization_id AND s.customer_id = {c}.id"
        extras.append((shape.subscriptions_key, json_array(sub, "s.created_at, s.id", source)))
    return _json_object(shape.fields, CUSTOMER_FIELDS, aliases, extras=extras)


def by_key(table: str, alias: str, organization_id: str, customer_id: str, *, outer: bool = False) -> str:
    """``table`` AS ``alias``: the one row of the customer named, found by primary key, in a
    subquery the planner keeps (OFFSET 0), so it is one probe per row whatever the statistics."""
    join = "LEFT JOIN LATERAL" if outer else "CROSS JOIN LATERAL"
    probe = f"SELECT * FROM {table} t WHERE t.organization_id = {organization_id} AND t.id = {customer_id} OFFSET 0"
    return f" {join} ({probe}) {alias}{' ON true' if outer else ''}"


def rows_sql(shape: Shape, source: str, usage: str = "customer_usage") -> str:
    """The rows that :func:`shape_sql` renders for each customer of ``source`` (an alias with
    ``organization_id`` and ``id``, or ``c``: the profile row itself): its profile ``c``, its
    usage ``u`` (from the relation ``usage``: a windowed list's is the window's) when the
    shape shows usage, its parent ``p``/``pu`` when the shape has one."""
    sql = "" if source == "c" else by_key("customers", "c", f"{source}.organization_id", f"{source}.id")
    if renders_usage(shape):
        sql += by_key(usage, "u", f"{source}.organization_id", f"{source}.id")
    if shape.parent_key:
        sql += by_key("customers", "p", "c.organization_id", "c.parent_customer_id", outer=True)
        if renders_usage(shape):
            sql += by_key(usage, "pu", "p.organization_id", "p.id", outer=True)
    return sql
