"""Dependencies point one way: the core imports neither aiohttp nor aio-pika."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

# Every module of the domain package, found rather than listed (a list falls behind).
CORE = sorted(
    f"service.core.{m.name}"
    for m in pkgutil.iter_modules([str(Path(__file__).resolve().parent.parent / "service/core")])
)

PROBE = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('aiohttp', 'aio_pika', 'aiormq'):
            raise ImportError('core must not import ' + name)
sys.meta_path.insert(0, Block())
import importlib
for module in sys.argv[1:]:
    importlib.import_module(module)
print('ok')
"""


def test_the_domain_is_found_whole() -> None:
    assert {"service.core.fold", "service.core.alerts", "service.core.query", "service.core.vocabulary"} <= set(CORE)


def test_core_imports_no_edge_library() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE, *CORE], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_probe_can_fail() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE, "service.api.app"], capture_output=True, text=True)
    assert result.returncode != 0 and "must not import" in result.stderr
