"""Pure unit tests of the list query (service/domain/listing.py) and its compiler
(service/store/listing.py): no database, no HTTP."""

from __future__ import annotations

import base64
import re
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal

import orjson
import pytest

from service.api.models import SORT_CHOICES
from service.domain.errors import InvalidInput
from service.domain.listing import (
    FILTER_FIELDS,
    MAX_CONDITIONS,
    MAX_FILTER_VALUES,
    MAX_LIMIT,
    OPERATORS,
    CursorClaims,
    CursorCodec,
    CustomerFilter,
    ListQuery,
    Position,
    Sort,
    condition,
    resume,
)
from service.store.listing import SORT_FIELDS, USAGE_COLUMNS, count_sql, escape_like, filter_expression, page_sql
from service.store.rendering import CUSTOMER_FIELDS, Shape, shape_sql

ORG = uuid.UUID("00000000-0000-4000-8000-000000000001")
OTHER_ORG = uuid.UUID("00000000-0000-4000-8000-000000000002")
SECRET = b"k" * 32
SHAPE = Shape(fields={"id": "id", "name": "name"})


def field_error(exc: pytest.ExceptionInfo[InvalidInput]) -> str:
    """The one field a domain error names (the HTTP edge turns it into a 400 naming it)."""
    return exc.value.field


# --- Sort ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SORT_FIELDS))
def test_sort_parse_every_field_both_ways(name: str) -> None:
    up, down = Sort.parse(name), Sort.parse("-" + name)
    assert (up.field, up.descending) == (name, False)
    assert (down.field, down.descending) == (name, True)
    assert str(up) == name and str(down) == "-" + name
    assert Sort.parse(str(down)) == down


@pytest.mark.parametrize("text", ["", "-", "--name", "password", "Name", "name ", "c.name", "name;drop", "+name"])
def test_sort_parse_refuses(text: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        Sort.parse(text)
    assert field_error(exc) == "sort_by"
    with pytest.raises(InvalidInput) as exc:
        Sort.parse(text, "order")
    assert field_error(exc) == "order"


def test_default_sort_is_newest_first_seen() -> None:
    assert str(Sort()) == "-first_seen"


def test_the_api_offers_exactly_the_sort_fields() -> None:
    offered = set(SORT_CHOICES)
    assert offered == set(SORT_FIELDS) | {"-" + f for f in SORT_FIELDS}


@pytest.mark.parametrize("name", list(SORT_FIELDS))
def test_sort_field_has_its_keyset_index(name: str) -> None:
    """query.py: each sort expression has an index (organization_id, environment, expr, id),
    so a page at any depth is an index scan."""
    from service.infra.settings import DEFAULT_MIGRATIONS_DIR

    sql = " ".join(p.read_text() for p in sorted(DEFAULT_MIGRATIONS_DIR.glob("*.sql")))
    normal = lambda s: re.sub(r"\s+", "", s)  # noqa: E731
    indexes = {normal(m) for m in re.findall(r"\(organization_id,\s*environment,\s*(.+?),\s*id\)", sql, re.S)}
    field = SORT_FIELDS[name]
    assert normal(field.expr.replace(f"{field.table}.", "")) in indexes


# --- escape_like -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, escaped",
    [
        ("plain", "plain"),
        ("50%", "50\\%"),
        ("a_b", "a\\_b"),
        ("back\\slash", "back\\\\slash"),
        ("\\%_", "\\\\\\%\\_"),
        ("", ""),
    ],
)
def test_escape_like(text: str, escaped: str) -> None:
    assert escape_like(text) == escaped


def test_escape_like_leaves_no_unescaped_wildcard() -> None:
    escaped = escape_like("%_\\x%%__")
    # after removing escaped pairs nothing special is left
    assert re.sub(r"\\[\\%_]", "", escaped) == "x"


# --- ListQuery bounds ------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [0, -1, MAX_LIMIT + 1])
def test_limit_bounds(limit: int) -> None:
    with pytest.raises(InvalidInput) as exc:
        ListQuery(ORG, "prod", limit=limit)
    assert field_error(exc) == "limit"


