"""The OpenAPI 3.1 document, generated from the Endpoint list and its pydantic models, and the
interactive ``/docs`` page (Swagger UI, served from the installed package: no CDN)."""

from __future__ import annotations

import html
import importlib.util
import typing
from collections.abc import Sequence
from http import HTTPStatus
from pathlib import Path

import orjson
from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from service.api import appkeys
from service.api.models import Problem
from service.api.routing import API_KEY_HEADER, Call, Endpoint, NoQuery

REF = "#/components/schemas/{model}"
ERROR_TEXT = {
    400: "Invalid parameter or body (the problem names it)",
    401: "Missing, malformed, unknown or revoked API key",
    403: "The key lacks the scope this route needs",
    404: "No such resource in the key's organization",
    409: "Conflicts with an existing resource",
    410: "The cursor is older than the change log keeps: list again and follow from the list's as_of",
    413: "Body or batch too large",
    429: "Rate limited; retry after Retry-After seconds",
    503: "A dependency is unavailable or this organization's share of the database is busy; retry after "
    "Retry-After seconds",
}


# A route with an event-stream representation (Accept: text/event-stream): its media type, and
# the header EventSource sends when it reconnects.
EVENT_STREAM_CONTENT = {
    "text/event-stream": {
        "schema": {
            "type": "string",
            "description": "Server-Sent Events: 'id: <cursor>', 'event: created|updated|deleted|resync', 'data: "
            "<the change as JSON>', and ': heartbeat' comment lines while idle.",
        }
    }
}
LAST_EVENT_ID_PARAMETER = {
    "name": "Last-Event-ID",
    "in": "header",
    "required": False,
    "description": "On an event stream, resume after this event id (a change's cursor); EventSource sends it when "
    "it reconnects. Wins over after=.",
    "schema": {"type": "string", "maxLength": 60},
}

CONSISTENCY_TEXT = (
    "Read your writes. Every response of a customer write (POST, PATCH, DELETE) carries the WAL position of its "
    "commit, and, when tally reads from a standby (TALLY_DATABASE_READ_URL), every read the position of the data it "
    "returned. Send the last value you received back on a read: it is served only from data at least that new "
    "(the standby once it has replayed it, waiting up to TALLY_DATABASE_READ_WAIT, else the primary). A value that "
    "is not a WAL position is a 400."
)
CONSISTENCY_PARAMETER: dict[str, object] = {
    "name": "X-Tally-Consistency",
    "in": "header",
    "required": False,
    "description": CONSISTENCY_TEXT,
    "schema": {"type": "string", "pattern": "^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$", "examples": ["16/B374D848"]},
}
IF_NONE_MATCH_PARAMETER: dict[str, object] = {
    "name": "If-None-Match",
    "in": "header",
    "required": False,
    "description": "The ETag of a response you hold: when the response would be the same, it is a 304 with no body "
    "(answered from memory when this process has it cached). A response stays the same until a change to your "
    "organization's customers or usage commits.",
    "schema": {"type": "string"},
}
CACHE_HEADERS: dict[str, object] = {
    "ETag": {
        "description": "A hash of the body: the same on every tally process for the same data. Send it back as "
        "If-None-Match.",
        "schema": {"type": "string"},
    },
    "Cache-Control": {
        "description": "private, no-cache: a client may keep the response and must revalidate it (If-None-Match) "
        "before using it again; shared caches must not keep it.",
        "schema": {"type": "string"},
    },
    "Tally-As-Of": {
        "description": "On customer lists and retrieves: the change-log position the data reflects (every change "
        "logged before it is in the response).",
        "schema": {"type": "string", "pattern": "^[0-9]+\\.[0-9]+$"},
    },
}
CONSISTENCY_RESPONSE_HEADER: dict[str, object] = {
    "description": CONSISTENCY_TEXT,
    "schema": {"type": "string", "pattern": "^[0-9A-F]{1,8}/[0-9A-F]{1,8}$"},
}


