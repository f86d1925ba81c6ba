"""Arrays the store sends as one text literal (service/store/db.py ``columns``) read back in
PostgreSQL exactly as the same values sent as binary arrays do: any text, NULL, Decimals of any
scale and exponent. The binary form is the oracle: it is how these arrays went before."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import asyncpg
import pytest
from hypothesis import given
from hypothesis import settings as examples
from hypothesis import strategies as st

from service.store.db import array_literal, columns
from tests.support import BASE_DSN, with_database

# Any text PostgreSQL holds (no NUL; surrogates are not UTF-8), None among it.
texts = st.lists(
    st.none() | st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))), max_size=30
)
# Amounts as events carry them: an integer mantissa at any scale or exponent Python prints.
decimals = st.lists(
    st.none()
    | st.builds(
        lambda digits, exponent: Decimal(digits).scaleb(exponent),
        st.integers(min_value=-(10**20), max_value=10**20),
        st.integers(min_value=-20, max_value=12),
    ),
    max_size=30,
)


def _both_ways(kind: str, values: list[object]) -> tuple[object, object]:
    """``values`` read back from a binary array and from the literal ``columns`` makes."""
    statement = f"SELECT $1::{kind}[], $2::text::{kind}[]"
    arrays = columns([(v, v) for v in values], statement) if values else [[], "{}"]

    async def read() -> tuple[object, object]:
        conn = await asyncpg.connect(with_database(BASE_DSN, "postgres"))
        try:
            row = await conn.fetchrow(statement, *arrays)
        finally:
            await conn.close()
        return row[0], row[1]

    return asyncio.run(read())


@pytest.mark.services
@examples(max_examples=150, deadline=None)
@given(values=texts)
def test_text_reads_back_as_itself(values: list[str | None]) -> None:
    binary, literal = _both_ways("text", values)
    assert literal == binary == values


@pytest.mark.services
@examples(max_examples=150, deadline=None)
@given(values=decimals)
def test_decimals_read_back_with_their_value_and_scale(values: list[Decimal | None]) -> None:
    binary, literal = _both_ways("numeric", values)
    assert [str(v) for v in literal] == [str(v) for v in binary]  # the same digits and scale
    assert literal == values


def test_only_the_parameters_cast_from_text_become_literals() -> None:
    statement = "SELECT * FROM unnest($1::int8[], $2::text::text[], $3::text[], $4::text::numeric[])"
    rows = [(1, 'say "hi"\\', "plain", Decimal("1.50")), (2, None, None, None)]
    assert columns(rows, statement) == [[1, 2], '{"say \\"hi\\"\\\\",NULL}', ["plain", None], "{1.50,NULL}"]
    assert columns(rows) == [[1, 2], ['say "hi"\\', None], ["plain", None], [Decimal("1.50"), None]]
    # Strings with nothing to escape, and numbers without a NULL, are joined whole.
    assert array_literal(["a", "b c", "", "NULL"]) == '{"a","b c","","NULL"}'
    assert array_literal([Decimal("1E+2"), 3, Decimal("-0.000")]) == "{1E+2,3,-0.000}"
    assert array_literal([]) == "{}"
