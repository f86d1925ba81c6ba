"""The writable profile of a customer: the one model behind PATCH/POST bodies and the
``customer.upserted`` event's data. Only fields that were sent change."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Annotated, Any, ClassVar
from uuid import UUID

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

from service.domain.vocabulary import ADDRESS_PREFIX, BudgetDuration, Status

# The instants asyncpg reads and writes as -infinity/infinity: never a real time.
_EARLIEST = datetime.min.replace(tzinfo=UTC)
_LATEST = datetime.max.replace(tzinfo=UTC)
TIME_RANGE = "between 0001-01-01 and 9999-12-31 in UTC"


def _utc(value: datetime) -> datetime:
    """In UTC. A time without a zone is refused: '2026-01-01T10:00:00' is a different instant
    in every zone, and guessing one would file events and filters under the wrong hour (a
    bare date is a UTC day: :func:`_iso_time` makes it midnight UTC). An offset that carries
    the time past year 1 or 9999 (``0001-01-01T00:00:00+05:00``) is refused here rather than
    by the database driver."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(NO_ZONE)
    try:
        value = value.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"must be {TIME_RANGE}") from None
    if not _EARLIEST < value < _LATEST:
        raise ValueError(f"must be {TIME_RANGE}")
    return value


TIME_FORMAT = "an ISO 8601 date or date-time with a time zone, e.g. 2026-11-21 or 2026-11-21T10:00:00Z"
NO_ZONE = (
    "must carry a time zone ('Z' or an offset such as +02:00), e.g. 2026-11-21T10:00:00Z: "
    "a time without one is ambiguous"
)


def _iso_time(value: object) -> object:
    """ISO 8601 text: a date (midnight UTC: tally's days are UTC days) or a date-time with its
    zone — what the message says, no more: not numbers read as Unix times, not words."""
    if isinstance(value, datetime):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return datetime.combine(date.fromisoformat(text), time.min, UTC)
        except ValueError:
            pass
        try:
            return datetime.fromisoformat(text)
        except ValueError:
            pass
    raise ValueError(f"must be {TIME_FORMAT}")


def parse_instant(value: object) -> datetime:
    """A client's date or date-time as an aware UTC datetime, by the rules of
    :data:`Timestamp`; ValueError saying what is wrong (for filter values that arrive untyped)."""
    parsed = _iso_time(value)
    assert isinstance(parsed, datetime)
    return _utc(parsed)


def _iso_date(value: object) -> object:
    """An ISO 8601 date (``2026-11-21``) and nothing else: no number read as a Unix time."""
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            pass
    raise ValueError("must be a day, as an ISO 8601 date (e.g. 2026-11-21), not a date-time")


# Deliberately loose (RFC 5322 allows almost anything before the @): it catches what is plainly
# not an address, without refusing real ones.
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def _email(value: str) -> str:
    if not _EMAIL.match(value):
        raise ValueError("must be an email address, e.g. ada@example.com")
    return value


def exact_decimal(places: int, whole: int) -> AfterValidator:
    """A decimal with at most ``places`` digits after the point and ``whole`` before it, each
    limit named in its own message (``1e-30`` has too many decimal places, not too many
    digits). Trailing zeros do not count: ``1.500`` has one decimal place."""

    def check(value: Decimal) -> Decimal:
        normalized = value.normalize()
        exponent = normalized.as_tuple().exponent
        if isinstance(exponent, int) and -exponent > places:
            raise ValueError(f"has more than {places} decimal places")
        if normalized and normalized.adjusted() + 1 > whole:
            raise ValueError(f"has more than {whole} digits before the decimal point")
        return value

    return AfterValidator(check)


# JSON numbers past ±2**53 are not exact in every client (RFC 7493, I-JSON) and a JSON
# parser may already have rounded them: refused rather than stored changed.
MAX_EXACT_NUMBER = 2**53
MAX_METADATA_DEPTH = 32
NUL = "\x00"


@dataclass(frozen=True)
class JsonFault:
    path: str  # dotted, "" for the value itself; long paths are cut short
    detail: str

    def __str__(self) -> str:
        return f"{self.path} {self.detail}" if self.path else self.detail


def _clean(value: object, max_depth: int, numbers: bool) -> bool:
    """True when :func:`json_fault` would find nothing: the same checks on decoded JSON (exact
    types: what a JSON decoder makes), without tracking where. Anything else is left to the
    full walk."""
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[object]
        if type(item) is dict:
            if any(type(key) is not str or NUL in key for key in item):
                return False
            children = item.values()
        elif type(item) is list:
            children = item
        else:
            children = (item,)
            depth = -1  # a scalar at the top: no container to count
        if depth >= max_depth:
            return False
        for child in children:
            if type(child) is str:
                if NUL in child:
                    return False
            elif type(child) is dict or type(child) is list:
                stack.append((child, depth + 1))
            elif type(child) is int or type(child) is float:
                if numbers and abs(child) > MAX_EXACT_NUMBER:
                    return False
            elif child is not None and type(child) is not bool:
                return False
    return True


