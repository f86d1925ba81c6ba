"""The documentation holds to the code: the configuration page is what the settings' own
descriptions generate, every parameter of every operation in the OpenAPI document is on the
guide page a reader opens for it, the README stays one screen and points at pages that
exist, and no vendor is named by a seed file's number. (`make docs` builds the site in strict
mode, which fails on a broken link; CI runs it.)"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from service.infra.settings import Settings
from service.infra.settingsdoc import markdown

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# The guide page a reader opens for each tag of the OpenAPI document.
GUIDE_PAGES = {
    "Customers": "api/customers.md",
    "Events": "api/events.md",
    "Operations": "api/operations.md",
    "Webhooks": "api/webhooks.md",
    "Respan users API": "migrating/respan.md",
    "Flexprice customers API": "migrating/flexprice.md",
    "Devdraft customers API": "migrating/devdraft.md",
    "SnapRefund customers API": "migrating/snaprefund.md",
}
COMPAT_BASE = re.compile(r"^/compat/[a-z0-9]+")


def test_the_configuration_page_is_what_the_settings_generate() -> None:
    page = (DOCS / "configuration.md").read_text()
    assert page == markdown(), "docs/configuration.md is stale: run `make config-reference`"


def test_every_setting_describes_itself_and_is_on_the_page() -> None:
    page = (DOCS / "configuration.md").read_text()
    for name, info in Settings.model_fields.items():
        assert info.description, f"{name} has no Field(description=...)"
        assert f"`TALLY_{name.upper()}`" in page, name


def _schema_properties(schema: dict[str, Any], doc: dict[str, Any]) -> set[str]:
    """The top-level field names of a request body's schema (through refs, unions, arrays)."""
    if "$ref" in schema:
        return _schema_properties(doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]], doc)
    names = set(schema.get("properties", {}))
    for key in ("anyOf", "oneOf", "allOf"):
        for part in schema.get(key, []):
            names |= _schema_properties(part, doc)
    if schema.get("type") == "array" and "items" in schema:
        names |= _schema_properties(schema["items"], doc)
    return names


async def test_every_parameter_of_every_operation_is_on_its_guide_page(openapi_doc: dict[str, Any]) -> None:
    """Each operation, each of its parameters (query, path, header) and each field of its
    request body is named, in code style, on the guide page for its tag."""
    missing: dict[str, list[str]] = {}
    for path, operations in openapi_doc["paths"].items():
        for method, op in operations.items():
            [tag] = op["tags"]
            assert tag in GUIDE_PAGES, f"tag {tag!r} has no guide page: add it to the docs and to GUIDE_PAGES"
            page = (DOCS / GUIDE_PAGES[tag]).read_text()
            route = f"`{method.upper()} {COMPAT_BASE.sub('', path)}"
            names = [p["name"] for p in op.get("parameters", [])]
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body is not None:
                names += sorted(_schema_properties(body, openapi_doc))
            absent = [n for n in names if f"`{n}`" not in page]
            if route not in page:
                absent.insert(0, route + "`")
            if absent:
                missing[f"{method.upper()} {path} ({GUIDE_PAGES[tag]})"] = absent
    assert not missing, missing


def test_the_guide_check_can_fail(openapi_doc: dict[str, Any]) -> None:
    """A parameter the guide does not name is caught (the check above is not vacuous)."""
    params = openapi_doc["paths"]["/v1/customers"]["get"]["parameters"]
    assert "period_budget_share_gte" in {p["name"] for p in params}
    page = (DOCS / GUIDE_PAGES["Customers"]).read_text()
    assert "`period_budget_share_gte`" in page
    assert "`no_such_parameter`" not in page


def test_the_readme_is_one_screen_and_links_to_pages_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200, "the README is one screen: move detail to docs/"
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert local, "the README links to the docs"
    for link in local:
        assert (ROOT / link).exists(), f"README links to {link}, which does not exist"
    for command in ("make run", "make test", "BASE="):
        assert command in readme, command


@pytest.mark.parametrize("where", ["README.md", "CHANGELOG.md", "docs", "service", "consumers", "tests", "bench"])
def test_no_vendor_is_named_by_a_seed_number(where: str) -> None:
    """A reader cannot resolve a seed file's number: vendors are named, with their public docs."""
    pattern = re.compile(r"\bseeds? (0\d\d|\d{3})\b", re.IGNORECASE)
    target = ROOT / where
    files = [target] if target.is_file() else [p for p in target.rglob("*") if p.suffix in (".py", ".md", ".yml")]
    found = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in files for m in pattern.finditer(p.read_text())]
    assert not found, found
