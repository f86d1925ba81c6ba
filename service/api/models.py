"""The canonical API's pydantic models: they validate requests, describe responses, and are
the only source of the OpenAPI document (service/api/openapi.py reads them)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Literal
from uuid import UUID

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema, field_validator

from service.api import examples
from service.domain.events import MAX_MODEL_NAME, ModelName
from service.domain.listing import SORT_FIELD_NAMES
from service.domain.profile import Day, Identifier, Money, ProfileUpdate, ShortText, Timestamp
from service.domain.vocabulary import BudgetDuration, Environment, Status
from service.store.customers import FIRST_SERIES_DAY, LAST_SERIES_DAY, MAX_SERIES_DAYS
from service.store.usage import DEFAULT_TOP, MAX_TOP, OTHER


def choice(values: Sequence[str], example: str) -> tuple[AfterValidator, WithJsonSchema]:
    """Validation and schema of a string parameter with a fixed, long list of values: the
    document lists them (an enum), and a wrong one is named with an example of a right one
    rather than answered with the whole list."""
    allowed = frozenset(values)

    def check(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"'{value}' is not one of this parameter's values (listed in /docs), e.g. {example}")
        return value

    return AfterValidator(check), WithJsonSchema({"type": "string", "enum": list(values)})


# Every route's environment: the key's. A request may name it, never the other one.
ENVIRONMENT = (
    "The API key's environment (the default); naming another is a 403: a key reaches its own environment only."
)
# Every date-time parameter says what it takes (service/domain/profile.py Timestamp).
TIME_PARAMETER = "A date-time with its zone (2026-11-21T10:00:00Z) or a date (midnight UTC)."

SORT_CHOICES = tuple(name for field in SORT_FIELD_NAMES for name in (field, "-" + field))
_SORT = choice(SORT_CHOICES, "-total_cost")
SortBy = Annotated[str, _SORT[0], _SORT[1]]


SeriesDay = Annotated[Day, Field(ge=FIRST_SERIES_DAY, le=LAST_SERIES_DAY)]
# Model names a usage query may filter by at once.
MAX_MODEL_FILTER = 100
MODEL_FILTER = (
    "Only the usage of these models (repeat or comma-separate; each as the events named it, at most "
    f"{MAX_MODEL_NAME} characters; at most {MAX_MODEL_FILTER}). Usage without a model is left out. "
    "Example: model=gpt-4o,gpt-4o-mini."
)
TOP = (
    "With group_by=model or provider: the names kept apart, by cost over the whole range (then requests, "
    f"then name); the rest are summed in one row named '{OTHER}'. Default {DEFAULT_TOP}, at most {MAX_TOP}. "
    "Example: group_by=model&top=5."
)


class CustomerFilterParams(BaseModel):
    """The filters of a customer list (``GET /v1/customers``) and of an export."""

    model_config = ConfigDict(extra="forbid")

    environment: Environment | None = Field(None, description=ENVIRONMENT)
    status: list[Status] = Field(default_factory=list, description="One or more statuses (repeat or comma-separate).")
    name: ShortText | None = Field(None, description="Partial, case-insensitive match on name.")
    email: ShortText | None = Field(None, description="Exact, case-insensitive match on email.")
    customer_ids: list[UUID] = Field(default_factory=list, max_length=1000, description="Customer ids (uuid).")
    customer_identifiers: list[Identifier] = Field(
        default_factory=list, max_length=1000, description="Your identifiers (repeat or comma-separate)."
    )
    parent_customer_ids: list[UUID] = Field(
        default_factory=list, max_length=1000, description="Children of these customers (uuid)."
    )
    first_seen_gte: Timestamp | None = Field(None, description=f"First usage at or after. {TIME_PARAMETER}")
    first_seen_lte: Timestamp | None = Field(None, description=f"First usage at or before. {TIME_PARAMETER}")
    last_active_gte: Timestamp | None = Field(None, description=f"Last usage at or after. {TIME_PARAMETER}")
    last_active_lte: Timestamp | None = Field(None, description=f"Last usage at or before. {TIME_PARAMETER}")
    total_cost_gte: Money | None = Field(None, description="Lifetime cost at least (a decimal, e.g. 10.5).")
    total_cost_lte: Money | None = Field(None, description="Lifetime cost at most.")
    period_budget_share_gte: Annotated[Decimal, Field(ge=0, le=1000, max_digits=12, decimal_places=6)] | None = Field(
        None, description="Customers whose current-period usage is at least this share of period_budget (0.8 = 80%)."
    )
    metadata: dict[Annotated[str, StringConstraints(max_length=200)], ShortText] = Field(
        default_factory=dict, max_length=20, description="metadata[key]=value: customers whose metadata has key=value."
    )
    usage_from: SeriesDay | None = Field(
        None,
        description="With usage_to, a usage window: first UTC day, inclusive, as a date (2026-11-01). Every usage "
        "aggregate a customer shows (requests, tokens, cost, averages, active_days), every usage sort and the "
        "usage filters (total_cost_gte, …) are then the window's; first_seen and last_active stay lifetime.",
    )
    usage_to: SeriesDay | None = Field(
        None,
        description=f"With usage_from: last UTC day of the window, inclusive, at most {MAX_SERIES_DAYS} days after "
        "usage_from.",
    )
    # No default in the document (Swagger UI would send usage_only=false on every Try it out).
    usage_only: bool | None = Field(
        None,
        description="With a window: only customers with usage in it (without, they are listed with zeros, last "
        "when sorted by a usage field in descending order).",
    )
    model: list[ModelName] = Field(
        default_factory=list,
        max_length=MAX_MODEL_FILTER,
        description="With a window: only customers with usage of one of these models in it (repeat or "
        f"comma-separate; at most {MAX_MODEL_FILTER}). Example: model=gpt-4o.",
    )


class ListParams(CustomerFilterParams):
    """Query parameters of ``GET /v1/customers``. Use one pagination style per request:
    ``limit``/``offset``, ``page``/``page_size``, or ``cursor`` (with an optional ``limit``)."""

    limit: int | None = Field(None, ge=1, le=1000, description="Rows per page (default 50).")
    offset: int | None = Field(None, ge=0, le=10_000_000, description="Rows to skip.")
    page: int | None = Field(None, ge=1, le=10_000_000, description="1-based page number (with page_size).")
    page_size: int | None = Field(None, ge=1, le=1000, description="Rows per page when paging by number.")
    cursor: Annotated[str, StringConstraints(max_length=2000)] | None = Field(
        None, description="Opaque cursor from a previous response's next_cursor; constant cost at any depth."
    )
    sort_by: SortBy | None = Field(None, description="Sort field; prefix '-' for descending. Default -first_seen.")
    expand: Literal["parent_customer"] | None = Field(None, description="Embed each customer's parent.")
    include: Literal["subscriptions"] | None = Field(None, description="Embed each customer's subscriptions.")


class ExportParams(CustomerFilterParams):
    """Query parameters of ``GET /v1/customers/export``."""

    format: Literal["ndjson", "csv"] = Field(
        "ndjson", description="ndjson: one customer (canonical JSON) per line; csv: one row per customer."
    )
    after: UUID | None = Field(
        None,
        description="Resume: only customers whose id comes after this one (the id of the last row you received; "
        "rows come in id order).",
    )


class RetrieveParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    environment: Environment | None = Field(None, description=ENVIRONMENT)
    expand: Literal["parent_customer"] | None = Field(None, description="Embed the customer's parent.")
    include: Literal["subscriptions"] | None = Field(None, description="Embed the customer's subscriptions.")


class UsageParams(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: SeriesDay | None = Field(
        None,
        alias="from",
        description="First day, inclusive, as a date (2026-11-01; not a date-time: a series counts whole days of "
        "the organization's reporting time zone); default 29 days before 'to'.",
    )
    to: SeriesDay | None = Field(
        None,
        description=f"Last day, inclusive, as a date; default the organization's today. At most {MAX_SERIES_DAYS} "
        "days after 'from'.",
    )
    granularity: Literal["day", "week", "month"] = Field(
        "day", description="One bucket per day, ISO week (from Monday) or calendar month."
    )
    group_by: Literal["model", "provider"] | None = Field(
        None,
        description="model or provider: per bucket, a row per model (or provider) with usage, the top names by cost "
        f"and '{OTHER}', and a row with a null name for usage that named none; without it, every bucket's total, "
        "zero-filled.",
    )
    model: list[ModelName] = Field(default_factory=list, max_length=MAX_MODEL_FILTER, description=MODEL_FILTER)
    top: int | None = Field(None, ge=1, le=MAX_TOP, description=TOP)
    environment: Environment | None = Field(None, description=ENVIRONMENT)


class CustomerPatch(ProfileUpdate):
    """The fields to change; any other field is refused (read-only ones by name)."""

    model_config = ConfigDict(json_schema_extra={"examples": [examples.CUSTOMER_PATCH]})


class CustomerCreate(CustomerPatch):
    model_config = ConfigDict(json_schema_extra={"examples": [examples.CUSTOMER_CREATE]})

    customer_identifier: Identifier
    environment: Environment | None = Field(None, description=ENVIRONMENT)


class Address(BaseModel):
    source_prefix: ClassVar[str] = "address_"

    line1: str | None
    line2: str | None
    city: str | None
    state: str | None
    postal_code: str | None
    country: str | None


class Customer(BaseModel):
    """A customer: profile, budget, and usage aggregates. Money is a decimal string."""

    model_config = ConfigDict(json_schema_extra={"examples": [examples.CUSTOMER]})

    id: UUID
    customer_identifier: str
    environment: Environment
    name: str | None
    first_name: str | None
    last_name: str | None
    email: str | None
    phone: str | None
    customer_type: str | None
    status: Status
    parent_customer_id: UUID | None
    address: Address
    metadata: dict[str, Any]
    stripe_customer_id: str | None
    application_id: str | None
    last_transaction_amount: Decimal | None
    last_purchase_date: datetime | None
    total_budget: Decimal | None
    period_budget: Decimal | None
    budget_duration: BudgetDuration | None
    period_start: datetime | None = Field(
        description="Start of the current budget period: a calendar day, ISO week, month or year of the "
        "organization's reporting time zone, given in UTC."
    )
    period_end: datetime | None
    total_period_usage: Decimal = Field(description="Cost inside the current budget period.")
    first_seen: datetime | None
    last_active: datetime | None
    active_days: int
    number_of_requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    total_cost: Decimal
    average_latency: float | None
    average_ttft: float | None
    created_at: datetime
    updated_at: datetime


class Plan(BaseModel):
    source_prefix: ClassVar[str] = "plan_"

    stripe_price_id: str | None
    name: str | None
    amount: int | None = Field(description="Amount in cents.")
    currency: str | None
    interval: str | None


class Subscription(BaseModel):
    id: str
    status: str
    current_period_start: datetime | None
    current_period_end: datetime | None
    plan: Plan | None


class CustomerExpanded(Customer):
    parent_customer: Customer | None = Field(None, description="With expand=parent_customer.")
    subscriptions: list[Subscription] | None = Field(None, description="With include=subscriptions.")


class CustomerList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [examples.CUSTOMER_LIST]})

    count: int = Field(description="Customers matching the filters, over all pages.")
    next: str | None = Field(description="URL of the next page, or null.")
    previous: str | None = Field(description="URL of the previous page, or null.")
    next_cursor: str | None = Field(description="Pass as cursor= to continue after this page.")
    as_of: str = Field(
        description="The change-log position this page reflects (also the Tally-As-Of header of every list and "
        "retrieve): every change logged before it is in the page. Of two reads, the one with the greater position "
        "(compare the numbers before and after the dot in turn) shows the newer data.",
        examples=["7301.0"],
    )
    results: list[CustomerExpanded]


class UsagePoint(BaseModel):
    start: date
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost: Decimal
    average_latency: float | None
    average_ttft: float | None


class UsageSeries(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [examples.USAGE_SERIES]})

    customer_identifier: str
    granularity: str
    from_: date = Field(alias="from", description="First day of the series.")
    to: date = Field(description="Last day of the series.")
    time_zone: str = Field(description="The organization's reporting time zone (IANA name): whose days these are.")
    group_by: str | None = Field(None, description="model, provider or null, as asked.")
    results: list[UsageGroupPoint]


class UsageQueryParams(BaseModel):
    """Query parameters of ``GET /v1/usage``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: SeriesDay | None = Field(
        None,
        alias="from",
        description="First day of the organization's reporting time zone, inclusive, as a date; default 29 days "
        "before 'to'.",
    )
    to: SeriesDay | None = Field(
        None,
        description=f"Last day, inclusive, as a date; default the organization's today. At most {MAX_SERIES_DAYS} "
        "days after 'from'.",
    )
    granularity: Literal["day", "week", "month"] = Field(
        "day", description="One bucket per day, ISO week (from Monday) or calendar month."
    )
    group_by: Literal["customer", "model", "provider"] | None = Field(
        None,
        description="customer: each customer's buckets with usage, a page of customers at a time (limit, after); "
        "model or provider: per bucket, a row per model (or provider) with usage, the top names by cost and "
        f"'{OTHER}', and a row with a null name for usage that named none; without it, the organization's total per "
        "bucket, every bucket of the range. Example: group_by=model.",
    )
    customer_identifiers: list[Identifier] = Field(
        default_factory=list, max_length=1000, description="Only these customers (repeat or comma-separate)."
    )
    model: list[ModelName] = Field(default_factory=list, max_length=MAX_MODEL_FILTER, description=MODEL_FILTER)
    top: int | None = Field(None, ge=1, le=MAX_TOP, description=TOP)
    limit: int | None = Field(
        None, ge=1, le=1000, description="With group_by=customer: customers per page (default 100)."
    )
    after: UUID | None = Field(None, description="With group_by=customer: the next_after of the previous page.")
    environment: Environment | None = Field(None, description=ENVIRONMENT)