def json_fault(value: object, *, max_depth: int, numbers: bool = False) -> JsonFault | None:
    """What makes a decoded JSON value unfit to store, or None: nesting deeper than
    ``max_depth`` containers, a NUL character (PostgreSQL text and jsonb cannot hold U+0000)
    in a string or key, and with ``numbers`` a number beyond ±2**53. Iterative, so no input
    can exhaust the stack."""
    if _clean(value, max_depth, numbers):
        return None  # the common case, without building a path for every value
    stack: list[tuple[object, int, tuple[object, ...]]] = [(value, 0, ())]
    while stack:
        item, depth, path = stack.pop()
        fault = None
        if isinstance(item, str):
            fault = "must not contain NUL (U+0000) characters" if NUL in item else None
        elif isinstance(item, (dict, list)):
            if depth >= max_depth:
                fault = f"is nested deeper than {max_depth} levels"
            else:
                pairs = item.items() if isinstance(item, dict) else enumerate(item)
                for key, child in pairs:
                    if isinstance(key, str) and NUL in key:
                        return _at(path, "has a key containing NUL (U+0000)")
                    stack.append((child, depth + 1, (*path, key)))
        elif numbers and isinstance(item, (int, float)) and not isinstance(item, bool):
            fault = (
                f"holds a number beyond ±2^53 ({MAX_EXACT_NUMBER}); send it as a string"
                if abs(item) > MAX_EXACT_NUMBER
                else None
            )
        if fault:
            return _at(path, fault)
    return None


def _at(path: tuple[object, ...], detail: str) -> JsonFault:
    where = ".".join(str(p) for p in path)
    if len(where) > 80:  # a path 1,000 levels deep says no more than its start
        where = where[:80] + "…"
    return JsonFault(where, detail)


def _metadata(value: dict[str, Any]) -> dict[str, Any]:
    fault = json_fault(value, max_depth=MAX_METADATA_DEPTH, numbers=True)
    if fault:
        raise ValueError(str(fault))
    return value


Timestamp = Annotated[datetime, BeforeValidator(_iso_time), AfterValidator(_utc)]
Day = Annotated[date, BeforeValidator(_iso_date)]
ShortText = Annotated[str, StringConstraints(max_length=500)]
Email = Annotated[str, StringConstraints(max_length=320), AfterValidator(_email)]
Identifier = Annotated[str, StringConstraints(min_length=1, max_length=255)]
Money = Annotated[Decimal, Field(ge=0, allow_inf_nan=False), exact_decimal(places=10, whole=10)]
Metadata = Annotated[dict[str, Any], AfterValidator(_metadata)]


class AddressIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source_prefix: ClassVar[str] = ADDRESS_PREFIX

    line1: ShortText | None = None
    line2: ShortText | None = None
    city: ShortText | None = None
    state: ShortText | None = None
    postal_code: ShortText | None = None
    country: ShortText | None = None


class ProfileUpdate(BaseModel):
    """Writable customer fields. Only the fields sent change; any other field is refused."""

    model_config = ConfigDict(extra="forbid")

    name: ShortText | None = None
    first_name: ShortText | None = None
    last_name: ShortText | None = None
    email: Email | None = None
    phone: ShortText | None = None
    customer_type: ShortText | None = None
    status: Status | None = None
    parent_customer_id: UUID | None = None
    address: AddressIn | None = None
    metadata: Metadata | None = Field(
        None,
        description=f"Replaces the whole metadata object (nested at most {MAX_METADATA_DEPTH} levels; "
        "numbers within ±2^53).",
    )
    stripe_customer_id: ShortText | None = None
    application_id: ShortText | None = None
    last_transaction_amount: Annotated[Decimal, exact_decimal(places=10, whole=10)] | None = Field(
        None, allow_inf_nan=False
    )
    last_purchase_date: Timestamp | None = None
    total_budget: Money | None = Field(None, description="Lifetime budget (USD).")
    period_budget: Money | None = Field(None, description="Budget per budget_duration period (USD).")
    budget_duration: BudgetDuration | None = None

    def columns(self) -> dict[str, object]:
        """The sent fields as customers columns (address flattened)."""
        values: dict[str, object] = {}
        for name in self.model_fields_set:
            value = getattr(self, name)
            if name == "address":
                if value is None:
                    values.update({ADDRESS_PREFIX + k: None for k in AddressIn.model_fields})
                else:
                    values.update({ADDRESS_PREFIX + k: getattr(value, k) for k in value.model_fields_set})
            elif name == "status" and value is None:
                continue  # status is NOT NULL; sending null leaves it unchanged
            elif name == "metadata" and value is None:
                values["metadata"] = {}
            else:
                values[name] = value
        return values
