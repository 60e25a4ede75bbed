"""Every `module.name` the docs cite exists in the code.

A doc that names `jsio.read_body` or `sync.HealthSync.refresh` sends a newcomer to it; when
the code moves on and the doc does not, this test names the stale citation. Names are found
by parsing the source (ast), not by importing it: the shell's modules import `js`, which
exists only inside the Workers runtime.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([*ROOT.glob("docs/*.md"), ROOT / "README.md", ROOT / "bench" / "README.md"])
# Packages cited by their dotted name; the Worker's own modules (src/*.py) are cited bare,
# as the Worker imports them.
PACKAGES = {
    "heady_shared": ROOT / "src" / "heady_shared",
    "heady_node": ROOT / "heady_node",
    "heady_cli": ROOT / "heady_cli",
    "sim": ROOT / "sim",
    "harness": ROOT / "harness",
    "bench": ROOT / "bench",
}
FILE_SUFFIXES = (".py", ".js", ".mjs", ".css", ".html", ".toml", ".json", ".md", ".txt", ".sql")
CITATION = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+)(?:\(\))?`")


def _module_file(parts: list[str]) -> tuple[Path | None, int]:
    """The source file of the longest module prefix of `parts`, and how many parts it used."""
    first = parts[0]
    if first in PACKAGES:
        base, used = PACKAGES[first], 1
    else:
        base, used = ROOT / "src", 0
    found: tuple[Path | None, int] = (None, 0)
    path = base
    if used and (path / "__init__.py").exists():
        found = (path / "__init__.py", used)
    for part in parts[used:]:
        if (path / part / "__init__.py").exists():
            path = path / part
            used += 1
            found = (path / "__init__.py", used)
        elif (path / f"{part}.py").exists():
            found = (path / f"{part}.py", used + 1)
            break
        else:
            break
    return found


def _names(body: list[ast.stmt]) -> dict[str, list[ast.stmt]]:
    """Names bound at this level, each with the body below it (a class's), if any."""
    out: dict[str, list[ast.stmt]] = {}
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            out[node.name] = []
        elif isinstance(node, ast.ClassDef):
            out[node.name] = node.body
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = []
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = []
        elif isinstance(node, ast.ImportFrom | ast.Import):
            for alias in node.names:
                out[(alias.asname or alias.name).split(".")[0]] = []
        elif isinstance(node, ast.If | ast.Try):
            out.update(_names(node.body))
    return out


@cache
def _tree(path: Path) -> list[ast.stmt]:
    return ast.parse(path.read_text()).body


def _exists(parts: list[str]) -> bool | None:
    """True/False for a citation of project code; None when it is not project code."""
    path, used = _module_file(parts)
    if path is None:
        return None
    body = _tree(path)
    for name in parts[used:]:
        names = _names(body)
        if name not in names:
            return False
        body = names[name]
    return True


def _citations() -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        for cited in sorted(set(CITATION.findall(doc.read_text()))):
            if cited.endswith(FILE_SUFFIXES):
                continue
            out.append((doc.relative_to(ROOT).as_posix(), cited))
    return out


CITATIONS = _citations()


def test_docs_cite_project_code() -> None:
    # The check below must have something to check: the docs do walk the code.
    assert sum(_exists(c.split(".")) is not None for _, c in CITATIONS) >= 30


@pytest.mark.parametrize(("doc", "cited"), CITATIONS)
def test_cited_name_exists(doc: str, cited: str) -> None:
    assert _exists(cited.split(".")) is not False, f"{doc} cites `{cited}`, which does not exist"


def test_a_missing_name_is_caught() -> None:
    assert _exists(["sync", "HealthSync", "refresh"]) is True
    assert _exists(["sync", "HealthSync", "no_such_method"]) is False
    assert _exists(["entry", "_read_body"]) is False
    assert _exists(["heady_shared", "routes", "roles_served_by"]) is True
    assert _exists(["ctx", "waitUntil"]) is None
