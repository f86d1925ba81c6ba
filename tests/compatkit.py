"""What the compatibility tests share: the four vendors' docs as data (Respan's API reference,
Users; Devdraft's List customers; Flexprice's API reference, Customers; SnapRefund's Get
customers list: the route sets' paths, the docs' examples verbatim, their timestamp formats), the checks
that hold a response to an example, and the read-only crowd's shape and orders (the crowd
fixture is in conftest.py). No fixtures here."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from aiohttp.test_utils import TestClient
from yarl import URL

from tests.factories import Org
from tests.support import ok_json

UTC = UTC

RESPAN_LIST = "/compat/respan/api/users/list/"
RESPAN_USER = "/compat/respan/api/users/{}/"
V0_LIST = "/compat/v0/api/v0/customers"
FLEXPRICE_LIST = "/compat/flexprice/v1/customers"
FLEXPRICE_SEARCH = "/compat/flexprice/v1/customers/search"
PUBLIC_LIST = "/compat/public/api/public/customers"

# ---------------------------------------------------------------------------------------------
# The vendors' examples, verbatim (SnapRefund's e-mail is the doc's own, as published).

# Respan's API reference, Users, List customers:
# GET /api/users/list/?page=1&page_size=50&sort_by=-first_seen&environment=prod
RESPAN_LIST_EXAMPLE: dict[str, Any] = {
    "count": 51,
    "next": "https://api.respan.ai/api/users/list/?page=2",
    "previous": None,
    "results": [
        {
            "id": "user_123prod8264a3f4-40c7-476a-97d1-96908127ea21",
            "unique_organization_id": "8264a3f4-40c7-476a-97d1-96908127ea21",
            "customer_identifier": "user_123",
            "environment": "prod",
            "name": "John Doe",
            "email": "john@example.com",
            "first_seen": "2025-10-15T08:00:00Z",
            "last_active_timeframe": "2025-12-29T10:30:00Z",
            "active_days": 75,
            "number_of_requests": 15420,
            "total_tokens": 170000,
            "total_cost": 523.45,
            "average_latency": 1.23,
            "average_ttft": 0.45,
        }
    ],
}

# Respan's API reference, Users, Retrieve a customer: GET /api/users/customer_identifier/ -d environment=prod
RESPAN_DETAIL_EXAMPLE: dict[str, Any] = {
    "id": "user_123",
    "name": "John Doe",
    "email": "john@example.com",
    "customer_identifier": "user_123",
    "environment": "prod",
    "total_budget": 1000,
    "period_budget": 100,
    "organization_name": "Acme Inc",
    "total_period_usage": 45.67,
    "period_start": "2025-12-01T00:00:00Z",
    "period_end": None,
    "budget_duration": "monthly",
    "updated_at": "2025-12-29T10:30:00Z",
}

# Devdraft's List customers (https://docs.devdraft.ai/developers/customers/list-customers)
# gives no example body, only its field lists (with their kinds); the names are the
# adapter's documented choice (camelCase fields; envelope customers/total/skip/take).
V0_CUSTOMER_KINDS = {
    "id": "string",
    "firstName": "string",
    "lastName": "string",
    "email": "string",
    "phone": "string",
    "customerType": "string",
    "status": "string",
    "lastTransactionAmount": "number",
    "lastPurchaseDate": "string",
    "applicationId": "string",
    "createdAt": "string",
    "updatedAt": "string",
}
V0_ENVELOPE_KINDS = {"customers": "array", "total": "number", "skip": "number", "take": "number"}

# Flexprice's API reference, Customers, List customers: GET /v1/customers?limit=10&offset=0&order=desc
FLEXPRICE_EXAMPLE: dict[str, Any] = {
    "items": [
        {
            "id": "cust_abc123xyz789",
            "external_id": "user_12345",
            "name": "Acme Corporation",
            "email": "billing@acme.com",
            "address_line1": "123 Main Street",
            "address_line2": "",
            "address_city": "San Francisco",
            "address_state": "CA",
            "address_postal_code": "94105",
            "address_country": "US",
            "parent_customer_id": None,
            "metadata": {"plan_tier": "enterprise"},
            "environment_id": "env_prod_001",
            "tenant_id": "tenant_001",
            "status": "published",
            "created_at": "2024-01-15T10:30:00Z",
            "updated_at": "2024-01-15T10:30:00Z",
        },
        {
            "id": "cust_def456uvw012",
            "external_id": "user_67890",
            "name": "Tech Startup Inc",
            "email": "admin@techstartup.com",
            "address_line1": "456 Innovation Ave",
            "address_line2": "Suite 200",
            "address_city": "Austin",
            "address_state": "TX",
            "address_postal_code": "78701",
            "address_country": "US",
            "parent_customer_id": None,
            "metadata": {"plan_tier": "growth"},
            "environment_id": "env_prod_001",
            "tenant_id": "tenant_001",
            "status": "published",
            "created_at": "2024-01-14T09:15:00Z",
            "updated_at": "2024-01-14T09:15:00Z",
        },
    ],
    "pagination": {"total": 2, "limit": 10, "offset": 0},
}

# SnapRefund's Get customers list (https://snaprefund.readme.io/docs/get-customers):
# GET /api/public/customers (include_subscriptions=true for the subscriptions array).
PUBLIC_EXAMPLE: dict[str, Any] = {
    "data": [
        {
            "id": "123",
            "email": "[email protected]",
            "firstName": "John",
            "lastName": "Doe",
            "phone": "+1234567890",
            "stripeCustomerId": "cus_ExampleCustomerID123",
            "hasActiveSubscription": True,
            "subscriptions": [
                {
                    "id": "sub_ExampleSubscription123",
                    "status": "active",
                    "currentPeriodStart": "2024-01-01T00:00:00.000Z",
                    "currentPeriodEnd": "2024-02-01T00:00:00.000Z",
                    "plan": {
                        "stripePriceId": "price_ExamplePriceID456",
                        "name": "Premium Plan",
                        "amount": 4999,
                        "currency": "usd",
                        "interval": "month",
                    },
                }
            ],
            "createdAt": "2023-12-01T00:00:00.000Z",
            "updatedAt": "2024-01-15T00:00:00.000Z",
        }
    ],
    "pagination": {"total": 150, "limit": 10, "offset": 0, "hasMore": True},
}

# Timestamp formats as the examples write them.
ISO_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")  # respan, flexprice
ISO_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")  # public (and v0: ISO 8601)


# ---------------------------------------------------------------------------------------------
# Holding a response to an example.


def kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    assert isinstance(value, dict), value
    return "object"


def assert_like(
    actual: Any,
    example: Any,
    *,
    also: dict[str, set[str]] | None = None,
    opaque: frozenset[str] = frozenset({"metadata"}),
    where: str = "$",
) -> None:
    """``actual`` has exactly the example's keys, and each value the example value's JSON kind
    (plus the kinds ``also`` allows for that key: e.g. a string where the example shows null,
    for a field the doc calls "or null"). Objects and arrays recurse (an array's items against
    the example's first item); ``opaque`` objects (user data) are compared by kind only."""
    also = also or {}
    assert kind(actual) == kind(example), f"{where}: {actual!r} is {kind(actual)}, the doc's is {kind(example)}"
    if isinstance(example, dict):
        assert set(actual) == set(example), (
            f"{where}: extra keys {sorted(set(actual) - set(example))}, missing {sorted(set(example) - set(actual))}"
        )
        for key, ex in example.items():
            value = actual[key]
            allowed = {kind(ex)} | also.get(key, set())
            assert kind(value) in allowed, f"{where}.{key}: {value!r} is {kind(value)}, expected one of {allowed}"
            if kind(value) == kind(ex) and key not in opaque and isinstance(ex, (dict, list)):
                assert_like(value, ex, also=also, opaque=opaque, where=f"{where}.{key}")
    elif isinstance(example, list) and example:
        for i, item in enumerate(actual):
            assert_like(item, example[0], also=also, opaque=opaque, where=f"{where}[{i}]")


def assert_kinds(actual: dict[str, Any], kinds: dict[str, str], *, nullable: bool = False, where: str = "$") -> None:
    assert set(actual) == set(kinds), (sorted(set(actual) - set(kinds)), sorted(set(kinds) - set(actual)))
    for key, expected_kind in kinds.items():
        allowed = {expected_kind, "null"} if nullable else {expected_kind}
        assert kind(actual[key]) in allowed, f"{where}.{key}: {actual[key]!r} is not {allowed}"


class _AnyLink:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and URL(other).is_absolute()


ANY_LINK = _AnyLink()


def z(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def ms(dt: datetime) -> str:
    dt = dt.astimezone(UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def parse_z(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def get_json(client: TestClient, url: str, headers: dict[str, str]) -> Any:
    return await ok_json(await client.get(url, headers=headers))


def response_schema(doc: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    return doc["paths"][path][method.lower()]["responses"]["200"]["content"]["application/json"]["schema"]


# ---------------------------------------------------------------------------------------------
# The crowd (conftest.py): a read-only organization of 150 prod customers (and 3 test ones)
# shared by the pagination walks, and the orders the adapters document for it.

CROWD_SIZE = 150
CROWD_BASE = datetime(2025, 1, 1, tzinfo=UTC)


Crowd = tuple[Org, list[dict[str, Any]]]


def newest_first(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """created_at descending, ties broken by id descending (the adapters' documented order)."""
    return sorted(rows, key=lambda r: (r["created_at"], r["id"]), reverse=True)


def by_first_seen_desc(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    floor = datetime.min.replace(tzinfo=UTC)
    return sorted(rows, key=lambda r: (r["first_seen"] or floor, r["id"]), reverse=True)
