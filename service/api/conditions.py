"""A dialect's filter conditions as the core's: one builder for every vendor's generic filters
(Respan's ``filters`` object, Flexprice's ``filters`` list). A dialect only names its fields and
operators; which fields, operators, value types and bounds exist is the core's
(service/domain/listing.py :func:`condition`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from service.domain.errors import InvalidInput
from service.domain.listing import MAX_CONDITIONS, Condition, condition


@dataclass(frozen=True)
class Term:
    """One condition as the client wrote it, in its dialect's names; ``param`` is what a 400
    about it names (``filters.total_cost``, ``filters.0``)."""

    param: str
    field: str
    operator: str
    values: Sequence[object]


@dataclass(frozen=True)
class Vocabulary:
    """A dialect's filter names: each of its fields and operators onto the core's."""

    fields: Mapping[str, str]
    operators: Mapping[str, str]

    def conditions(self, terms: Iterable[Term]) -> tuple[Condition, ...]:
        """The core's conditions for ``terms``: InvalidInput naming a term's parameter for a
        field or operator the dialect lacks, or a value the core refuses; naming ``filters``
        past MAX_CONDITIONS (counted as they come, so a long list costs nothing to refuse)."""
        found: list[Condition] = []
        for term in terms:
            if term.field not in self.fields:
                raise InvalidInput(term.param, f"cannot filter on '{term.field}'; filterable: {', '.join(self.fields)}")
            if term.operator not in self.operators:
                known = ", ".join(repr(op) for op in self.operators)
                raise InvalidInput(term.param, f"unknown operator '{term.operator}'; one of {known}")
            if len(found) == MAX_CONDITIONS:
                raise InvalidInput("filters", f"at most {MAX_CONDITIONS} conditions")
            found.append(condition(self.fields[term.field], self.operators[term.operator], term.values, term.param))
        return tuple(found)
