"""Links the API hands out (list next/previous, Location) never follow a Host header that
is not allowed (issue 10, defect 15): `Host: evil.example` gets relative links."""

from __future__ import annotations

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from service.api.app import create_app
from service.api.listing import host_allowed
from service.infra.settings import Settings
from tests.factories import Org, insert_customer
from tests.support import ok_json, rel, uid

EVIL = {"Host": "evil.example"}


async def three_customers(pool: asyncpg.Pool, org: Org) -> None:
    for _ in range(3):
        await insert_customer(pool, org, uid())


async def test_a_host_not_allowed_gets_relative_links(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    await three_customers(pool, org)
    page = await ok_json(await client.get("/v1/customers?limit=1&offset=1", headers={**org.headers(), **EVIL}))
    for link in (page["next"], page["previous"]):
        assert link.startswith("/v1/customers?"), link
        assert "evil" not in link
    # Followed, they work like absolute ones.
    nxt = await ok_json(await client.get(page["next"], headers=org.headers()))
    assert nxt["results"]

    respan = await ok_json(
        await client.get("/compat/respan/api/users/list/?page=2&page_size=1", headers={**org.headers(), **EVIL})
    )
    assert respan["next"].startswith("/compat/respan/api/users/list/?") and "evil" not in respan["previous"]

    created = await client.post("/v1/customers", json={"customer_identifier": uid()}, headers={**org.headers(), **EVIL})
    assert created.status == 201
    assert created.headers["Location"].startswith("/v1/customers/"), created.headers["Location"]


async def test_an_allowed_host_gets_absolute_links(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    await three_customers(pool, org)
    page = await ok_json(await client.get("/v1/customers?limit=1", headers=org.headers()))  # Host: 127.0.0.1:port
    assert URL(page["next"]).host == "127.0.0.1"
    assert rel(page["next"]).startswith("/v1/customers?")


async def test_links_are_built_on_the_public_url(settings: Settings, migrated, pool: asyncpg.Pool, org: Org) -> None:
    public = settings.model_copy(update={"public_url": "https://api.example.com/tally"})
    await three_customers(pool, org)
    async with TestClient(TestServer(create_app(public))) as c:
        page = await ok_json(await c.get("/v1/customers?limit=1", headers={**org.headers(), **EVIL}))
        assert page["next"].startswith("https://api.example.com/tally/v1/customers?limit=1&offset=1"), page["next"]
        created = await c.post("/v1/customers", json={"customer_identifier": "a b/c"}, headers=org.headers())
        assert created.headers["Location"] == "https://api.example.com/tally/v1/customers/a%20b%2Fc"


async def test_wildcard_hosts(settings: Settings, migrated, pool: asyncpg.Pool, org: Org) -> None:
    wildcard = settings.model_copy(update={"allowed_hosts": ("*.example.com",)})
    await three_customers(pool, org)
    async with TestClient(TestServer(create_app(wildcard))) as c:
        for host, absolute in (
            ("api.example.com", True),
            ("api.example.com:8443", True),
            ("example.com", False),
            ("evil.example", False),
            ("127.0.0.1", False),
        ):
            page = await ok_json(await c.get("/v1/customers?limit=1", headers={**org.headers(), "Host": host}))
            assert URL(page["next"]).is_absolute() == absolute, (host, page["next"])


@pytest.mark.parametrize(
    ("host", "patterns", "allowed"),
    [
        ("localhost:8080", ("localhost",), True),
        ("LOCALHOST", ("localhost",), True),
        ("[::1]:8080", ("[::1]",), True),
        ("[::1]", ("localhost", "127.0.0.1"), False),
        ("a.b.example.com", ("*.example.com",), True),
        ("example.com", ("*.example.com",), False),
        ("evilexample.com", ("*.example.com",), False),
        ("example.com.evil.example", ("*.example.com",), False),
        ("anything.at.all", ("*",), True),
        ("", ("*",), False),
        ("localhost:", ("localhost",), False),
        ("evil.example", ("localhost", "127.0.0.1", "[::1]"), False),
    ],
)
def test_host_patterns(host: str, patterns: tuple[str, ...], allowed: bool) -> None:
    assert host_allowed(host, patterns) is allowed


def test_settings_read_hosts_and_public_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TALLY_ALLOWED_HOSTS", " api.example.com, *.internal ,")
    monkeypatch.setenv("TALLY_PUBLIC_URL", "https://api.example.com/tally/")
    s = Settings()
    assert s.allowed_hosts == ("api.example.com", "*.internal")
    assert s.public_url == "https://api.example.com/tally"
    monkeypatch.setenv("TALLY_PUBLIC_URL", "api.example.com")
    with pytest.raises(ValueError):
        Settings()
