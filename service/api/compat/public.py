"""SnapRefund's customers API (SnapRefund's docs, Get customers list,
https://snaprefund.readme.io/docs/get-customers): ``/compat/public/api/public/customers``.

Unstated by SnapRefund's docs and chosen here: customers are sorted newest first (``createdAt``
descending); ``id`` is tally's customer uuid; ``hasActiveSubscription`` is always computed
(active or trialing); ``subscriptions`` appears only with ``include_subscriptions=true``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from service.api import examples
from service.api.listing import ListAdapter, Listed, Window
from service.api.models import Plan
from service.api.routing import Endpoint
from service.api.shapes import customer_shape
from service.store.rendering import Col

BASE = "/compat/public"
TAG = "SnapRefund customers API"
CAMEL = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class ListParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(50, ge=1, le=100, description="Maximum customers to return (default 50, max 100).")
    offset: int = Field(0, ge=0, le=10_000_000, description="Customers to skip.")
    include_subscriptions: bool = Field(False, description="Include each customer's subscriptions.")


class PublicPlan(Plan):
    """tally's plan, in camelCase."""

    model_config = CAMEL


class PublicSubscription(BaseModel):
    model_config = CAMEL

    id: str
    status: str
    current_period_start: Annotated[datetime | None, Col("current_period_start", "iso_ms")]
    current_period_end: Annotated[datetime | None, Col("current_period_end", "iso_ms")]
    plan: PublicPlan | None


class PublicCustomer(BaseModel):
    model_config = CAMEL

    id: UUID
    email: str | None
    first_name: str | None
    last_name: str | None
    phone: str | None
    stripe_customer_id: str | None
    has_active_subscription: bool = Field(description="Any subscription active or trialing.")
    subscriptions: list[PublicSubscription] | None = Field(None, description="Only with include_subscriptions=true.")
    created_at: Annotated[datetime, Col("created_at", "iso_ms")]
    updated_at: Annotated[datetime, Col("updated_at", "iso_ms")]


class PublicPagination(BaseModel):
    model_config = CAMEL

    total: int
    limit: int
    offset: int
    has_more: bool


class PublicCustomerList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [examples.PUBLIC_CUSTOMER_LIST]})

    data: list[PublicCustomer]
    pagination: PublicPagination


SHAPES = {
    False: customer_shape(PublicCustomer, skip=("subscriptions",)),
    True: customer_shape(
        PublicCustomer,
        skip=("subscriptions",),
        subscriptions_key="subscriptions",
        subscription_model=PublicSubscription,
    ),
}


def _envelope(listed: Listed[ListParams]) -> dict[str, object]:
    q, page = listed.query, listed.page
    pagination = {"total": page.count, "limit": q.limit, "offset": q.offset, "hasMore": page.next_position is not None}
    return {"pagination": pagination}


LIST = ListAdapter[ListParams](
    rows="data",
    window=lambda params: Window(params.limit, params.offset),
    shape=lambda params: SHAPES[params.include_subscriptions],
    envelope=_envelope,
)


ENDPOINTS = [
    Endpoint(
        "GET",
        BASE + "/api/public/customers",
        LIST.handle,
        "Get customers list",
        TAG,
        "read",
        cached=True,
        query=ListParams,
        response=PublicCustomerList,
        operation_id="public_list_customers",
    ),
]
