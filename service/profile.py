"""The writable profile of a customer: the one model behind PATCH/POST bodies and the
``customer.upserted`` event's data. Only fields that were sent change."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Literal
from uuid import UUID

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

Status = Literal["active", "draft", "blacklisted", "deactivated", "archived"]
BudgetDuration = Literal["daily", "weekly", "monthly", "yearly"]


def _utc(value: datetime) -> datetime:
    """Naive times are taken as UTC, so a bare '2026-01-01T00:00:00' means what it says."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def _iso_only(value: object) -> object:
    """Only ISO 8601 text (as documented), not numbers read as Unix times."""
    if isinstance(value, (int, float)) or (isinstance(value, str) and value.strip().lstrip("-").replace(".", "").isdigit()):
        raise ValueError("must be an ISO 8601 date-time, e.g. 2026-11-21T10:00:00Z")
    return value


Timestamp = Annotated[datetime, BeforeValidator(_iso_only), AfterValidator(_utc)]
ShortText = Annotated[str, StringConstraints(max_length=500)]
Identifier = Annotated[str, StringConstraints(min_length=1, max_length=255)]
Money = Annotated[Decimal, Field(ge=0, max_digits=20, decimal_places=10, allow_inf_nan=False)]


class AddressIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source_prefix: ClassVar[str] = "address_"

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
    email: ShortText | None = None
    phone: ShortText | None = None
    customer_type: ShortText | None = None
    status: Status | None = None
    parent_customer_id: UUID | None = None
    address: AddressIn | None = None
    metadata: dict[str, Any] | None = Field(None, description="Replaces the whole metadata object.")
    stripe_customer_id: ShortText | None = None
    application_id: ShortText | None = None
    last_transaction_amount: Decimal | None = Field(None, max_digits=20, decimal_places=10, allow_inf_nan=False)
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
                    values.update({f"address_{k}": None for k in AddressIn.model_fields})
                else:
                    values.update({f"address_{k}": getattr(value, k) for k in value.model_fields_set})
            elif name == "status" and value is None:
                continue  # status is NOT NULL; sending null leaves it unchanged
            elif name == "metadata" and value is None:
                values["metadata"] = {}
            else:
                values[name] = value
        return values
