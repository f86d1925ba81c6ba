"""GET /v1/customers/export: every matching customer streamed as NDJSON or CSV in id order,
across several pages of the primary key, resumable with after=, never another
organization's or environment's customers."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from service.api.customers import canonical_shape
from service.api.export import PAGE, csv_columns
from service.infra.settings import Settings
from tests.factories import Org
from tests.support import tally

# More than two pages of the export's primary-key walk.
CUSTOMERS = 2 * PAGE + 345

LOAD = """
INSERT INTO customers (organization_id, environment, customer_identifier, name, email, status, metadata,
                       created_at, updated_at)
SELECT $1, $2, 'exp_' || g, 'Customer ' || g, 'c' || g || '@example.com',
       (ARRAY['active', 'draft'])[1 + g % 2], jsonb_build_object('tier', (g % 3)::text), now(), now()
FROM generate_series(1, $3) g
"""


@pytest.fixture
async def loaded(pool: asyncpg.Pool, org: Org, other_org: Org) -> None:
    await pool.execute(LOAD, org.id, "prod", CUSTOMERS)
    await pool.execute(LOAD, org.id, "test", 7)
    await pool.execute(LOAD, other_org.id, "prod", 11)


async def export(client: TestClient, org: Org, query: str = "") -> tuple[int, dict, bytes]:
    r = await client.get(f"/v1/customers/export?{query}", headers=org.headers())
    return r.status, dict(r.headers), await r.read()


async def test_ndjson_streams_every_customer_once_in_id_order(client: TestClient, org: Org, loaded) -> None:
    status, headers, body = await export(client, org)
    assert status == 200, body[:500]
    assert headers["Content-Type"].startswith("application/x-ndjson")
    assert headers["Content-Disposition"].startswith('attachment; filename="customers-prod-')
    rows = [json.loads(line) for line in body.decode().splitlines()]
    assert len(rows) == CUSTOMERS
    assert {r["customer_identifier"] for r in rows} == {f"exp_{g}" for g in range(1, CUSTOMERS + 1)}
    ids = [r["id"] for r in rows]
    assert ids == sorted(ids)
    # Each line is the customer as the API shows it.
    one = await client.get(f"/v1/customers/{rows[1500]['customer_identifier']}", headers=org.headers())
    assert rows[1500] == {k: v for k, v in (await one.json()).items() if k in rows[1500]}


async def test_an_export_resumes_after_the_last_id_received(client: TestClient, org: Org, loaded) -> None:
    _, _, body = await export(client, org)
    rows = [json.loads(line) for line in body.decode().splitlines()]
    _, _, rest = await export(client, org, f"after={rows[1234]['id']}")
    assert [json.loads(line) for line in rest.decode().splitlines()] == rows[1235:]


async def test_filters_apply_and_csv_has_a_fixed_set_of_columns(client: TestClient, org: Org, loaded) -> None:
    status, headers, body = await export(client, org, "format=csv&status=draft&metadata[tier]=1")
    assert status == 200, body[:500]
    assert headers["Content-Type"].startswith("text/csv")
    table = list(csv.reader(io.StringIO(body.decode())))
    columns = csv_columns(canonical_shape(False, False).fields)
    assert table[0] == columns
    want = {f"exp_{g}" for g in range(1, CUSTOMERS + 1) if g % 2 == 1 and g % 3 == 1}
    got = {dict(zip(columns, row, strict=True))["customer_identifier"] for row in table[1:]}
    assert got == want and len(table) - 1 == len(want)
    first = dict(zip(columns, table[1], strict=True))
    assert first["status"] == "draft" and json.loads(first["metadata"]) == {"tier": "1"}
    assert "address.city" in columns


async def test_an_export_shows_only_the_keys_organization_and_environment(
    client: TestClient, org: Org, other_org: Org, loaded
) -> None:
    _, _, body = await export(client, other_org)
    assert {json.loads(line)["customer_identifier"] for line in body.decode().splitlines()} == {
        f"exp_{g}" for g in range(1, 12)
    }
    r = await client.get("/v1/customers/export", headers=org.headers(org.test_key))
    lines = (await r.read()).decode().splitlines()
    assert len(lines) == 7 and all(json.loads(line)["environment"] == "test" for line in lines)


async def test_a_bad_parameter_is_a_400_before_anything_is_streamed(client: TestClient, org: Org) -> None:
    for query, parameter in (("format=xml", "format"), ("after=nope", "after"), ("usage_only=true", "usage_only")):
        status, _, body = await export(client, org, query)
        assert status == 400 and parameter in body.decode(), (query, body)


async def test_tally_export_writes_the_same_rows_with_progress(
    client: TestClient, org: Org, loaded, settings: Settings, tmp_path: Path
) -> None:
    _, _, body = await export(client, org, "format=csv")
    target = tmp_path / "customers.csv"
    done = tally(
        "export",
        "--org",
        org.name,
        "--format",
        "csv",
        "-o",
        str(target),
        env={"TALLY_DATABASE_URL": settings.database_url},
    )
    assert done.returncode == 0, done.stderr
    assert target.read_bytes() == body
    assert f"exported {CUSTOMERS:,}/{CUSTOMERS:,} customers" in done.stderr


async def test_a_failure_mid_stream_cuts_the_download_short_rather_than_ending_it(
    client: TestClient, org: Org, loaded, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.api import export as api_export

    real, calls = api_export.core.export_page, []

    async def failing(*args: object) -> list:
        calls.append(1)
        if len(calls) == 3:
            raise asyncpg.QueryCanceledError("canceling statement due to statement timeout")
        return await real(*args)

    monkeypatch.setattr(api_export.core, "export_page", failing)
    r = await client.get("/v1/customers/export", headers=org.headers())
    assert r.status == 200
    # Two pages arrived, then the connection closed before the body's end: the client knows
    # the export is incomplete (and resumes with after=), instead of a body that ends cleanly.
    with pytest.raises(aiohttp.ClientPayloadError):
        await r.read()


async def test_csv_cells_a_spreadsheet_would_run_are_written_as_text(
    client: TestClient, pool: asyncpg.Pool, org: Org
) -> None:
    await pool.execute(LOAD, org.id, "prod", 1)
    await pool.execute(
        "UPDATE customers SET name = '=HYPERLINK(\"http://evil\")', email = '@SUM(A1)' WHERE organization_id = $1",
        org.id,
    )
    _, _, body = await export(client, org, "format=csv")
    table = list(csv.reader(io.StringIO(body.decode())))
    row = dict(zip(table[0], table[1], strict=True))
    assert row["name"] == '\'=HYPERLINK("http://evil")' and row["email"] == "'@SUM(A1)"
    assert row["total_cost"] == "0"
