"""One condition builder for every dialect (service/api/conditions.py): a dialect's field and
operator names become the core's, and what a dialect lacks, or a value the core refuses, is
an error naming the client's own parameter. No database."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from service.api.compat import flexprice, respan
from service.api.conditions import Term, Vocabulary
from service.domain.errors import InvalidInput
from service.domain.listing import MAX_CONDITIONS, Condition


def test_a_dialects_names_become_the_cores() -> None:
    assert respan.FILTERS.conditions(
        [
            Term("filters.total_prompt_tokens", "total_prompt_tokens", "not_in", [1, "2"]),
            Term("filters.last_active_timeframe", "last_active_timeframe", "", ["2025-01-01"]),
            Term("filters.total_cost", "total_cost", "gte", ["12.5"]),
        ]
    ) == (
        Condition("prompt_tokens", "ne", (1, 2)),
        Condition("last_active", "eq", (datetime(2025, 1, 1, tzinfo=UTC),)),
        Condition("total_cost", "gte", (Decimal("12.5"),)),
    )
    assert flexprice.FILTERS.conditions(
        [
            Term("filters.0", "external_id", "in", ["a", "b"]),
            Term("filters.1", "created_at", "before", ["2025-01-02"]),
            Term("start_time", "created_at", "gte", [datetime(2025, 1, 1, tzinfo=UTC)]),
        ]
    ) == (
        Condition("customer_identifier", "eq", ("a", "b")),
        Condition("created_at", "lt", (datetime(2025, 1, 2, tzinfo=UTC),)),
        Condition("created_at", "gte", (datetime(2025, 1, 1, tzinfo=UTC),)),
    )
    assert flexprice.FILTERS.conditions([]) == ()


def test_any_dialect_is_its_names() -> None:
    dialect = Vocabulary({"who": "customer_identifier", "spent": "total_cost"}, {"is": "eq", "over": "gt"})
    assert dialect.conditions([Term("q.who", "who", "is", ["a"]), Term("q.spent", "spent", "over", [1])]) == (
        Condition("customer_identifier", "eq", ("a",)),
        Condition("total_cost", "gt", (Decimal(1),)),
    )


@pytest.mark.parametrize(
    "vocabulary, term, detail",
    [
        # A field the core has, but the dialect does not name.
        (flexprice.FILTERS, Term("filters.0", "total_cost", "gt", [1]), "cannot filter on 'total_cost'; filterable:"),
        (respan.FILTERS, Term("filters.tenant_id", "tenant_id", "", ["x"]), "filterable: customer_identifier, name,"),
        (flexprice.FILTERS, Term("filters.0", "name", "like", ["x"]), "unknown operator 'like'; one of 'eq', 'in',"),
        (respan.FILTERS, Term("filters.name", "name", "like", ["x"]), "one of '', 'in', 'not'"),
        # What the core refuses, named as the dialect's parameter.
        (flexprice.FILTERS, Term("filters.3", "created_at", "contains", ["x"]), "applies to text fields only"),
        (respan.FILTERS, Term("filters.total_cost", "total_cost", "gte", [1, 2]), "takes exactly one value"),
        (flexprice.FILTERS, Term("end_time", "created_at", "lte", ["soon"]), "must be an ISO 8601 date"),
    ],
)
def test_what_a_dialect_cannot_say_names_the_parameter(vocabulary: Vocabulary, term: Term, detail: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        vocabulary.conditions([term])
    assert refused.value.field == term.param
    assert detail in refused.value.reason


def test_conditions_are_counted_as_they_come() -> None:
    """A list of conditions longer than the core takes is refused at the first one too many,
    however long it is (Respan's filters take a list per field)."""
    drawn = 0

    def endless() -> Iterator[Term]:
        nonlocal drawn
        while True:
            drawn += 1
            yield Term(f"filters.{drawn}", "name", "contains", ["x"])

    with pytest.raises(InvalidInput) as refused:
        respan.FILTERS.conditions(endless())
    assert (refused.value.field, drawn) == ("filters", MAX_CONDITIONS + 1)
