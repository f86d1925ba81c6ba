"""MkDocs hooks (mkdocs.yml): the API reference page's files, made at build time.

- ``reference/openapi.json``: the OpenAPI document, built from the code exactly as a running
  tally serves it at /openapi.json (``create_app`` does no I/O);
- ``reference/swagger-ui/``: Swagger UI's files from the installed swagger-ui-py package, the
  ones tally serves at /docs-assets: the page loads nothing from a CDN.
"""

from __future__ import annotations

from typing import Any

import orjson
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

from service.api import appkeys
from service.api.app import create_app
from service.api.openapi import swagger_ui_static
from service.infra.settings import Settings

SWAGGER_FILES = ("swagger-ui-bundle.js", "swagger-ui.css")


def on_files(files: Files, config: MkDocsConfig, **_: Any) -> Files:
    document = create_app(Settings())[appkeys.OPENAPI]
    files.append(
        File.generated(config, "reference/openapi.json", content=orjson.dumps(document, option=orjson.OPT_INDENT_2))
    )
    static = swagger_ui_static()
    for name in SWAGGER_FILES:
        files.append(File.generated(config, f"reference/swagger-ui/{name}", abs_src_path=str(static / name)))
    return files
