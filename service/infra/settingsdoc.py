"""The configuration reference page (docs/configuration.md), generated from the settings' own
field descriptions (service/infra/settings.py): one source of truth. ``make config-reference``
writes it (``python -m service.infra.settingsdoc``); tests/test_docs_site.py fails when the
checked-in page and this output differ."""

from __future__ import annotations

import types
import typing
from pathlib import Path

from annotated_types import Ge, Gt, Le, Lt
from pydantic.fields import FieldInfo

from service.infra.settings import DEFAULT_MIGRATIONS_DIR, Settings

HEADER = """# Configuration

<!-- Generated from service/infra/settings.py by `make config-reference`: edit the field
     descriptions there, not this page (tests/test_docs_site.py holds the two together). -->

tally reads every setting from an environment variable, `TALLY_` and the setting's name in
capitals (pydantic-settings). Nothing else configures it: no file, no flags. A value that does
not fit its type or range stops the process at start, naming the variable.

```sh
TALLY_DATABASE_URL=postgresql://me:secret@db.internal:5432/tally \\
TALLY_AMQP_URL=amqp://tally:secret@mq.internal:5672/ \\
TALLY_HTTP_PORT=8090 make run
```

| variable | type | default | meaning |
|---|---|---|---|
"""


def _type(info: FieldInfo) -> str:
    annotation = info.annotation
    base = annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None: X
        [base] = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(base) is typing.Literal:
        return " \\| ".join(f"`{v}`" for v in typing.get_args(base))
    names = {
        str: "text",
        int: "integer",
        float: "seconds" if _is_seconds(info) else "number",
        bool: "`true` \\| `false`",
        Path: "path",
    }
    if base in names:
        return names[base]
    if typing.get_origin(base) is tuple:
        return "comma-separated list"
    if typing.get_origin(base) is dict:
        return "JSON object"
    return str(base)


def _is_seconds(info: FieldInfo) -> bool:
    return (info.description or "").startswith("Seconds")


def _range(info: FieldInfo) -> str:
    low = high = None
    for item in info.metadata:
        if isinstance(item, (Ge, Gt)):
            low = ("≥ " if isinstance(item, Ge) else "> ") + str(item.ge if isinstance(item, Ge) else item.gt)
        if isinstance(item, (Le, Lt)):
            high = ("≤ " if isinstance(item, Le) else "< ") + str(item.le if isinstance(item, Le) else item.lt)
    bounds = ", ".join(b for b in (low, high) if b)
    return f" ({bounds})" if bounds else ""


def _default(info: FieldInfo) -> str:
    value = info.get_default(call_default_factory=True, validated_data={})
    if value is None:
        return "unset"
    if value == DEFAULT_MIGRATIONS_DIR:
        return "`migrations/` of the checkout"
    if isinstance(value, tuple):
        return "`" + ",".join(value) + "`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, dict):
        return "`{}`" if not value else f"`{value}`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    return f"`{value}`"


def markdown() -> str:
    """The whole page."""
    rows = []
    for name, info in Settings.model_fields.items():
        description = " ".join((info.description or "").split()).replace("|", "\\|")
        rows.append(f"| `TALLY_{name.upper()}` | {_type(info)}{_range(info)} | {_default(info)} | {description} |")
    return HEADER + "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