class UsageGroupPoint(UsagePoint):
    model: str | None = Field(
        None,
        description=f"With group_by=model: the model; '{OTHER}' sums the models past the top; null: usage that "
        "named no model.",
    )
    provider: str | None = Field(
        None,
        description=f"With group_by=provider: the provider; '{OTHER}' sums the providers past the top; null: usage "
        "that named no provider.",
    )


class UsageRow(UsageGroupPoint):
    customer_identifier: str | None = Field(None, description="With group_by=customer: whose usage this is.")


class UsageReport(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [examples.USAGE_REPORT, examples.USAGE_BY_MODEL]})

    granularity: str
    from_: date = Field(alias="from", description="First day.")
    to: date = Field(description="Last day.")
    time_zone: str = Field(description="The organization's reporting time zone (IANA name): whose days these are.")
    group_by: str | None
    results: list[UsageRow]
    next_after: UUID | None = Field(
        None, description="With group_by=customer: pass as after= for the next page; null on the last page."
    )


class ProblemField(BaseModel):
    name: str
    in_: str = Field(alias="in")
    detail: str


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    instance: str
    request_id: str
    errors: list[ProblemField] = []


class Health(BaseModel):
    status: str
    checks: dict[str, str] = {}


MAX_IDENTIFIERS = 1000


