"""Property-based fuzzing of the whole HTTP API from tally's own OpenAPI document
(schemathesis): every operation, every check, against a real `tally api` process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from service.api import appkeys
from service.api.app import create_app
from service.infra.settings import Settings
from service.store import auth
from tests.factories import make_org

# The app factory does no I/O, so the document is built at import, without a server.
SCHEMA = schemathesis.openapi.from_dict(create_app(Settings())[appkeys.OPENAPI])
# A body over its route's bound in bytes (which JSON Schema cannot state) is refused with 413
# before it is read: a refusal of invalid data as much as a 400 is.
SCHEMA.config.checks.negative_data_rejection.expected_statuses.append("413")


@dataclass
class LiveApi:
    url: str
    key: str


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
async def live_api(settings, pool, tmp_path_factory) -> Iterator[LiveApi]:
    org = await make_org(pool)
    async with pool.acquire() as conn:
        key = (await auth.create_key(conn, org.name, ("read", "write", "admin"))).key
    port = _free_port()
    log = tmp_path_factory.mktemp("fuzz") / "api.log"
    env = {
        **os.environ,
        "TALLY_DATABASE_URL": settings.database_url,
        "TALLY_HTTP_PORT": str(port),
        "TALLY_HTTP_HOST": "127.0.0.1",
        "TALLY_AMQP_NAMESPACE": settings.amqp_namespace,
        "TALLY_RATE_LIMIT_PER_SECOND": "1000000",
        "TALLY_RATE_LIMIT_BURST": "1000000",
        "TALLY_IP_RATE_LIMIT_PER_SECOND": "1000000",
        "TALLY_IP_RATE_LIMIT_BURST": "1000000",
    }
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "service.cli", "api"], env=env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        yield LiveApi(f"http://127.0.0.1:{port}", key)
    finally:
        process.terminate()
        process.wait(30)
    assert "Traceback" not in log.read_text(), log.read_text()[-4000:]


# Every check schemathesis has, but one: positive_data_acceptance expects a 2xx for any
# request the schema admits, and OpenAPI cannot express tally's cross-field rules (one
# pagination style per request; cursors only as issued by the server; events only for the
# key's own organization and not from the future). Those requests get a 400 naming the
# field, which every other check here still verifies is a documented problem+json.


@SCHEMA.parametrize()
@hypothesis_settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_conforms_to_its_openapi_document(case, live_api: LiveApi) -> None:
    response = case.call_and_validate(
        base_url=live_api.url,
        headers={"Authorization": f"Bearer {live_api.key}"},
        excluded_checks=[positive_data_acceptance],
    )
    if response.status_code >= 400:
        assert response.headers["content-type"][0].startswith("application/problem+json"), response.text