def test_limit_edges_are_allowed() -> None:
    assert ListQuery(ORG, "prod", limit=1).limit == 1
    assert ListQuery(ORG, "prod", limit=MAX_LIMIT).limit == MAX_LIMIT


def test_offset_bounds() -> None:
    with pytest.raises(InvalidInput) as exc:
        ListQuery(ORG, "prod", offset=-1)
    assert field_error(exc) == "offset"
    assert ListQuery(ORG, "prod", offset=0).offset == 0


def test_position_and_offset_do_not_mix() -> None:
    with pytest.raises(InvalidInput) as exc:
        ListQuery(ORG, "prod", offset=10, position=Position("0", str(uuid.uuid4())))
    assert field_error(exc) == "cursor"


def test_defaults() -> None:
    q = ListQuery(ORG, "prod")
    assert (q.limit, q.offset, q.position, q.count, str(q.sort)) == (50, 0, None, True, "-first_seen")


# --- SQL text --------------------------------------------------------------------------------


def test_values_never_reach_the_sql_text() -> None:
    evil = "x'); DROP TABLE customers; --"
    f = CustomerFilter(
        statuses=("active",),
        name_contains=evil,
        email=evil,
        identifiers=(evil,),
        metadata=((evil, evil),),
        total_cost_gte=Decimal("1"),
        first_seen_lte=datetime(2026, 1, 1, tzinfo=UTC),
    )
    q = ListQuery(ORG, "prod", filter=f, position=Position(evil, str(uuid.uuid4())))
    sql, args = page_sql(q, SHAPE)
    assert evil not in sql and "DROP" not in sql
    assert "%" + escape_like(evil) + "%" in args
    assert evil in args
    csql, cargs = count_sql(q)
    assert evil not in csql
    assert len(re.findall(r"\$\d+", csql)) == len(cargs)
    # every placeholder has a value, in order
    numbers = sorted({int(n) for n in re.findall(r"\$(\d+)", sql)})
    assert numbers == list(range(1, len(args) + 1))


def test_page_sql_fetches_one_extra_row_and_orders_by_key_then_id() -> None:
    q = ListQuery(ORG, "prod", sort=Sort("total_cost", False), limit=10, offset=20)
    sql, args = page_sql(q, SHAPE)
    # A usage field is paged from the usage table: its ties break on that row's id, inside its index.
    assert "ORDER BY u.total_cost ASC, u.id ASC" in sql
    assert args[-2:] == [11, 20]
    q = replace(q, sort=Sort("total_cost", True))
    assert "ORDER BY u.total_cost DESC, u.id DESC" in page_sql(q, SHAPE)[0]
    q = replace(q, sort=Sort("name", True))
    assert "ORDER BY coalesce(c.name, '') DESC, c.id DESC" in page_sql(q, SHAPE)[0]


@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("backwards", [False, True])
def test_keyset_direction(descending: bool, backwards: bool) -> None:
    q = ListQuery(
        ORG, "prod", sort=Sort("first_seen", descending), position=Position("x", str(uuid.uuid4()), backwards)
    )
    sql, args = page_sql(q, SHAPE)
    scan_descending = descending != backwards
    match = re.search(r"u\.id\) ([<>]) \((\$\d+)::text::timestamptz, (\$\d+)::uuid\)", sql)
    assert match is not None, sql
    assert match.group(1) == ("<" if scan_descending else ">")
    assert args[int(match.group(2)[1:]) - 1] == "x"
    assert f"u.id {'DESC' if scan_descending else 'ASC'}" in sql


def test_shape_refuses_unknown_fields_and_odd_keys() -> None:
    with pytest.raises(ValueError):
        shape_sql(Shape(fields={"x": "password_hash"}))
    with pytest.raises(ValueError):
        shape_sql(Shape(fields={"x') || pg_sleep(1) || ('": "name"}))
    assert "row_to_json" in shape_sql(Shape(fields={k: k for k in CUSTOMER_FIELDS}))  # the whole catalogue renders


