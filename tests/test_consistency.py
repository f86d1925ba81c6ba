"""Consistency tokens without a standby: writes carry one, a read accepts one (every read is
on the primary then), and a malformed one is a 400 naming the header. The standby itself is
tests/test_standby.py's (it starts one)."""

from __future__ import annotations

from aiohttp.test_utils import TestClient

from service.infra.standby import format_lsn, parse_lsn
from tests.factories import Org
from tests.support import ok_json, problem, uid

HEADER = "X-Tally-Consistency"


def test_lsn_text_round_trips() -> None:
    for text in ("0/0", "16/B374D848", "FFFFFFFF/FFFFFFFF", "1/A"):
        assert format_lsn(parse_lsn(text)) == text
    assert parse_lsn("1/0") > parse_lsn("0/FFFFFFFF")
    for bad in ("", "16", "16/", "/1", "G/1", "1/2/3", "123456789/1", "1 / 2"):
        try:
            parse_lsn(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} parsed")


async def test_writes_carry_a_token_that_a_read_accepts(client: TestClient, org: Org) -> None:
    ident = uid()
    r = await client.post("/v1/customers", json={"customer_identifier": ident, "name": "A"}, headers=org.headers())
    await ok_json(r, 201)
    created = parse_lsn(r.headers[HEADER])
    r = await client.patch(f"/v1/customers/{ident}", json={"name": "B"}, headers=org.headers())
    await ok_json(r)
    updated = parse_lsn(r.headers[HEADER])
    assert updated > created
    r = await client.get(f"/v1/customers/{ident}", headers={**org.headers(), HEADER: format_lsn(updated)})
    assert (await ok_json(r))["name"] == "B"
    r = await client.delete(f"/v1/customers/{ident}", headers=org.headers())
    assert r.status == 204 and parse_lsn(r.headers[HEADER]) > updated


async def test_a_malformed_token_is_a_400_naming_the_header(client: TestClient, org: Org) -> None:
    for path in (
        "/v1/customers",
        f"/v1/customers/{uid()}",
        f"/v1/customers/{uid()}/usage",
        "/compat/v0/api/v0/customers",
    ):
        r = await client.get(path, headers={**org.headers(), HEADER: "yesterday"})
        body = await problem(r, 400, HEADER)
        assert [e["in"] for e in body["errors"]] == ["header"]


async def test_the_openapi_document_describes_the_token(client: TestClient) -> None:
    doc = await ok_json(await client.get("/openapi.json"))
    get = doc["paths"]["/v1/customers"]["get"]
    assert any(p["name"] == HEADER and p["in"] == "header" for p in get["parameters"])
    # Every read that takes the token documents the 400 a malformed one gets.
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            if any(p.get("name") == HEADER for p in op.get("parameters", [])):
                assert "400" in op["responses"], (method, path)
    assert HEADER in doc["paths"]["/v1/customers/{customer_identifier}"]["patch"]["responses"]["200"]["headers"]
