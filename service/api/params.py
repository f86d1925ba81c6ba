"""Turning query strings and bodies into validated pydantic objects, or a 400 naming the field."""

from __future__ import annotations

import typing
from typing import TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from service.api.dbaccess import COST
from service.api.errors import bad_request, invalid, payload_too_large
from service.api.models import CustomerExpanded
from service.domain.profile import json_fault
from service.domain.vocabulary import WRITABLE_COLUMNS
from service.store.rendering import CUSTOMER_FIELDS
from service.web.appkeys import SETTINGS
from service.web.problems import Problem, ProblemField

M = TypeVar("M", bound=BaseModel)

# Fields a client sees (any customer field, and what responses nest or name differently) but
# may never write: a body naming one gets "is read-only" rather than "is not a known field".
READ_ONLY_FIELDS = (
    (
        frozenset(CUSTOMER_FIELDS)
        | frozenset(CustomerExpanded.model_fields)
        # the stored sums behind the averages, and Respan's name for the organization id
        | {"latency_sum", "latency_count", "ttft_sum", "ttft_count", "unique_organization_id"}
    )
    - WRITABLE_COLUMNS
    - {"address"}
)


def _query_name(loc: tuple[int | str, ...], aliases: dict[str, str]) -> str:
    """The query parameter as the client wrote it: ``status`` for any item of a list,
    ``metadata[key]`` for a deepObject entry, the client's own name for an aliased field."""
    name = str(loc[0])
    name = {model: raw for raw, model in aliases.items()}.get(name, name)
    if len(loc) > 1 and isinstance(loc[1], str):
        name += f"[{loc[1]}]"
    return name


def validation_error(exc: ValidationError, location: str, aliases: dict[str, str] | None = None) -> Problem:
    errors = []
    for err in exc.errors(include_url=False):
        if location == "query" and err["loc"]:
            name = _query_name(err["loc"], aliases or {})
        else:
            name = ".".join(str(part) for part in err["loc"]) or location
        if err["type"] == "extra_forbidden":
            if location != "body":
                detail = "is not a known parameter"
            elif str(err["loc"][-1]) in READ_ONLY_FIELDS:
                detail = "is read-only"
            else:
                detail = "is not a known field"
        else:
            detail = err["msg"].removeprefix("Value error, ")
        errors.append(ProblemField(name, detail, location))
    return bad_request(errors)


# PostgreSQL text and jsonb cannot hold U+0000: refuse it up front (a 400 naming the field),
# rather than let the database refuse it (a 500).
NUL = "\x00"
NUL_DETAIL = "must not contain NUL (U+0000) characters"
# A body nested deeper than this is refused before pydantic or orjson walk it recursively
# (orjson.dumps stops at 255 levels); metadata has its own lower bound (service/domain/profile.py).
MAX_BODY_DEPTH = 64


def _is_list(annotation: object) -> bool:
    return typing.get_origin(annotation) is list


def _is_dict(annotation: object) -> bool:
    return typing.get_origin(annotation) is dict


def parse_query(request: web.Request, model: type[M], *, aliases: dict[str, str] | None = None) -> M:
    """Validate ``request.query`` into ``model``.

    List fields accept repeats and comma-separated values; dict fields use OpenAPI's
    deepObject style (``metadata[key]=value``); any other repeated parameter is a 400."""
    fields = model.model_fields
    data: dict[str, object] = {}
    for raw_name in set(request.query.keys()):
        values = request.query.getall(raw_name)
        if any(NUL in value for value in values):
            raise invalid(raw_name, NUL_DETAIL)
        name = (aliases or {}).get(raw_name, raw_name)
        if "[" in name and name.endswith("]"):
            outer, _, inner = name[:-1].partition("[")
            if outer in fields and _is_dict(fields[outer].annotation):
                if len(values) > 1:
                    raise invalid(name, "may be given once")
                bucket = data.setdefault(outer, {})
                assert isinstance(bucket, dict)
                bucket[inner] = values[0]
                continue
        info = fields.get(name) or next((f for f in fields.values() if f.alias == name), None)
        if info is not None and _is_list(info.annotation):
            data[name] = [part for value in values for part in value.split(",")]
        elif len(values) > 1:
            raise invalid(name, "may be given once")
        else:
            data[name] = values[0]
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, "query", aliases) from None


# Bodies a route reads, at most (its Endpoint's max_body): a customer's fields (metadata
# included) or a list's filters need kilobytes, and a body costs the event loop time to parse
# in proportion to its size, refused or not. POST /v1/events takes TALLY_MAX_BODY_BYTES.
WRITE_BODY_BYTES = 65_536
FILTER_BODY_BYTES = 65_536

# The largest body the request's route reads: its Endpoint's max_body, set by the route's
# guard (service/api/routing.py) before the handler runs.
BODY_LIMIT = web.RequestKey("body_limit", int)


async def read_body(request: web.Request) -> bytes:
    """The request's body, at most its route's BODY_LIMIT bytes (413 beyond, checked again as
    it arrives: a chunked body declares no length)."""
    limit = request.get(BODY_LIMIT, request.app[SETTINGS].max_body_bytes)
    if request.content_length is not None and request.content_length > limit:
        raise payload_too_large(f"body exceeds {limit} bytes", close=True)
    raw = bytearray()
    while chunk := await request.content.read(65_536):
        raw += chunk
        if len(raw) > limit:
            raise payload_too_large(f"body exceeds {limit} bytes", close=True)
    meter = request.get(COST)
    if meter is not None and request.content_length is None:  # a chunked body: charged as read
        meter.body_bytes += len(raw)
    return bytes(raw)


async def parse_body(request: web.Request, model: type[M]) -> M:
    """Validate a JSON body into ``model``; 413 past the route's bound, 400 for anything malformed."""
    raw = await read_body(request)
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request([ProblemField("body", str(exc), "body")], "body is not valid JSON") from None
    if not isinstance(data, dict):
        raise invalid("body", "must be a JSON object", "body")
    fault = json_fault(data, max_depth=MAX_BODY_DEPTH)
    if fault is not None:
        raise invalid(fault.path or "body", fault.detail, "body")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, "body") from None
