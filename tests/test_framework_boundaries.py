"""tally uses aiohttp's public API only: a subclass that reads private attributes, or a call
of a private method, breaks on a minor release. Checked on the syntax tree of every module of
service/ and consumers/ (a grep would be fooled by an alias or a line break):

- nothing private is imported from aiohttp (``aiohttp._http_parser``, ``from aiohttp.x import _y``);
- in a module that imports aiohttp, no ``something._name`` is read or written unless
  ``something`` is the module's own ``self`` or ``cls``, or another library's module imported
  whole (``os._exit``); and nothing private is reached by ``getattr``/``setattr`` with a
  literal name;
- a class that derives from an aiohttp class derives from a documented extension point, and
  touches nothing private of its own either (its ``self`` is partly aiohttp's).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*(ROOT / "service").rglob("*.py"), *(ROOT / "consumers").rglob("*.py")])
# aiohttp's documented base classes for applications to subclass (AbstractResolver: aiohttp's
# client reference, "Resolvers": a custom resolver handed to TCPConnector).
EXTENSION_POINTS = frozenset({"AbstractAccessLogger", "AbstractResolver", "View"})


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


class Checker(ast.NodeVisitor):
    def __init__(self) -> None:
        self.problems: list[str] = []
        self.aiohttp_names: set[str] = set()  # local names bound to aiohttp modules or objects
        # Other modules imported whole: their documented underscore names (os._exit) are theirs.
        self.other_modules: set[str] = set()
        self.classes: list[bool] = []  # per enclosing class: does it derive from aiohttp?

    def report(self, node: ast.AST, what: str) -> None:
        self.problems.append(f"line {getattr(node, 'lineno', '?')}: {what}")

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] == "aiohttp":
                if any(private(part) for part in alias.name.split(".")):
                    self.report(node, f"imports private {alias.name}")
                self.aiohttp_names.add((alias.asname or alias.name).split(".")[0])
            else:
                self.other_modules.add((alias.asname or alias.name).split(".")[0])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if module.split(".")[0] != "aiohttp":
            return
        if any(private(part) for part in module.split(".")):
            self.report(node, f"imports from private {module}")
        for alias in node.names:
            if private(alias.name):
                self.report(node, f"imports private {module}.{alias.name}")
            self.aiohttp_names.add(alias.asname or alias.name)

    def from_aiohttp(self, node: ast.expr) -> str | None:
        """The aiohttp name an expression such as ``web.RequestHandler`` resolves to."""
        if isinstance(node, ast.Name) and node.id in self.aiohttp_names:
            return node.id
        if isinstance(node, ast.Attribute) and self.from_aiohttp(node.value):
            return node.attr
        return None

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        bases = [name for base in node.bases if (name := self.from_aiohttp(base))]
        for name in bases:
            if name not in EXTENSION_POINTS:
                self.report(node, f"class {node.name} derives from aiohttp's {name}, not an extension point")
        self.classes.append(bool(bases))
        self.generic_visit(node)
        self.classes.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        if self.classes and self.classes[-1] and private(node.name):
            self.report(node, f"overrides or adds private {node.name} on an aiohttp class")
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if private(node.attr) and self.aiohttp_names:
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            in_aiohttp_class = bool(self.classes and self.classes[-1])
            own = owner in ("self", "cls") and not in_aiohttp_class
            if not own and owner not in self.other_modules:
                self.report(node, f"touches private .{node.attr}")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if (
            isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and private(node.args[1].value)
            and self.aiohttp_names
        ):
            self.report(node, f"{node.func.id} of private {node.args[1].value!r}")
        self.generic_visit(node)


def problems(source: str) -> list[str]:
    checker = Checker()
    checker.visit(ast.parse(source))
    return checker.problems


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_aiohttp_api(path: Path) -> None:
    assert problems(path.read_text()) == []


def test_the_sources_are_found() -> None:
    assert {"service/web/server.py", "service/web/frontdoor.py", "consumers/app.py"} <= {
        str(p.relative_to(ROOT)) for p in SOURCES
    }


# What the HTTP edge once did, in the shapes a check must catch.
FORBIDDEN = {
    "subclass": "from aiohttp import web\nclass H(web.RequestHandler):\n    pass\n",
    "private read": "from aiohttp import web\ndef f(server: web.Server):\n    return server._kwargs\n",
    "private override": (
        "from aiohttp.abc import AbstractAccessLogger\n"
        "class L(AbstractAccessLogger):\n    def _make(self):\n        pass\n"
    ),
    "self of an aiohttp class": (
        "from aiohttp import web\nclass V(web.View):\n    def get(self):\n        return self._request\n"
    ),
    "private import": "from aiohttp.http_parser import _MsgType\n",
    "private module": "import aiohttp._http_parser as p\n",
    "aliased private read": "import aiohttp as a\nx = a.web.Server\ny = x._loop\n",
    "getattr": "import aiohttp\ndef f(h):\n    return getattr(h, '_request_count')\n",
}


@pytest.mark.parametrize("source", FORBIDDEN.values(), ids=FORBIDDEN.keys())
def test_the_check_catches_private_use(source: str) -> None:
    assert problems(source)


def test_the_check_allows_public_use_and_own_privates() -> None:
    source = (
        "import asyncio\nfrom aiohttp import web\n"
        "class Door(asyncio.Protocol):\n"
        "    def __init__(self):\n        self._own = 1\n"
        "    def data_received(self, data):\n        self._own += len(data)\n"
        "def run(app):\n    return web.AppRunner(app).server\n"
    )
    assert problems(source) == []