class ChangeParams(BaseModel):
    """Query parameters of ``GET /v1/customers/changes`` (both representations)."""

    model_config = ConfigDict(extra="forbid")

    after: Annotated[str, StringConstraints(max_length=60)] | None = Field(
        None,
        description="Resume after this cursor: a change's cursor, a page's next_cursor, or a list's as_of "
        "(Tally-As-Of). Absent: from the oldest change the log keeps. A cursor older than the log keeps is a 410: "
        "list the customers again and follow from the list's as_of. On an event stream, Last-Event-ID wins over it.",
    )
    limit: int = Field(
        100,
        ge=1,
        le=1000,
        description="Changes examined per page (default 100); filters may keep fewer. On an event stream, per read.",
    )
    environment: Environment | None = Field(None, description=ENVIRONMENT)
    # One comma-separated string rather than a list: a list parameter of one value cannot be
    # told from a scalar on the wire, and the document should not say they differ.
    customer_identifiers: Annotated[str, StringConstraints(min_length=1, max_length=MAX_IDENTIFIERS * 256)] | None = (
        Field(None, description="Only changes of these customers: your identifiers, comma-separated (at most 1,000).")
    )
    min_total_cost: Money | None = Field(
        None, description="Only customers whose lifetime cost is at least this (a decimal); deletions always pass."
    )
    min_number_of_requests: int | None = Field(
        None, ge=0, description="Only customers with at least this many requests; deletions always pass."
    )
    min_total_tokens: int | None = Field(
        None, ge=0, description="Only customers with at least this many tokens; deletions always pass."
    )

    @field_validator("customer_identifiers")
    @classmethod
    def _identifiers(cls, value: str | None) -> str | None:
        if value is not None:
            parts = value.split(",")
            if len(parts) > MAX_IDENTIFIERS:
                raise ValueError(f"at most {MAX_IDENTIFIERS} identifiers")
            if any(not 1 <= len(p) <= 255 for p in parts):
                raise ValueError("each identifier is 1 to 255 characters")
        return value

    @property
    def identifiers(self) -> frozenset[str]:
        """The identifiers named (none: every customer)."""
        return frozenset(self.customer_identifiers.split(",")) if self.customer_identifiers else frozenset()


class DeletedCustomer(BaseModel):
    id: UUID
    customer_identifier: str


class CustomerChange(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [examples.CUSTOMER_CHANGE]})

    cursor: str = Field(description="Resumes right after this change (after=, or an event stream's Last-Event-ID).")
    kind: Literal["created", "updated", "deleted"] = Field(
        description="What the change did; a customer deleted since it was read is shown as deleted."
    )
    changed_at: datetime = Field(
        description="When the transaction that made the change logged it, its last step before committing."
    )
    customer: Customer | DeletedCustomer = Field(
        description="The customer as it is when the change is read (deleted: its id and identifier only)."
    )


class CustomerChanges(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [examples.CUSTOMER_CHANGES]})

    results: list[CustomerChange]
    next_cursor: str = Field(description="Pass as after= to continue (the same cursor when nothing new is there).")
    has_more: bool = Field(description="True when the page stopped at its limit: ask again at once.")
    limit: int