def test_fingerprint() -> None:
    a = CustomerFilter(statuses=("active", "draft"), name_contains="x")
    assert a.fingerprint() == CustomerFilter(statuses=("active", "draft"), name_contains="x").fingerprint()
    assert a.fingerprint() != CustomerFilter(statuses=("active",), name_contains="x").fingerprint()
    assert a.fingerprint() != CustomerFilter(statuses=("active", "draft"), name_contains="y").fingerprint()
    assert CustomerFilter().fingerprint() != CustomerFilter(total_cost_gte=Decimal(0)).fingerprint()
    assert CustomerFilter().fingerprint() != CustomerFilter(metadata=(("a", "b"),)).fingerprint()


# --- cursors ---------------------------------------------------------------------------------

Q = ListQuery(ORG, "prod", filter=CustomerFilter(statuses=("active",)), sort=Sort("total_cost", False), limit=5)
POS = Position("10.25", str(uuid.uuid4()))


def _decode_payload(token: str) -> list:
    body = token.partition(".")[0]
    return orjson.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


def _encode_payload(payload: list, signature: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(payload)).rstrip(b"=").decode() + "." + signature


def test_cursor_round_trip() -> None:
    codec = CursorCodec(SECRET)
    for position in (POS, Position("-infinity", str(uuid.uuid4()), True), Position("é ✓ 'x'", str(uuid.uuid4()))):
        token = codec.encode(Q, position)
        assert re.fullmatch(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+", token), token  # URL-safe, unpadded
        claims = codec.decode(token)
        assert claims == CursorClaims(str(ORG), "prod", "total_cost", Q.filter.fingerprint(), position)


def test_cursor_is_deterministic_and_bound_to_its_secret() -> None:
    token = CursorCodec(SECRET).encode(Q, POS)
    assert CursorCodec(SECRET).encode(Q, POS) == token
    with pytest.raises(InvalidInput) as exc:
        CursorCodec(b"another secret").decode(token)
    assert field_error(exc) == "cursor"


def _flip(text: str, index: int) -> str:
    return text[:index] + ("A" if text[index] != "A" else "B") + text[index + 1 :]


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda t: _flip(t, 0), id="payload-first-char"),
        pytest.param(lambda t: _flip(t, t.index(".") - 2), id="payload-last-chars"),
        pytest.param(lambda t: _flip(t, len(t) - 2), id="signature"),
        pytest.param(lambda t: t.partition(".")[0], id="no-signature"),
        pytest.param(lambda t: t.partition(".")[0] + ".", id="empty-signature"),
        pytest.param(lambda t: "." + t.partition(".")[2], id="empty-payload"),
        pytest.param(lambda t: t + ".extra", id="extra-part"),
        pytest.param(lambda t: t.replace(".", ""), id="no-dot"),
        pytest.param(lambda t: "", id="empty"),
        pytest.param(lambda t: "ü.ü", id="non-ascii"),
        pytest.param(lambda t: "a.b.c", id="junk"),
        pytest.param(
            lambda t: _encode_payload([*_decode_payload(t)[:5], "0", *_decode_payload(t)[6:]], t.partition(".")[2]),
            id="edited-key",
        ),
        pytest.param(
            lambda t: _encode_payload([*_decode_payload(t)[:7], True], t.partition(".")[2]), id="edited-direction"
        ),
    ],
)
def test_tampered_cursor(tamper) -> None:
    codec = CursorCodec(SECRET)
    token = codec.encode(Q, POS)
    bad = tamper(token)
    assert bad != token
    with pytest.raises(InvalidInput) as exc:
        codec.decode(bad)
    assert field_error(exc) == "cursor"


def test_a_signed_but_malformed_payload_is_refused() -> None:
    """Even a correctly signed payload of the wrong shape or version is refused, not a crash."""
    codec = CursorCodec(SECRET)
    for payload in (
        b"not json",
        b"[1,2,3]",
        b"{}",
        orjson.dumps([99, str(ORG), "prod", "total_cost", "f", "k", "i", False]),
    ):
        token = base64.urlsafe_b64encode(payload).rstrip(b"=").decode()
        token += "." + base64.urlsafe_b64encode(codec._sign(payload)).rstrip(b"=").decode()
        with pytest.raises(InvalidInput) as exc:
            codec.decode(token)
        assert field_error(exc) == "cursor"


