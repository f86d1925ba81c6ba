import json
from decimal import Decimal
from datetime import datetime, timezone
from tests.conftest import insert_customer
from service import auth

async def test_probe(client, pool, org):
    parent = await insert_customer(pool, org, "parent_1", name="Parent")
    row = await insert_customer(pool, org, "user_123", name="John Doe", email="john@example.com",
        first_seen=datetime(2025,10,15,8,0,0,123,tzinfo=timezone.utc), last_active=datetime(2025,12,29,10,30,tzinfo=timezone.utc),
        active_days=75, number_of_requests=15420, total_tokens=170000, total_cost=Decimal("523.45"),
        latency_sum=2.46, latency_count=2, ttft_sum=0.9, ttft_count=2, total_budget=Decimal(1000), period_budget=Decimal(100), budget_duration="monthly",
        parent_customer_id=parent["id"], metadata={"plan_tier": "enterprise"})
    await pool.execute("INSERT INTO subscriptions (organization_id, id, customer_id, status, current_period_start, current_period_end, plan_stripe_price_id, plan_name, plan_amount, plan_currency, plan_interval, source_time) VALUES ($1,'sub_1',$2,'trialing','2024-01-01T00:00:00Z','2024-02-01T00:00:00Z','price_1','Premium',4999,'usd','month',now())", org.id, row["id"])
    async with pool.acquire() as conn:
        k = await auth.create_key(conn, org.name, ("read",))
    h = org.headers()
    for url, hh in [("/compat/respan/api/users/list/?page=1&page_size=50&sort_by=-first_seen&environment=prod", h),
                ("/compat/respan/api/users/user_123/?environment=prod", h),
                ("/compat/v0/api/v0/customers?skip=0&take=10", {"x-client-key": k.client_key, "x-client-secret": k.client_secret}),
                ("/compat/flexprice/v1/customers?limit=10&offset=0&order=desc&expand=parent_customer", h),
                ("/compat/public/api/public/customers?limit=10&offset=0&include_subscriptions=true", h),
                ("/compat/public/api/public/customers?limit=1&offset=0", h),
                ("/compat/respan/api/users/list/?page_size=1001", h),
                ]:
        r = await client.get(url, headers=hh)
        print(url, r.status, r.content_type)
        print(json.dumps(await r.json(content_type=None), indent=1))
    r = await client.patch("/compat/respan/api/users/user_123/", json={"total_budget": 45.67, "total_cost": 3}, headers=h)
    print(r.status, await r.text())
    r = await client.patch("/compat/respan/api/users/user_123/", json={"total_budget": 45.67, "budget_duration": "weekly"}, headers=h)
    print(r.status, await r.text())
