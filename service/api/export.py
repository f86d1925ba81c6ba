"""``GET /v1/customers/export``: every customer a list's filters (and usage window) match,
streamed as NDJSON (the canonical customer, one per line) or CSV (one row per customer, a
fixed set of columns), in id order, a page of the primary key at a time: memory stays
constant whatever the size of the export, no snapshot or connection is held between pages,
and a dropped download resumes with ``after=<the last id received>``."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from uuid import UUID

import orjson
from aiohttp import web

from service.api import dbaccess
from service.api.customers import canonical_shape, customer_filter
from service.api.listing import key_environment
from service.api.models import ExportParams
from service.api.routing import Call, Endpoint
from service.domain.listing import ListQuery
from service.store import customers as core
from service.store.rendering import Projection, Shape

log = logging.getLogger("tally.export")
# Customers read per statement.
PAGE = 1000
CONTENT_TYPES = {"ndjson": "application/x-ndjson", "csv": "text/csv"}


def csv_columns(projection: Projection, prefix: str = "") -> list[str]:
    """The CSV's columns: the shape's keys in order, a nested object's as ``parent.key``."""
    out: list[str] = []
    for key, source in projection.items():
        if isinstance(source, dict):
            out += csv_columns(source, f"{prefix}{key}.")
        else:
            out.append(prefix + key)
    return out


# A spreadsheet runs a cell that starts with one of these as a formula (OWASP's "CSV
# injection"): names, emails and metadata come from end users, so such a cell is written with
# a leading apostrophe. A number (tally's are never negative, but "-" starts formulas too) is
# left as it is.
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    text = str(value)
    if isinstance(value, str) and text.startswith(_FORMULA) and not _number(text):
        return "'" + text
    return text


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def csv_row(doc: dict[str, object], columns: list[str]) -> list[str]:
    def at(path: str) -> object:
        value: object = doc
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value

    return [_cell(at(c)) for c in columns]


def _csv_text(rows: Iterator[list[str]]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerows(rows)
    return buffer.getvalue().encode()


def header(fmt: str, columns: list[str]) -> bytes:
    """What an export starts with: the CSV's header row (NDJSON has none)."""
    return _csv_text(iter([columns])) if fmt == "csv" else b""


def encode(fmt: str, page: list[tuple[str, UUID]], columns: list[str]) -> bytes:
    """A page of (doc, id) as the export's bytes."""
    if fmt == "csv":
        return _csv_text(csv_row(orjson.loads(doc), columns) for doc, _ in page)
    return b"".join(doc.encode() + b"\n" for doc, _ in page)


async def export_customers(call: Call[ExportParams, None]) -> web.StreamResponse:
    params, principal, request = call.query, call.principal, call.request
    shape: Shape = canonical_shape(False, False)
    q = ListQuery(
        principal.organization_id, key_environment(principal, params), customer_filter(params), limit=PAGE, count=False
    )
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    response = web.StreamResponse(
        headers={
            "Content-Type": CONTENT_TYPES[params.format],
            "Content-Disposition": f'attachment; filename="customers-{q.environment}-{stamp}.{params.format}"',
            "Cache-Control": "no-store",
        }
    )
    columns = csv_columns(shape.fields)
    after = params.after
    # The first page is read before the response starts, so that a failure there is still a
    # proper error response; later ones end the stream (resume with after=).
    async with dbaccess.connection(request, read=True) as conn:
        page = await core.export_page(conn, q, shape, after)
    await response.prepare(request)
    try:
        await response.write(header(params.format, columns))
        while page:
            await response.write(encode(params.format, page, columns))
            if len(page) < PAGE:
                break
            after = page[-1][1]
            async with dbaccess.connection(request, read=True) as conn:
                page = await core.export_page(conn, q, shape, after)
    except Exception as exc:
        # The status is sent: an error response now would be written into the body. The
        # connection is closed instead, before the chunked body's end, so that no client can
        # take a partial export for a whole one; it resumes with after=.
        log.warning("export ended early", extra={"error": repr(exc), "after": str(after) if after else None})
        if request.transport is not None:
            request.transport.close()
        return response
    await response.write_eof()
    return response


ENDPOINTS = [
    Endpoint(
        "GET",
        "/v1/customers/export",
        export_customers,
        "Export customers",
        "Customers",
        "read",
        query=ExportParams,
        content_type=CONTENT_TYPES["ndjson"],
        other_content_types=(CONTENT_TYPES["csv"],),
        description="Every customer the filters (and usage window) match, streamed in id order: NDJSON (the "
        "canonical customer, one per line) or CSV (a fixed set of columns, nested objects as parent.key, "
        "metadata as JSON). A dropped download resumes with after=<the id of the last row received>.",
        operation_id="customers_export_customers",
    ),
]