def test_resume_continues_with_the_cursor_sort_and_position() -> None:
    codec = CursorCodec(SECRET)
    claims = codec.decode(codec.encode(Q, POS))
    fresh = replace(Q, sort=Sort(), limit=7)  # the request did not name a sort
    resumed = resume(fresh, claims, explicit_sort=False)
    assert resumed.sort == Sort("total_cost", False)
    assert resumed.position == POS and resumed.offset == 0 and resumed.limit == 7
    assert resume(Q, claims, explicit_sort=True).position == POS


@pytest.mark.parametrize(
    "change, explicit_sort",
    [
        pytest.param({"organization_id": OTHER_ORG}, False, id="organization"),
        pytest.param({"environment": "test"}, False, id="environment"),
        pytest.param({"filter": CustomerFilter()}, False, id="filter-dropped"),
        pytest.param({"filter": CustomerFilter(statuses=("draft",))}, False, id="filter-changed"),
        pytest.param({"filter": CustomerFilter(statuses=("active",), email="a@b.c")}, False, id="filter-added"),
        pytest.param({"sort": Sort("total_cost", True)}, True, id="sort-direction"),
        pytest.param({"sort": Sort("name", False)}, True, id="sort-field"),
    ],
)
def test_resume_refuses_a_mismatch(change: dict, explicit_sort: bool) -> None:
    codec = CursorCodec(SECRET)
    claims = codec.decode(codec.encode(Q, POS))
    with pytest.raises(InvalidInput) as exc:
        resume(replace(Q, **change), claims, explicit_sort=explicit_sort)
    assert field_error(exc) == "cursor"


def test_resume_ignores_an_implicit_default_sort() -> None:
    codec = CursorCodec(SECRET)
    claims = codec.decode(codec.encode(Q, POS))
    assert resume(replace(Q, sort=Sort("name", True)), claims, explicit_sort=False).sort == Q.sort


# ---- generic conditions ---------------------------------------------------------------------

CONDITION_ORG = uuid.uuid4()


def _where(*conds: object) -> tuple[str, list[object]]:
    q = ListQuery(CONDITION_ORG, "prod", filter=CustomerFilter(conditions=tuple(conds)))  # type: ignore[arg-type]
    return count_sql(q)


@pytest.mark.parametrize("operator", sorted(OPERATORS))
def test_every_operator_is_parameterised(operator: str) -> None:
    hostile = "x'); DROP TABLE customers; --"
    field = "name"
    values: list[object] = [] if operator in ("empty", "not_empty") else [hostile]
    sql, args = _where(condition(field, operator, values, "filters.name"))
    assert hostile not in sql and "DROP" not in sql
    if values:
        assert any(hostile in str(a) for a in args)


def test_condition_values_are_typed_and_like_patterns_escaped() -> None:
    assert condition("total_cost", "gte", ["12.5"], "p").values == (Decimal("12.5"),)
    assert condition("number_of_requests", "lt", [10.0], "p").values == (10,)
    assert condition("average_latency", "gt", [1], "p").values == (1.0,)
    assert condition("first_seen", "lt", ["2025-01-01"], "p").values == (datetime(2025, 1, 1, tzinfo=UTC),)
    sql, args = _where(condition("name", "contains", ["50%_off"], "p"))
    assert "c.name LIKE $3" in sql and args[2] == "%50\\%\\_off%"
    sql, args = _where(condition("email", "startswith", ["a"], "p"), condition("email", "endswith", ["z"], "p"))
    assert args[2:] == ["a%", "%z"]
    sql, _ = _where(condition("email", "icontains", ["A"], "p"))
    assert "ILIKE" in sql


