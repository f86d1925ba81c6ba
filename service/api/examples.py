"""Examples for the OpenAPI document: one realistic customer, rendered the way each route set
renders it, so that every request body and list response in /docs shows (and "Try it out"
sends) something real. tests/test_docs.py holds each example to its model."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pydantic.config import JsonDict
from pydantic.types import JsonValue

# fmt: off
# (The documents below keep the compact layout of the JSON they stand for: one field per line
# would make them five times as long and no clearer.)
ORGANIZATION_ID = "9c2b7f5e-3d41-4f0a-8e6b-1a2b3c4d5e6f"
CUSTOMER_ID = "0f8b6c1e-6a58-4c7e-9a3f-2f0c9d5b1a11"

CUSTOMER: JsonDict = {
    "id": CUSTOMER_ID,
    "customer_identifier": "user_123",
    "environment": "prod",
    "name": "John Doe",
    "first_name": "John",
    "last_name": "Doe",
    "email": "john@example.com",
    "phone": None,
    "customer_type": "business",
    "status": "active",
    "parent_customer_id": None,
    "address": {"line1": "1 Main St", "line2": None, "city": "Lyon", "state": None, "postal_code": "69001",
                "country": "FR"},
    "metadata": {"plan_tier": "enterprise"},
    "stripe_customer_id": "cus_123",
    "application_id": None,
    "last_transaction_amount": "49.99",
    "last_purchase_date": "2026-11-02T09:30:00Z",
    "total_budget": "1000",
    "period_budget": "100",
    "budget_duration": "monthly",
    "period_start": "2026-11-01T00:00:00Z",
    "period_end": "2026-12-01T00:00:00Z",
    "total_period_usage": "12.50",
    "first_seen": "2026-10-01T10:00:00Z",
    "last_active": "2026-11-21T10:00:00Z",
    "active_days": 34,
    "number_of_requests": 1520,
    "prompt_tokens": 182400,
    "completion_tokens": 121600,
    "total_tokens": 304000,
    "total_cost": "523.45",
    "average_latency": 1.23,
    "average_ttft": 0.45,
    "created_at": "2026-10-01T10:00:00Z",
    "updated_at": "2026-11-20T16:12:00Z",
}
SUBSCRIPTION: JsonDict = {
    "id": "sub_1", "status": "active", "current_period_start": "2026-11-01T00:00:00Z",
    "current_period_end": "2026-12-01T00:00:00Z",
    "plan": {"stripe_price_id": "price_1", "name": "Pro", "amount": 4999, "currency": "usd", "interval": "month"},
}

CUSTOMER_LIST: JsonDict = {
    "count": 1, "next": None, "previous": None, "next_cursor": None, "as_of": "7301.0",
    "results": [{**CUSTOMER, "subscriptions": [SUBSCRIPTION]}],
}
CUSTOMER_CHANGE: JsonDict = {
    "cursor": "7302.41", "kind": "updated", "changed_at": "2026-11-21T10:00:03.120000+00:00", "customer": CUSTOMER,
}
CUSTOMER_CHANGES: JsonDict = {
    "results": [
        CUSTOMER_CHANGE,
        {"cursor": "7305.42", "kind": "deleted", "changed_at": "2026-11-21T10:00:04.500000+00:00",
         "customer": {"id": "4f0c9a8e-1d2b-4c3e-9f5a-6b7c8d9e0f1a", "customer_identifier": "user_456"}},
    ],
    "next_cursor": "7305.42", "has_more": False, "limit": 100,
}
CUSTOMER_CREATE: JsonDict = {
    "customer_identifier": "user_123", "name": "John Doe", "email": "john@example.com",
    "metadata": {"plan_tier": "enterprise"}, "period_budget": "100", "budget_duration": "monthly",
}
CUSTOMER_PATCH: JsonDict = {"status": "blacklisted", "period_budget": "150"}
USAGE_SERIES: JsonDict = {
    "customer_identifier": "user_123", "granularity": "day", "from": "2026-11-20", "to": "2026-11-21",
    "time_zone": "Europe/Berlin", "group_by": None,
    "results": [
        {"start": "2026-11-20", "requests": 40, "prompt_tokens": 4800, "completion_tokens": 3200, "total_tokens": 8000,
         "cost": "1.20", "average_latency": 1.1, "average_ttft": 0.4},
        {"start": "2026-11-21", "requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
         "cost": "0", "average_latency": None, "average_ttft": None},
    ],
}

USAGE_BY_MODEL: JsonDict = {
    "granularity": "month", "from": "2026-11-01", "to": "2026-11-30", "time_zone": "UTC", "group_by": "model",
    "next_after": None,
    "results": [
        {"start": "2026-11-01", "model": "gpt-4o", "requests": 91200, "prompt_tokens": 10944000,
         "completion_tokens": 7296000, "total_tokens": 18240000, "cost": "2736.00", "average_latency": 1.3,
         "average_ttft": 0.45},
        {"start": "2026-11-01", "model": "other", "requests": 12800, "prompt_tokens": 1536000,
         "completion_tokens": 1024000, "total_tokens": 2560000, "cost": "76.80", "average_latency": 0.7,
         "average_ttft": 0.2},
        {"start": "2026-11-01", "model": None, "requests": 40, "prompt_tokens": 4800, "completion_tokens": 3200,
         "total_tokens": 8000, "cost": "0.12", "average_latency": None, "average_ttft": None},
    ],
}

USAGE_REPORT: JsonDict = {
    "granularity": "day", "from": "2026-11-20", "to": "2026-11-21", "time_zone": "UTC", "group_by": None,
    "next_after": None,
    "results": [
        {"start": "2026-11-20", "requests": 9120, "prompt_tokens": 1094400, "completion_tokens": 729600,
         "total_tokens": 1824000, "cost": "273.60", "average_latency": 1.2, "average_ttft": 0.41},
        {"start": "2026-11-21", "requests": 8750, "prompt_tokens": 1050000, "completion_tokens": 700000,
         "total_tokens": 1750000, "cost": "262.50", "average_latency": 1.1, "average_ttft": 0.39},
    ],
}


def events(now: datetime | None = None) -> list[JsonValue]:
    """A batch of two events stamped a minute ago: examples that POST /v1/events accepts on any
    day (the document is built when the API starts)."""
    at = (now or datetime.now(UTC)) - timedelta(minutes=1)
    usage: JsonDict = {
        "specversion": "1.0", "id": "evt_1", "source": "llm-gateway", "type": "usage.recorded",
        "time": at.isoformat(timespec="seconds"), "subject": "user_123",
        "data": {"requests": 1, "prompt_tokens": 120, "completion_tokens": 80, "cost": "0.0012", "latency": 1.23,
                 "ttft": 0.45, "customer": {"name": "John Doe", "email": "john@example.com"}},
    }
    profile: JsonDict = {**usage, "id": "evt_2", "source": "crm", "type": "customer.upserted",
               "data": {"status": "active", "metadata": {"plan_tier": "enterprise"}}}
    return [usage, profile]


RESPAN_USER: JsonDict = {
    "id": f"user_123prod{ORGANIZATION_ID}", "unique_organization_id": ORGANIZATION_ID,
    "customer_identifier": "user_123",
    "environment": "prod", "name": "John Doe", "email": "john@example.com", "first_seen": "2026-10-01T10:00:00Z",
    "last_active_timeframe": "2026-11-21T10:00:00Z", "active_days": 34, "number_of_requests": 1520,
    "total_tokens": 304000, "total_cost": 523.45, "average_latency": 1.23, "average_ttft": 0.45,
}
RESPAN_USER_LIST: JsonDict = {"count": 1, "next": None, "previous": None, "results": [RESPAN_USER]}
RESPAN_USER_DETAIL: JsonDict = {
    "id": "user_123", "name": "John Doe", "email": "john@example.com", "customer_identifier": "user_123",
    "environment": "prod", "total_budget": 1000.0, "period_budget": 100.0, "organization_name": "acme",
    "total_period_usage": 12.5, "period_start": "2026-11-01T00:00:00Z", "period_end": "2026-12-01T00:00:00Z",
    "budget_duration": "monthly", "updated_at": "2026-11-20T16:12:00Z",
}
RESPAN_USER_PATCH: JsonDict = {"name": "John Doe", "period_budget": 150, "budget_duration": "monthly"}

V0_CUSTOMER_LIST: JsonDict = {
    "customers": [{
        "id": CUSTOMER_ID, "firstName": "John", "lastName": "Doe", "email": "john@example.com", "phone": None,
        "customerType": "business", "status": "ACTIVE", "lastTransactionAmount": 49.99,
        "lastPurchaseDate": "2026-11-02T09:30:00.000Z", "applicationId": None,
        "createdAt": "2026-10-01T10:00:00.000Z", "updatedAt": "2026-11-20T16:12:00.000Z",
    }],
    "total": 1, "skip": 0, "take": 1,
}

FLEXPRICE_CUSTOMER_LIST: JsonDict = {
    "items": [{
        "id": CUSTOMER_ID, "external_id": "user_123", "name": "John Doe", "email": "john@example.com",
        "address_line1": "1 Main St", "address_line2": "", "address_city": "Lyon", "address_state": "",
        "address_postal_code": "69001", "address_country": "FR", "parent_customer_id": None,
        "metadata": {"plan_tier": "enterprise"}, "environment_id": "prod", "tenant_id": ORGANIZATION_ID,
        "status": "published", "created_at": "2026-10-01T10:00:00Z", "updated_at": "2026-11-20T16:12:00Z",
    }],
    "pagination": {"total": 1, "limit": 50, "offset": 0},
}

PUBLIC_CUSTOMER_LIST: JsonDict = {
    "data": [{
        "id": CUSTOMER_ID, "email": "john@example.com", "firstName": "John", "lastName": "Doe", "phone": None,
        "stripeCustomerId": "cus_123", "hasActiveSubscription": True,
        "subscriptions": [{
            "id": "sub_1", "status": "active", "currentPeriodStart": "2026-11-01T00:00:00.000Z",
            "currentPeriodEnd": "2026-12-01T00:00:00.000Z",
            "plan": {"stripePriceId": "price_1", "name": "Pro", "amount": 4999, "currency": "usd", "interval": "month"},
        }],
        "createdAt": "2026-10-01T10:00:00.000Z", "updatedAt": "2026-11-20T16:12:00.000Z",
    }],
    "pagination": {"total": 1, "limit": 50, "offset": 0, "hasMore": False},
}
# fmt: on