def _query_parameters(model: type[BaseModel], aliases: dict[str, str]) -> list[dict[str, object]]:
    schema = model.model_json_schema(ref_template=REF)
    required = set(schema.get("required", []))
    reverse = {v: k for k, v in aliases.items()}
    params: list[dict[str, object]] = []
    for name, prop in schema.get("properties", {}).items():
        info = model.model_fields.get(name) or next(f for f in model.model_fields.values() if f.alias == name)
        param: dict[str, object] = {
            "name": reverse.get(name, name),
            "in": "query",
            "required": name in required,
            "schema": {k: v for k, v in prop.items() if k not in ("title", "description")},
        }
        if prop.get("description"):
            param["description"] = prop["description"]
        if typing.get_origin(info.annotation) is dict:
            # An explicit empty example: without one, Swagger UI pre-fills an object parameter
            # with a sample built from its schema ({"additionalProp1": "string", ...}), and
            # "Try it out" sends it as a filter that matches nothing.
            param.update(style="deepObject", explode=True, example={})
        elif typing.get_origin(info.annotation) is list:
            param.update(style="form", explode=True)
        params.append(param)
    return params


def _answers(ep: Endpoint) -> set[int]:
    """The errors every route like ``ep`` can answer, whatever it does: 400 (a query parameter
    it does not take, an invalid one or body field), 413 (a body over its bound), 404 (a path
    that names what may not exist); on an authenticated route 401 (no valid key), 403 (missing
    scope), 429 (the key's rate limit, or its address's for failed keys) and 503 (bounded waits
    for the database); on a public route 429 (its address's rate limit)."""
    codes = {400, *([413] if ep.body else []), *([404] if ep.path_params else [])}
    return codes | ({401, 403, 429, 503} if ep.scope else {429})


def build_openapi(
    endpoints: Sequence[Endpoint], *, title: str, version: str, tags: dict[str, str], server: str = "/"
) -> dict[str, typing.Any]:
    """The document: every endpoint with its parameters, request and response schemas (each
    model once, under its own class name), examples from the models (the first one also as
    the media type's example, which Swagger UI offers in "Try it out"), errors, security."""
    models: list[tuple[type[BaseModel], typing.Literal["validation", "serialization"]]] = [(Problem, "serialization")]
    for ep in endpoints:
        if ep.body:
            models.append((ep.body, "validation"))
        if ep.response:
            models.append((ep.response, "serialization"))
    refs, defs = models_json_schema(models, ref_template=REF)
    paths: dict[str, dict[str, object]] = {}
    for ep in endpoints:
        op: dict[str, object] = {
            "summary": ep.summary,
            # Stable whatever the tags are called (Endpoint.operation).
            "operationId": ep.operation,
            "tags": [ep.tag],
        }
        if ep.description:
            op["description"] = ep.description
        parameters: list[dict[str, object]] = [
            {"name": n, "in": "path", "required": True, "description": d, "schema": {"type": "string"}}
            for n, d in ep.path_params.items()
        ]
        if ep.query:
            parameters += _query_parameters(ep.query, ep.query_aliases)
        takes_token = ep.scope == "read" and ep.method == "GET"
        if takes_token:
            parameters.append(CONSISTENCY_PARAMETER)
        if ep.cached:
            parameters.append(IF_NONE_MATCH_PARAMETER)
        if ep.event_stream:
            parameters.append(LAST_EVENT_ID_PARAMETER)
        if parameters:
            op["parameters"] = parameters
        if ep.body:
            op["requestBody"] = {
                "required": ep.body_required,
                "content": {"application/json": _media(refs[(ep.body, "validation")], defs)},
            }
        ok: dict[str, object] = {"description": HTTPStatus(ep.status).phrase}
        if ep.response:
            ok["content"] = {ep.content_type: _media(refs[(ep.response, "serialization")], defs)}
        elif ep.status != 204:
            ok["content"] = {t: {"schema": {}} for t in (ep.content_type, *ep.other_content_types)}
        if ep.event_stream:
            ok["content"] = {**ok.get("content", {}), **EVENT_STREAM_CONTENT}  # type: ignore[dict-item]
        if ep.scope in ("read", "write") and ep.path != "/v1/events":
            ok["headers"] = {"X-Tally-Consistency": CONSISTENCY_RESPONSE_HEADER}
        if ep.cached:
            ok["headers"] = {**ok.get("headers", {}), **CACHE_HEADERS}  # type: ignore[dict-item]
        responses: dict[str, object] = {str(ep.status): ok}
        if ep.cached:
            responses["304"] = {
                "description": "Not Modified: the response would be the one whose ETag If-None-Match names",
                "headers": {h: CACHE_HEADERS[h] for h in ("ETag", "Cache-Control")},
            }
        problem_ref = refs[(Problem, "serialization")]
        codes = set(ep.errors) | _answers(ep)
        for code in sorted(codes):
            response: dict[str, object] = {
                "description": ERROR_TEXT.get(code, "Error"),
                "content": {"application/problem+json": {"schema": problem_ref}},
            }
            if code in (429, 503):
                response["headers"] = {"Retry-After": {"schema": {"type": "integer"}}}
            responses[str(code)] = response
        op["responses"] = responses
        if ep.scope:
            security: list[dict[str, list[str]]] = [{"bearerAuth": []}, {"clientKey": [], "clientSecret": []}]
            if ep.api_key_header == API_KEY_HEADER:
                security.append({"apiKeyHeader": []})
            op["security"] = security
            op["x-required-scope"] = ep.scope
        paths.setdefault(ep.path, {})[ep.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": "Customer read model: paged, sorted, filtered customers with usage aggregates, "
            "fed by usage and customer events. Authorize with an API key (`tally keys create`); every error is "
            "RFC 9457 problem+json naming the offending parameter.",
        },
        "servers": [{"url": server, "description": "this tally"}],
        "tags": [{"name": name, "description": text} for name, text in tags.items()],
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key>"},
                "clientKey": {"type": "apiKey", "in": "header", "name": "x-client-key"},
                "clientSecret": {"type": "apiKey", "in": "header", "name": "x-client-secret"},
                "apiKeyHeader": {
                    "type": "apiKey",
                    "in": "header",
                    "name": API_KEY_HEADER,
                    "description": f"{API_KEY_HEADER}: <key> (the Flexprice route set; as its SDKs send it)",
                },
            },
        },
    }


