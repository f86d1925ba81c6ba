"""tally's vocabulary, each defined once: statuses, environments, budget durations, and which
customer fields a client may write. Everything else (pydantic models, SQL, the OpenAPI
document, the edges' checks) is derived from these; the migrations' CHECK constraints spell
the same sets and tests/test_vocabulary.py holds them to it."""

from __future__ import annotations

from typing import Literal, get_args

Status = Literal["active", "draft", "blacklisted", "deactivated", "archived"]
STATUSES: tuple[str, ...] = get_args(Status)

Environment = Literal["prod", "test"]
ENVIRONMENTS: tuple[str, ...] = get_args(Environment)

BudgetDuration = Literal["daily", "weekly", "monthly", "yearly"]
BUDGET_DURATIONS: tuple[str, ...] = get_args(BudgetDuration)

# The customer columns a client may write (POST/PATCH, customer.upserted), with the SQL type
# each is read back as from a JSON patch. Every other customer field is read-only.
PROFILE_COLUMNS: dict[str, str] = {
    "name": "text",
    "first_name": "text",
    "last_name": "text",
    "email": "text",
    "phone": "text",
    "customer_type": "text",
    "status": "text",
    "parent_customer_id": "uuid",
    "address_line1": "text",
    "address_line2": "text",
    "address_city": "text",
    "address_state": "text",
    "address_postal_code": "text",
    "address_country": "text",
    "metadata": "jsonb",
    "stripe_customer_id": "text",
    "application_id": "text",
    "last_transaction_amount": "numeric",
    "last_purchase_date": "timestamptz",
    "total_budget": "numeric",
    "period_budget": "numeric",
    "budget_duration": "text",
}
WRITABLE_COLUMNS = frozenset(PROFILE_COLUMNS)
# An event names customers by identifier, not by tally's ids: it cannot set a parent.
EVENT_WRITABLE_COLUMNS = WRITABLE_COLUMNS - {"parent_customer_id"}
ADDRESS_PREFIX = "address_"
