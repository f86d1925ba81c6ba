"""A small JSON Schema checker for the subset pydantic emits (enough to hold responses to the
OpenAPI document: $ref, anyOf/oneOf/allOf, type, const/enum, properties/required, items,
formats, patterns and bounds). An object with declared properties may not carry undeclared
ones unless the schema says additionalProperties."""

from __future__ import annotations

import re
import uuid
from datetime import date, datetime
from typing import Any


def _is_type(value: Any, kind: str) -> bool:
    return {
        "null": value is None,
        "boolean": isinstance(value, bool),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "string": isinstance(value, str),
        "array": isinstance(value, list),
        "object": isinstance(value, dict),
    }[kind]


_FORMATS = {
    "uuid": uuid.UUID,
    "date-time": lambda v: datetime.fromisoformat(v.replace("Z", "+00:00")),
    "date": date.fromisoformat,
}


def check(value: Any, schema: dict[str, Any], doc: dict[str, Any], where: str = "$") -> None:
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/components/schemas/")
        assert name in doc["components"]["schemas"], f"{where}: dangling $ref {schema['$ref']}"
        check(value, doc["components"]["schemas"][name], doc, where)
    for sub in schema.get("allOf", []):
        check(value, sub, doc, where)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            failures = []
            matched = 0
            for sub in schema[key]:
                try:
                    check(value, sub, doc, where)
                    matched += 1
                except AssertionError as exc:
                    failures.append(str(exc))
            assert matched, f"{where}: {value!r} matches none of {key}: {failures}"
            if key == "oneOf":
                assert matched == 1, f"{where}: matches {matched} of oneOf"
    if "const" in schema:
        assert value == schema["const"], f"{where}: {value!r} != const {schema['const']!r}"
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        assert any(_is_type(value, k) for k in kinds), f"{where}: {value!r} is not {kinds}"
    if isinstance(value, str):
        if "format" in schema and schema["format"] in _FORMATS:
            try:
                _FORMATS[schema["format"]](value)
            except ValueError as exc:
                raise AssertionError(f"{where}: {value!r} is not a {schema['format']}") from exc
        if "pattern" in schema:
            assert re.search(schema["pattern"], value), f"{where}: {value!r} !~ {schema['pattern']}"
        if "maxLength" in schema:
            assert len(value) <= schema["maxLength"], where
    if _is_type(value, "number"):
        if "minimum" in schema:
            assert value >= schema["minimum"], where
        if "maximum" in schema:
            assert value <= schema["maximum"], where
    if isinstance(value, dict) and (schema.get("type") == "object" or "properties" in schema):
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            assert name in value, f"{where}: required property {name!r} missing"
        extra = schema.get("additionalProperties", None if props else True)
        for name, item in value.items():
            if name in props:
                check(item, props[name], doc, f"{where}.{name}")
            elif isinstance(extra, dict):
                check(item, extra, doc, f"{where}.{name}")
            else:
                assert extra is True, f"{where}: undocumented property {name!r}"
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            check(item, schema["items"], doc, f"{where}[{i}]")
