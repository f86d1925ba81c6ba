"""Dependencies point one way: the domain imports no driver or web framework (not asyncpg,
not aiohttp, not aio-pika), and the store no edge library. import-linter holds the same
contracts in `make lint`; this test shows they hold when the modules are actually imported."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

SERVICE = Path(__file__).resolve().parent.parent / "service"


def modules(package: str) -> list[str]:
    """Every module of a package, found rather than listed (a list falls behind)."""
    return sorted(f"service.{package}.{m.name}" for m in pkgutil.iter_modules([str(SERVICE / package)]))


DOMAIN = modules("domain")
STORE = modules("store")

PROBE = """
import sys
blocked = tuple(sys.argv[1].split(','))
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in blocked:
            raise ImportError('must not import ' + name)
sys.meta_path.insert(0, Block())
import importlib
for module in sys.argv[2:]:
    importlib.import_module(module)
print('ok')
"""
EDGES = "aiohttp,aio_pika,aiormq,pamqp,yarl,multidict,prometheus_client,pydantic_settings,uvloop"
DRIVERS = EDGES + ",asyncpg"


def probe(blocked: str, module_names: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", PROBE, blocked, *module_names], capture_output=True, text=True)


def test_the_packages_are_found_whole() -> None:
    assert {"service.domain.listing", "service.domain.changes", "service.domain.vocabulary"} <= set(DOMAIN)
    assert {"service.store.fold", "service.store.listing", "service.store.auth"} <= set(STORE)


def test_the_domain_imports_no_driver() -> None:
    result = probe(DRIVERS, DOMAIN)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_the_store_imports_no_edge_library() -> None:
    result = probe(EDGES, STORE)
    assert result.returncode == 0, result.stderr


def test_probe_can_fail() -> None:
    result = probe(DRIVERS, ["service.store.fold"])
    assert result.returncode != 0 and "must not import asyncpg" in result.stderr
