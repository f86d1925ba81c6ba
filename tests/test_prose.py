"""Prose a reader can follow: every repository path named in comments, docstrings and docs
exists, and no reason given in code, tests or the OpenAPI document is a number the reader
cannot look up (a seed file's, an issue tracker's, a review's list of defects) — the vendor's
public documentation, or the behaviour itself, is cited instead.

Migrations are read but not held to today's paths: each is checksummed when it is applied
(service/infra/migrate.py), so a released one keeps the words of its day for good."""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest

from service.api import appkeys
from service.api.app import create_app
from service.infra.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
TOP = ("service", "consumers", "tests", "docs", "migrations", "bench", "deploy")
# A path into one of the top folders, not inside a URL or a longer path: up to its last word
# character (a trailing full stop ends the sentence); "*" is a glob.
PATH = re.compile(r"(?<![\w/.:-])((?:" + "|".join(TOP) + r")/[\w./*-]*[\w*])")
# A document at the top of the repository, by its conventional capitalised name (README.md).
TOP_DOCUMENT = re.compile(r"(?<![\w/.-])([A-Z][A-Z0-9_-]*\.md)\b")
PROSE = (".py", ".md", ".sql", ".yml", ".yaml", ".sh", ".toml", ".json")
TOP_FILES = ("README.md", "CHANGELOG.md", "Makefile", "Dockerfile", "pyproject.toml", "mkdocs.yml")


def sources() -> list[Path]:
    found = [ROOT / name for name in TOP_FILES if (ROOT / name).exists()]
    found += sorted(ROOT.glob("docker-compose*.yml"))
    for folder in ("service", "consumers", "tests", "docs", "bench", "deploy"):
        found += sorted(p for p in (ROOT / folder).rglob("*") if p.is_file() and p.suffix in PROSE)
    return found


def generated_folders() -> list[str]:
    """Folders .gitignore keeps out of the repository that tools write into (bench/results/):
    a path in one of them is named as where output goes, not as a file to open."""
    lines = (ROOT / ".gitignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip().endswith("/") and "/" in line.strip()[:-1]]


def exists(path: str) -> bool:
    if any(path == folder.rstrip("/") or path.startswith(folder) for folder in generated_folders()):
        return True
    return any(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()


def missing_paths(text: str) -> list[str]:
    named = {m[1].rstrip(".") for m in PATH.finditer(text)}
    return sorted(p for p in named if not exists(p))


def test_the_sources_are_found() -> None:
    names = {str(p.relative_to(ROOT)) for p in sources()}
    assert {"README.md", "service/store/fold.py", "consumers/ingest.py", "docs/architecture.md"} <= names


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_named_exists(path: Path) -> None:
    text = path.read_text(errors="replace")
    assert missing_paths(text) == []
    documents = {m[1] for m in TOP_DOCUMENT.finditer(text)}
    assert sorted(d for d in documents if not (ROOT / d).exists() and not (path.parent / d).exists()) == []


def test_a_missing_path_is_found() -> None:
    # Put together here, so that this file itself names no missing path.
    gone = ["docs/" + "gone.md", "service/" + "nowhere.py", "tests/" + "test_*.nothing"]
    text = f"see {gone[1]}, {gone[2]} and ({gone[0]}). Fine: docs/index.md, bench/results/x."
    assert missing_paths(text) == gone


# A number given as the reason for code, which no reader of the repository can open.
UNCITABLE = re.compile(r"\bseeds?\s+#?\d{3}\b|\b(?:issues?|defects?)\s+#?\d+\b", re.IGNORECASE)


def code_and_tests() -> list[Path]:
    return sorted(p for folder in ("service", "consumers", "tests") for p in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", code_and_tests(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_uncitable_numbers_in_code_or_tests(path: Path) -> None:
    lines = path.read_text().splitlines()
    assert [f"{i}: {line.strip()}" for i, line in enumerate(lines, 1) if UNCITABLE.search(line)] == []


def test_no_uncitable_numbers_in_the_openapi_document() -> None:
    document = orjson.dumps(create_app(Settings())[appkeys.OPENAPI]).decode()
    assert [m[0] for m in UNCITABLE.finditer(document)] == []


def test_the_numbers_pattern_can_fail() -> None:
    # Put together here, so that this file itself cites no such number.
    said = [f"as {word} {number}" for word, number in (("seed", "003"), ("Seed", "000's"), ("issue", "10"))]
    said += ["defect" + " 15", "issues" + " #7"]
    fine = ["the cursor this server issued", "random seed: the same seed gives the same stream", "seed=7"]
    assert all(UNCITABLE.search(text) for text in said)
    assert not any(UNCITABLE.search(text) for text in fine)
