"""The OpenAPI 3.1 document, generated from the Endpoint list and its pydantic models, and a
self-contained ``/docs`` page rendered from that document (no external scripts)."""

from __future__ import annotations

import html
import re
import typing
from collections.abc import Sequence

import orjson
from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from service.api import appkeys
from service.api.models import Problem
from service.api.routing import Endpoint

REF = "#/components/schemas/{model}"
ERROR_TEXT = {
    400: "Invalid parameter or body (the problem names it)",
    401: "Missing, malformed, unknown or revoked API key",
    403: "The key lacks the scope this route needs",
    404: "No such resource in the key's organization",
    409: "Conflicts with an existing resource",
    413: "Body or batch too large",
    429: "Rate limited; retry after Retry-After seconds",
    503: "A dependency is unavailable or this organization's share of the database is busy; retry after "
    "Retry-After seconds",
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
            param.update(style="deepObject", explode=True)
        elif typing.get_origin(info.annotation) is list:
            param.update(style="form", explode=True)
        params.append(param)
    return params


def build_openapi(
    endpoints: Sequence[Endpoint], *, title: str, version: str, tags: dict[str, str]
) -> dict[str, typing.Any]:
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
            "operationId": re.sub(r"\W+", "_", f"{ep.tag}_{ep.handler.__name__}").strip("_"),
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
        if parameters:
            op["parameters"] = parameters
        if ep.body:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[(ep.body, "validation")]}},
            }
        ok: dict[str, object] = {"description": "OK" if ep.status < 300 else "Done"}
        if ep.response:
            ok["content"] = {ep.content_type: {"schema": refs[(ep.response, "serialization")]}}
        elif ep.status != 204:
            ok["content"] = {ep.content_type: {"schema": {}}}
        responses: dict[str, object] = {str(ep.status): ok}
        problem_ref = refs[(Problem, "serialization")]
        # Every authenticated route can answer 401 (no valid key), 403 (missing scope), 429
        # (the key's rate limit, or its address's for failed keys) and 503 (bounded waits for
        # the database); a public route 429 (its address's rate limit).
        for code in sorted(set(ep.errors) | ({401, 403, 429, 503} if ep.scope else {429})):
            response: dict[str, object] = {
                "description": ERROR_TEXT.get(code, "Error"),
                "content": {"application/problem+json": {"schema": problem_ref}},
            }
            if code in (429, 503):
                response["headers"] = {"Retry-After": {"schema": {"type": "integer"}}}
            responses[str(code)] = response
        op["responses"] = responses
        if ep.scope:
            op["security"] = [{"bearerAuth": []}, {"clientKey": [], "clientSecret": []}]
            op["x-required-scope"] = ep.scope
        paths.setdefault(ep.path, {})[ep.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "tags": [{"name": name, "description": text} for name, text in tags.items()],
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key>"},
                "clientKey": {"type": "apiKey", "in": "header", "name": "x-client-key"},
                "clientSecret": {"type": "apiKey", "in": "header", "name": "x-client-secret"},
            },
        },
    }


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps(request.app[appkeys.OPENAPI]), content_type="application/json")


def render_docs(doc: dict[str, typing.Any]) -> str:
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>" + esc(doc["info"]["title"]) + " API</title>",
        "<style>body{font:15px/1.5 system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;color:#222}"
        "code,td.n{font-family:ui-monospace,monospace}table{border-collapse:collapse;width:100%;margin:.5rem 0}"
        "td,th{border-bottom:1px solid #ddd;padding:.25rem .5rem;text-align:left;vertical-align:top}"
        "h3{margin:1.5rem 0 .25rem}.m{display:inline-block;min-width:4.5rem;font-weight:700}"
        "section{border-left:3px solid #4a7;padding-left:1rem;margin:1rem 0}</style></head><body>",
        f"<h1>{esc(doc['info']['title'])} <small>{esc(doc['info']['version'])}</small></h1>",
        "<p>Machine-readable: <a href='/openapi.json'>/openapi.json</a> (OpenAPI 3.1). "
        "Authenticate with <code>Authorization: Bearer &lt;key&gt;</code>. Errors are "
        "<code>application/problem+json</code> (RFC 9457).</p>",
    ]
    for tag in doc.get("tags", []):
        parts.append(f"<h2>{esc(tag['name'])}</h2><p>{esc(tag['description'])}</p>")
        for path, ops in doc["paths"].items():
            for method, op in ops.items():
                if tag["name"] not in op.get("tags", []):
                    continue
                parts.append(f"<section><h3><span class='m'>{method.upper()}</span><code>{esc(path)}</code></h3>")
                parts.append(f"<p><b>{esc(op['summary'])}</b>. {esc(op.get('description', ''))}")
                if "x-required-scope" in op:
                    parts.append(f" Scope: <code>{esc(op['x-required-scope'])}</code>.")
                parts.append("</p>")
                if op.get("parameters"):
                    parts.append("<table><tr><th>parameter</th><th>in</th><th>schema</th><th>description</th></tr>")
                    for p in op["parameters"]:
                        schema = esc(orjson.dumps(p.get("schema", {})).decode())
                        parts.append(
                            f"<tr><td class='n'>{esc(p['name'])}{'*' if p.get('required') else ''}</td>"
                            f"<td>{esc(p['in'])}</td><td><code>{schema}</code></td>"
                            f"<td>{esc(str(p.get('description', '')))}</td></tr>"
                        )
                    parts.append("</table>")
                codes = ", ".join(f"{c} {esc(r['description'])}" for c, r in op["responses"].items())
                parts.append(f"<p>Responses: {codes}</p></section>")
    parts.append("</body></html>")
    return "".join(parts)


async def docs_page(request: web.Request) -> web.Response:
    return web.Response(text=render_docs(request.app[appkeys.OPENAPI]), content_type="text/html")
