"""Links the API hands out (list next/previous, Location) never follow a Host header that
is not exactly an allowed host[:port]: `Host: evil.example`, and Hosts that merely begin like
an allowed one (`[::1]@evil.example`), get relative links."""

from __future__ import annotations

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from service.api.app import create_app
from service.api.links import host_allowed
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
        # Hosts that begin like an allowed one and name another to every URL parser.
        ("[::1]@evil.example", ("localhost", "127.0.0.1", "[::1]"), False),
        ("[::1]:80@evil.example/x?", ("localhost", "127.0.0.1", "[::1]"), False),
        ("localhost@evil.example", ("localhost",), False),
        ("localhost:8080@evil.example", ("localhost",), False),
        ("127.0.0.1/evil", ("127.0.0.1",), False),
        ("127.0.0.1?x", ("127.0.0.1",), False),
        ("127.0.0.1#x", ("127.0.0.1",), False),
        ("127.0.0.1:99999", ("127.0.0.1",), False),
        ("127.0.0.1:080", ("127.0.0.1",), False),
        ("[::1", ("[::1]",), False),
        ("[fe80::1%25eth0]", ("*",), False),
        ("local host", ("*",), False),
        ("[::1]@evil.example", ("*",), False),
    ],
)
def test_host_patterns(host: str, patterns: tuple[str, ...], allowed: bool) -> None:
    assert host_allowed(host, patterns) is allowed


FORGED_HOSTS = ("[::1]@evil.example", "[::1]:80@evil.example/x?", "127.0.0.1@evil.example", "localhost:1@evil.example")


@pytest.mark.parametrize("host", FORGED_HOSTS)
async def test_a_forged_host_gets_relative_links_and_location(
    client: TestClient, pool: asyncpg.Pool, org: Org, host: str
) -> None:
    await three_customers(pool, org)
    headers = {**org.headers(), "Host": host}
    page = await ok_json(await client.get("/v1/customers?limit=1", headers=headers))
    assert page["next"].startswith("/v1/customers?limit=1&offset=1"), page["next"]
    respan = await ok_json(await client.get("/compat/respan/api/users/list/?page=2&page_size=1", headers=headers))
    for link in (respan["next"], respan["previous"]):
        assert link.startswith("/compat/respan/api/users/list/?"), link
    created = await client.post("/v1/customers", json={"customer_identifier": uid()}, headers=headers)
    assert created.status == 201
    assert created.headers["Location"].startswith("/v1/customers/"), created.headers["Location"]


@pytest.mark.parametrize("host", FORGED_HOSTS)
async def test_a_forged_forwarded_host_gets_relative_links(
    settings: Settings, migrated, pool: asyncpg.Pool, org: Org, host: str
) -> None:
    proxied = settings.model_copy(update={"trust_forwarded_headers": True})
    await three_customers(pool, org)
    async with TestClient(TestServer(create_app(proxied))) as c:
        headers = {**org.headers(), "X-Forwarded-Proto": "https", "X-Forwarded-Host": host}
        page = await ok_json(await c.get("/v1/customers?limit=1", headers=headers))
        assert page["next"].startswith("/v1/customers?limit=1&offset=1"), page["next"]
        created = await c.post("/v1/customers", json={"customer_identifier": uid()}, headers=headers)
        assert created.headers["Location"].startswith("/v1/customers/"), created.headers["Location"]


def test_settings_read_hosts_and_public_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TALLY_ALLOWED_HOSTS", " api.example.com, *.internal ,")
    monkeypatch.setenv("TALLY_PUBLIC_URL", "https://api.example.com/tally/")
    s = Settings()
    assert s.allowed_hosts == ("api.example.com", "*.internal")
    assert s.public_url == "https://api.example.com/tally"
    assert s.trust_forwarded_headers is False
    monkeypatch.setenv("TALLY_TRUST_FORWARDED_HEADERS", "true")
    assert Settings().trust_forwarded_headers is True
    monkeypatch.setenv("TALLY_PUBLIC_URL", "api.example.com")
    with pytest.raises(ValueError):
        Settings()


PROXIED = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "api.example.com"}


async def test_forwarded_headers_are_ignored_unless_trusted(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    await three_customers(pool, org)
    for url in ("/v1/customers?limit=1", "/compat/respan/api/users/list/?page_size=1"):
        page = await ok_json(await client.get(url, headers={**org.headers(), **PROXIED}))
        assert URL(page["next"]).scheme == "http" and URL(page["next"]).host == "127.0.0.1", page["next"]


async def test_links_follow_a_trusted_proxy(settings: Settings, migrated, pool: asyncpg.Pool, org: Org) -> None:
    proxied = settings.model_copy(
        update={"trust_forwarded_headers": True, "allowed_hosts": ("127.0.0.1", "api.example.com")}
    )
    await three_customers(pool, org)
    async with TestClient(TestServer(create_app(proxied))) as c:
        for url in ("/v1/customers?limit=1", "/compat/respan/api/users/list/?page_size=1"):
            page = await ok_json(await c.get(url, headers={**org.headers(), **PROXIED}))
            nxt = URL(page["next"])
            assert (nxt.scheme, nxt.host, nxt.port) == ("https", "api.example.com", 443), page["next"]
            assert (await ok_json(await c.get(rel(page["next"]), headers=org.headers())))["results"]
        # A chain names the client-facing proxy first; a port is kept.
        chained = {"X-Forwarded-Proto": "https, http", "X-Forwarded-Host": "api.example.com:8443, 10.0.0.1"}
        page = await ok_json(await c.get("/v1/customers?limit=1", headers={**org.headers(), **chained}))
        assert page["next"].startswith("https://api.example.com:8443/v1/customers?"), page["next"]
        # Only the scheme forwarded: the request's own Host.
        page = await ok_json(
            await c.get("/v1/customers?limit=1", headers={**org.headers(), "X-Forwarded-Proto": "https"})
        )
        assert URL(page["next"]).scheme == "https" and URL(page["next"]).host == "127.0.0.1"
        # A forwarded host outside the allowed list gets relative links, as a Host would.
        evil = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"}
        page = await ok_json(await c.get("/v1/customers?limit=1", headers={**org.headers(), **evil}))
        assert page["next"].startswith("/v1/customers?"), page["next"]
        # An unusable scheme is ignored.
        odd = {"X-Forwarded-Proto": "javascript", "X-Forwarded-Host": "api.example.com"}
        page = await ok_json(await c.get("/v1/customers?limit=1", headers={**org.headers(), **odd}))
        assert page["next"].startswith("http://api.example.com/"), page["next"]
