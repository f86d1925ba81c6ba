"""The list compiler: a :class:`~service.domain.listing.ListQuery` and a :class:`Shape` (which
output key is which customer field) turned into one SQL statement whose rows PostgreSQL renders
as JSON. Every list route (canonical or compatibility) runs it through
:func:`service.store.customers.list_customers`. Only names from the domain's allow-lists and the
catalogues below ever reach SQL text; every value is a ``$n`` parameter.

Each sort field is a NOT NULL expression (missing values sort lowest) with a matching index
``(organization_id, environment, expr, id)``, and ``id`` breaks ties, so ``(expr, id)`` is unique
and a cursor is a row comparison on that tuple.

Two tables hold a customer (migration 0007): its profile in ``customers`` (alias ``c``) and its
usage aggregates in ``customer_usage`` (alias ``u``), one row each, both keyed by
``(organization_id, id)``. A page is chosen from the table whose index holds the sort (the
driving table), joined to the other one only where a filter reads it; the page's rows are
then fetched from each table the shape renders by primary key, one probe per row, in a
subquery the planner cannot flatten. Every join between the two is on the primary key alone,
so no plan can reach the other table through a sort index, whatever the statistics say
(never-analyzed tables after a bulk load included).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Union

from service.domain.listing import (
    COMPARISONS,
    FILTER_FIELDS,
    SORT_FIELD_NAMES,
    TEXT_MATCHES,
    Condition,
    CustomerFilter,
    ListQuery,
)
from service.store.apply import LIFETIME_SUMS
from service.store.changelog import HORIZON


@dataclass(frozen=True)
class SortField:
    expr: str  # SQL over the driving table's alias (``c`` or ``u``); never NULL
    sql_type: str  # the cast that turns a cursor's text back into the expression's type
    # The alias of the table whose index holds ``expr``: its id breaks ties, so that the
    # keyset comparison ``(expr, id) < (…)`` is a condition inside that one index.
    table: str = "c"

    @property
    def tiebreak(self) -> str:
        return f"{self.table}.id"


def _usage(expr: str, sql_type: str) -> SortField:
    """A sort over a usage aggregate: its index is on customer_usage."""
    return SortField(expr, sql_type, "u")


TABLES = {"c": "customers", "u": "customer_usage"}


# Must match the index expressions in the migrations (profile fields on customers, usage
# fields on customer_usage: 0007).
SORT_FIELDS: dict[str, SortField] = {
    "customer_identifier": SortField("c.customer_identifier", "text"),
    "name": SortField("coalesce(c.name, '')", "text"),
    "email": SortField("coalesce(c.email, '')", "text"),
    "status": SortField("c.status", "text"),
    "created_at": SortField("c.created_at", "timestamptz"),
    "updated_at": SortField("c.updated_at", "timestamptz"),
    "first_seen": _usage("coalesce(u.first_seen, '-infinity'::timestamptz)", "timestamptz"),
    "last_active": _usage("coalesce(u.last_active, '-infinity'::timestamptz)", "timestamptz"),
    "active_days": _usage("u.active_days", "int4"),
    "number_of_requests": _usage("u.number_of_requests", "int8"),
    "prompt_tokens": _usage("u.prompt_tokens", "int8"),
    "completion_tokens": _usage("u.completion_tokens", "int8"),
    "total_tokens": _usage("u.total_tokens", "int8"),
    "total_cost": _usage("u.total_cost", "numeric"),
    "average_latency": _usage("coalesce(u.average_latency, '-infinity'::float8)", "float8"),
    "average_ttft": _usage("coalesce(u.average_ttft, '-infinity'::float8)", "float8"),
    "total_budget": SortField("coalesce(c.total_budget, '-infinity'::numeric)", "numeric"),
    "period_budget": SortField("coalesce(c.period_budget, '-infinity'::numeric)", "numeric"),
}

assert tuple(SORT_FIELDS) == SORT_FIELD_NAMES, "every sortable field has its expression and index"

# Output fields: name -> SQL over a customer's profile row ``{c}`` and usage row ``{u}``,
# rendered into JSON by row_to_json. Money is text so that no client parses it into a float by
# accident.
_PERIOD = "{c}.budget_duration, now()"
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
    "period_start": f"tally_period_start({_PERIOD})",
    "period_end": f"tally_period_end({_PERIOD})",
    # Inline rather than tally_period_usage(): a function holding a sub-select cannot be
    # inlined and costs a function call per row; this is a plain SubPlan, run only for
    # customers that have a budget duration.
    "total_period_usage": (
        "CASE WHEN {c}.budget_duration IS NULL THEN {u}.total_cost ELSE (SELECT coalesce(sum(d.cost), 0)"
        " FROM daily_usage d WHERE d.organization_id = {c}.organization_id AND d.customer_id = {c}.id"
        f" AND d.day >= (tally_period_start({_PERIOD}) AT TIME ZONE 'UTC')::date"
        f" AND d.day < (tally_period_end({_PERIOD}) AT TIME ZONE 'UTC')::date) END"
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


def shape_sql(shape: Shape, aliases: Aliases = ROWS) -> str:
    """The SQL expression that renders one customer as a JSON object (keys in the projection's
    order, the parent and subscriptions last), over its profile and usage rows ``aliases``
    (and the parent's, ``p`` and ``pu``: :func:`rows_sql`)."""
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


def _by_key(table: str, alias: str, organization_id: str, customer_id: str, *, outer: bool = False) -> str:
    """``table`` AS ``alias``: the one row of the customer named, found by primary key, in a
    subquery the planner keeps (OFFSET 0), so it is one probe per row whatever the statistics."""
    join = "LEFT JOIN LATERAL" if outer else "CROSS JOIN LATERAL"
    probe = f"SELECT * FROM {table} t WHERE t.organization_id = {organization_id} AND t.id = {customer_id} OFFSET 0"
    return f" {join} ({probe}) {alias}{' ON true' if outer else ''}"


def rows_sql(shape: Shape, source: str) -> str:
    """The rows that :func:`shape_sql` renders for each customer of ``source`` (an alias with
    ``organization_id`` and ``id``, or ``c``: the profile row itself): its profile ``c``, its
    usage ``u`` when the shape shows usage, its parent ``p``/``pu`` when the shape has one."""
    sql = "" if source == "c" else _by_key("customers", "c", f"{source}.organization_id", f"{source}.id")
    if renders_usage(shape):
        sql += _by_key("customer_usage", "u", f"{source}.organization_id", f"{source}.id")
    if shape.parent_key:
        sql += _by_key("customers", "p", "c.organization_id", "c.parent_customer_id", outer=True)
        if renders_usage(shape):
            sql += _by_key("customer_usage", "pu", "p.organization_id", "p.id", outer=True)
    return sql


# The SQL of the domain's operators (service/domain/listing.py).
COMPARISON_SQL = {"lt": "<", "lte": "<=", "gt": ">", "gte": ">="}
# operator -> (LIKE or ILIKE, pattern around the escaped value, negated)
TEXT_MATCH_SQL: dict[str, tuple[str, str, bool]] = {
    "contains": ("LIKE", "%{}%", False),
    "not_contains": ("LIKE", "%{}%", True),
    "icontains": ("ILIKE", "%{}%", False),
    "startswith": ("LIKE", "{}%", False),
    "not_startswith": ("LIKE", "{}%", True),
    "endswith": ("LIKE", "%{}", False),
    "not_endswith": ("LIKE", "%{}", True),
}
assert set(COMPARISON_SQL) == COMPARISONS and set(TEXT_MATCH_SQL) == TEXT_MATCHES


def column(name: str, driving: str = "c") -> str:
    """A customer column over its table's alias: usage columns on ``u``, profile columns on
    ``c``, the keys both hold on the ``driving`` table's."""
    if name in SHARED_COLUMNS:
        return f"{driving}.{name}"
    return f"u.{name}" if name in USAGE_COLUMNS else f"c.{name}"


def filter_expression(name: str, driving: str = "c") -> str:
    """The SQL of a filterable field (a column of its name: :func:`column`)."""
    if name not in FILTER_FIELDS:
        raise ValueError(f"not a filterable field: {name!r}")
    return column(name, driving)


def condition_sql(cond: Condition, p: _Params, driving: str = "c") -> str:
    """One condition as SQL: the field's expression from the allow-list, the values as
    parameters. A missing value (NULL) matches ``ne``, the negated text matches and
    ``empty``, and nothing else."""
    expr, kind = filter_expression(cond.field, driving), FILTER_FIELDS[cond.field]
    if cond.operator == "eq":
        return f"{expr} = ANY({p(list(cond.values), kind + '[]')})"
    if cond.operator == "ne":
        return f"coalesce({expr} <> ALL({p(list(cond.values), kind + '[]')}), true)"
    if cond.operator in COMPARISON_SQL:
        return f"{expr} {COMPARISON_SQL[cond.operator]} {p(cond.values[0], kind)}"
    if cond.operator in TEXT_MATCH_SQL:
        like, pattern, negated = TEXT_MATCH_SQL[cond.operator]
        match = f"{expr} {like} {p(pattern.format(escape_like(str(cond.values[0]))))}"
        return f"coalesce(NOT ({match}), true)" if negated else match
    blank = f"({expr} IS NULL OR {expr} = '')" if kind == "text" else f"{expr} IS NULL"
    return blank if cond.operator == "empty" else f"NOT {blank}"


class _Params:
    """Collects values and hands out their ``$n`` placeholders."""

    def __init__(self) -> None:
        self.values: list[object] = []

    def __call__(self, value: object, cast: str = "") -> str:
        self.values.append(value)
        return f"${len(self.values)}{'::' + cast if cast else ''}"


def escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def where_sql(q: ListQuery, p: _Params, driving: str = "c") -> str:
    """The filter's conditions, over ``c`` and ``u`` (:func:`column`), the organization and
    environment on the ``driving`` table."""
    f = q.filter
    clauses = [f"{driving}.organization_id = {p(q.organization_id)}", f"{driving}.environment = {p(q.environment)}"]
    if f.statuses:
        clauses.append(f"c.status = ANY({p(list(f.statuses), 'text[]')})")
    if f.name_contains:
        clauses.append(f"c.name ILIKE {p('%' + escape_like(f.name_contains) + '%')}")
    if f.email:
        clauses.append(f"lower(c.email) = lower({p(f.email)})")
    for name, values, sql_type in (
        ("id", f.ids, "uuid[]"),
        ("customer_identifier", f.identifiers, "text[]"),
        ("parent_customer_id", f.parent_ids, "uuid[]"),
    ):
        if values:
            clauses.append(f"{column(name, driving)} = ANY({p(list(values), sql_type)})")
    for name, op, value in (
        ("first_seen", ">=", f.first_seen_gte),
        ("first_seen", "<=", f.first_seen_lte),
        ("last_active", ">=", f.last_active_gte),
        ("last_active", "<=", f.last_active_lte),
        ("total_cost", ">=", f.total_cost_gte),
        ("total_cost", "<=", f.total_cost_lte),
    ):
        if value is not None:
            clauses.append(f"{column(name)} {op} {p(value)}")
    if f.metadata:
        clauses.append(f"c.metadata @> {p(dict(f.metadata), 'jsonb')}")
    if f.period_budget_share_gte is not None:
        usage = CUSTOMER_FIELDS["total_period_usage"].format(**ROWS)
        clauses.append(f"c.period_budget > 0 AND {usage} >= c.period_budget * {p(f.period_budget_share_gte)}")
    clauses.extend(condition_sql(cond, p, driving) for cond in f.conditions)
    if f.nothing:
        clauses.append("false")
    return " AND ".join(clauses)


def _tables(driving: str, f: CustomerFilter, sort: SortField | None = None) -> str:
    """The driving table and, where the filter or the sort reads it, the other one: probed by primary key
    for each row the driving table yields, never joined any other way. A join the planner
    chose itself could, on statistics that predate a bulk load, rescan the other table's
    rows for every driving row (measured: 537 ms instead of 2 for a status filter on a page
    sorted by usage, 30k customers)."""
    other = "c" if driving == "u" else "u"
    sql = f"{TABLES[driving]} {driving}"
    if (sort is not None and sort.table == other) or (touches_profile(f) if other == "c" else touches_usage(f)):
        sql += _by_key(TABLES[other], other, f"{driving}.organization_id", f"{driving}.id")
    return sql


def _driving(sort: SortField, f: CustomerFilter) -> str:
    """The table a page is chosen from: the one whose index holds the sort, unless the filter
    names customers by profile keys (identifiers, email, parent) — at most the values given
    match, so they are found by their index and sorted, instead of walking the sort index
    of the whole organization for them."""
    if sort.table == "u" and (f.identifiers or f.email or f.parent_ids):
        return "c"
    return sort.table


# A profile filter with its own index (the name's trigrams, the metadata's GIN) may match a
# handful of customers or most of them, and no statistics say which (they may be stale or
# absent: tests/test_stale_statistics.py). A page sorted by usage under such a filter is
# chosen by counting its matches first, at most this many: up to it, the matches are found
# by their index and sorted (a usage probe each); past it, the sort index is walked and
# each row checked (the matches are then common enough to fill a page soon). Walking costs
# about rows/matches x limit probes, sorting about matches: they meet near sqrt(50 x rows),
# some 5,000 for an organization of 500,000.
INDEXED_MATCHES = 5000


def _indexed_profile(f: CustomerFilter) -> CustomerFilter | None:
    """The part of ``f`` an index on customers finds (name, metadata), if any."""
    names = tuple(c for c in f.conditions if c.field == "name")
    if not (f.name_contains or f.metadata or names):
        return None
    return CustomerFilter(name_contains=f.name_contains, metadata=f.metadata, conditions=names)


def page_sql(q: ListQuery, shape: Shape, p: _Params | None = None) -> tuple[str, list[object]]:
    """One statement returning up to ``limit + 1`` rows of (doc, k, kid, sort_key, id): the
    JSON document, and the sort key and id as text for the cursor. The extra row says
    whether more follow."""
    p = p or _Params()
    sort = SORT_FIELDS[q.sort.field]
    # Walking backwards reverses the scan; the caller puts the rows back in order.
    descending = q.sort.descending != bool(q.position and q.position.backwards)
    direction = "DESC" if descending else "ASC"
    d = _driving(sort, q.filter)
    indexed = _indexed_profile(q.filter) if d == "u" else None
    if indexed is None:
        picked = _pick(q, p, d, sort, descending)
    else:
        # Both ways, each behind a one-time filter on the bounded count of the indexed
        # matches (a CTE, counted once): only one of them runs.
        probe = replace(q, filter=indexed)
        picked = (
            f"WITH probe AS MATERIALIZED (SELECT count(*) AS n FROM (SELECT 1 FROM customers c"
            f" WHERE {where_sql(probe, p, 'c')} LIMIT {INDEXED_MATCHES + 1}) m)"
            f" ({_pick(q, p, 'c', sort, descending, f'(SELECT n FROM probe) <= {INDEXED_MATCHES}')})"
            f" UNION ALL ({_pick(q, p, 'u', sort, descending, f'(SELECT n FROM probe) > {INDEXED_MATCHES}')})"
        )
    # The inner query picks the page's rows (from the driving table's sort index, skipping
    # OFFSET rows there, reading no other table unless a filter needs it); the outer one
    # fetches and renders only those rows. Rendering in the inner query would build a JSON
    # document for every skipped row of a deep OFFSET.
    sql = (
        f"SELECT {shape_sql(shape)}::text AS doc, pg.k, pg.id::text AS kid, pg.sort_key, pg.id FROM ({picked})"
        f" pg{rows_sql(shape, 'pg')} ORDER BY pg.sort_key {direction}, pg.id {direction}"
    )
    return sql, p.values


def _pick(q: ListQuery, p: _Params, d: str, sort: SortField, descending: bool, gate: str = "") -> str:
    """The page's keys (organization, id, sort key) driven from table ``d``; ``gate``, a
    condition on no row, decides once whether this way runs at all."""
    where = where_sql(q, p, d)
    if q.position is not None:
        op = "<" if descending else ">"
        # The key travels as text (the driver would want a typed object for a typed parameter);
        # PostgreSQL casts it back to the sort expression's type.
        key = f"{p(q.position.key, 'text')}::{sort.sql_type}"
        where += f" AND ({sort.expr}, {sort.tiebreak}) {op} ({key}, {p(q.position.id, 'uuid')})"
    if gate:
        where += f" AND {gate}"
    direction = "DESC" if descending else "ASC"
    return (
        f"SELECT {d}.organization_id, {d}.id, {sort.expr} AS sort_key, ({sort.expr})::text AS k"
        f" FROM {_tables(d, q.filter, sort)} WHERE {where}"
        f" ORDER BY {sort.expr} {direction}, {sort.tiebreak} {direction}"
        f" LIMIT {p(q.limit + 1)} OFFSET {p(q.offset)}"
    )


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
    driving = "u" if touches_usage(q.filter) and not touches_profile(q.filter) else "c"
    return f"SELECT count(*) FROM {_tables(driving, q.filter)} WHERE {where_sql(q, p, driving)}", p.values


# The columns of a customer that live in customer_usage (migration 0007).
USAGE_COLUMNS = frozenset(
    {*LIFETIME_SUMS, "first_seen", "last_active", "active_days", "average_latency", "average_ttft"}
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
    (total, doc, k, kid, as_of); with no rows on the page, one row whose doc is NULL.
    ``as_of`` is the change-log position the statement's snapshot reflects
    (service/store/changelog.py)."""
    if q.filter.nothing:  # a status the route's vocabulary has and tally never holds: no table to read
        total = "0" if q.count else "NULL"
        return f"SELECT {total}::bigint AS total, NULL AS doc, NULL AS k, NULL AS kid, {HORIZON} AS as_of", []
    p = _Params()
    total = f"({count_sql(q, p)[0]})" if q.count else "(SELECT NULL::bigint)"
    page, _ = page_sql(q, shape, p)
    descending = q.sort.descending != bool(q.position and q.position.backwards)
    direction = "DESC" if descending else "ASC"
    # One row even for an empty page: the total and the position are always answered.
    sql = (
        f"SELECT t.total, page.doc, page.k, page.kid, {HORIZON} AS as_of FROM {total} t(total)"
        f" LEFT JOIN LATERAL ({page}) page ON true ORDER BY page.sort_key {direction}, page.id {direction}"
    )
    return sql, p.values