def _media(ref: dict[str, str], defs: dict[str, typing.Any]) -> dict[str, object]:
    """A media type object: the schema, and the model's first example as ``example``."""
    media: dict[str, object] = {"schema": ref}
    name = ref["$ref"].rsplit("/", 1)[-1]
    examples = defs.get("$defs", {}).get(name, {}).get("examples")
    if examples:
        media["example"] = examples[0]
    return media


async def openapi_json(call: Call[NoQuery, None]) -> web.Response:
    return web.Response(body=orjson.dumps(call.request.app[appkeys.OPENAPI]), content_type="application/json")


def swagger_ui_static() -> Path:
    """Swagger UI's own files, from the swagger-ui-py distribution (found without importing
    the package, whose handlers tally does not use): served at ``/docs-assets``, never from a
    CDN, so the docs work offline."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("swagger-ui-py is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


# Relative URLs: the page works at /docs on any host, and under a proxy's path prefix.
DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>{title} API</title>
  <link rel="stylesheet" href="docs-assets/swagger-ui.css">
  <link rel="icon" href="docs-assets/favicon-32x32.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="docs-assets/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({{
      url: "openapi.json",
      dom_id: "#swagger-ui",
      deepLinking: true,
      docExpansion: "list",
      tryItOutEnabled: true,
      persistAuthorization: true,
      displayRequestDuration: true,
      defaultModelsExpandDepth: 0,
    }});
  </script>
</body>
</html>
"""


async def docs_page(call: Call[NoQuery, None]) -> web.Response:
    """Interactive docs (Swagger UI): every operation with its parameters, request and response
    schemas and examples; "Authorize" takes a key, "Try it out" sends real requests."""
    title = html.escape(str(call.request.app[appkeys.OPENAPI]["info"]["title"]))
    return web.Response(text=DOCS_PAGE.format(title=title), content_type="text/html")


async def root(request: web.Request) -> web.Response:
    """``GET /`` leads to the docs."""
    raise web.HTTPFound("docs")