@pytest.mark.parametrize(
    ("field", "operator", "values"),
    [
        ("tenant_id", "eq", ["x"]),  # not filterable
        ("name; DROP", "eq", ["x"]),
        ("name", "like", ["x"]),  # no such operator
        ("total_cost", "contains", ["1"]),  # text matches on text fields only
        ("total_cost", "gte", []),
        ("total_cost", "gte", [1, 2]),
        ("total_cost", "gte", ["lots"]),
        ("total_cost", "gte", ["NaN"]),
        ("total_cost", "gte", [True]),
        ("total_cost", "gte", [10**20]),
        ("number_of_requests", "gte", [1.5]),
        ("number_of_requests", "gte", [2**63]),
        ("first_seen", "gte", ["yesterday"]),
        ("first_seen", "gte", ["0001-01-01T00:00:00+05:00"]),
        ("first_seen", "gte", [5]),
        ("name", "eq", ["a\x00"]),
        ("name", "eq", ["x" * 1001]),
        ("name", "eq", [{"a": 1}]),
        ("name", "eq", ["x"] * 1001),
    ],
)
def test_condition_refuses_naming_the_parameter(field: str, operator: str, values: list[object]) -> None:
    with pytest.raises(InvalidInput) as caught:
        condition(field, operator, values, "filters.x")
    assert caught.value.field == "filters.x"


def test_conditions_are_bounded_and_part_of_the_fingerprint() -> None:
    one = condition("name", "eq", ["a"], "p")
    with pytest.raises(InvalidInput) as caught:
        CustomerFilter(conditions=(one,) * (MAX_CONDITIONS + 1))
    assert caught.value.field == "filters"
    # The values of all conditions together are bounded too: each is tested on every customer.
    half = condition("name", "eq", [str(i) for i in range(MAX_FILTER_VALUES // 2 + 1)], "p")
    with pytest.raises(InvalidInput) as caught:
        CustomerFilter(conditions=(half, half))
    assert caught.value.field == "filters" and "together" in caught.value.reason
    assert CustomerFilter(conditions=(one,)).fingerprint() != CustomerFilter().fingerprint()
    assert (
        CustomerFilter(conditions=(one,)).fingerprint()
        != CustomerFilter(conditions=(condition("name", "eq", ["b"], "p"),)).fingerprint()
    )


def test_every_filter_field_is_a_customer_column() -> None:
    for name in FILTER_FIELDS:
        table = "u" if name in USAGE_COLUMNS else "c"
        assert name in CUSTOMER_FIELDS and filter_expression(name) == f"{table}.{name}"
    with pytest.raises(ValueError):
        filter_expression("password; --")


def test_nothing_matches_nothing() -> None:
    sql, _ = count_sql(ListQuery(CONDITION_ORG, "prod", filter=CustomerFilter(nothing=True)))
    assert sql.endswith("AND false")


def test_counts_join_usage_only_when_the_filter_reads_it() -> None:
    def source(f: CustomerFilter) -> str:
        sql, _ = count_sql(ListQuery(ORG, "prod", filter=f))
        tables = sql.split(" FROM ")[1].split(" WHERE ")[0]
        return "both" if " JOIN " in tables else tables.split(" ")[0]

    assert source(CustomerFilter(name_contains="ada")) == "customers"
    assert source(CustomerFilter(metadata=(("plan", "pro"),), email="a@b.co")) == "customers"
    assert source(CustomerFilter(name_contains="ada", total_cost_gte=Decimal(1))) == "both"
    assert source(CustomerFilter(period_budget_share_gte=Decimal("0.8"))) == "both"
    # Usage fields alone count usage rows (every customer has one), without the join.
    assert source(CustomerFilter(conditions=(condition("total_tokens", "gt", [5], "filters"),))) == "customer_usage"
    assert source(CustomerFilter(total_cost_gte=Decimal(1), ids=(ORG,))) == "customer_usage"
    both = (condition("total_tokens", "gt", [5], "f"), condition("name", "eq", ["a"], "f"))
    assert source(CustomerFilter(conditions=both)) == "both"
    assert source(CustomerFilter(conditions=(condition("email", "eq", ["a@b.co"], "filters"),))) == "customers"
    # Every usage column is one the view takes from customer_usage, and none is on customers.
    assert {name for name, f in SORT_FIELDS.items() if f.table == "u"} <= USAGE_COLUMNS
