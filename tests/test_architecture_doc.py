"""docs/ARCHITECTURE.md's claims about the package hold: every module it names exists, every module is named once
in its Modules table, and the layout rules it states (sizes, __init__ files that only re-export) are true."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "edgekit"
DOC = ROOT / "docs" / "ARCHITECTURE.md"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules_section() -> str:
    text = DOC.read_text(encoding="utf-8")
    start = text.index("\n## Modules")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def _table_modules() -> list[str]:
    """The first cell of each Modules table row: one backticked path relative to edgekit/."""
    rows = [line for line in _modules_section().splitlines() if line.startswith("| `")]
    return [re.match(r"\| `([^`]+)`", row).group(1) for row in rows]


def _package_modules() -> set[str]:
    return {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
            if p.name not in ("__init__.py", "__main__.py")}


def test_every_module_is_in_the_table_once_and_every_row_exists():
    named = _table_modules()
    assert len(named) == len(set(named)), sorted(n for n in named if named.count(n) > 1)
    missing = _package_modules() - set(named)
    assert not missing, f"modules missing from ARCHITECTURE.md's Modules table: {sorted(missing)}"
    gone = [n for n in named if not (PACKAGE / n).is_file()]
    assert not gone, f"ARCHITECTURE.md names modules that do not exist: {gone}"


def test_every_path_the_docs_name_exists():
    """Any ``edgekit/...`` path or ``edgekit.x.y`` module written in ARCHITECTURE.md or README.md."""
    bad = []
    for doc in (DOC, ROOT / "README.md"):
        text = doc.read_text(encoding="utf-8")
        for path in re.findall(r"`(edgekit/[\w/]+(?:\.py)?)`", text):
            if not (ROOT / path).exists():
                bad.append(f"{doc.name}: {path}")
        for m in re.finditer(r"`(edgekit(?:\.\w+)+)", text):
            if text[m.end()] == "/":            # a format name such as `edgekit.bundle/1`, not a module
                continue
            dotted = m.group(1)
            parts = dotted.split(".")
            # the longest prefix that is a module or package; the rest may be a name inside it
            found = any((ROOT.joinpath(*parts[:n]).with_suffix(".py")).is_file()
                        or (ROOT.joinpath(*parts[:n]) / "__init__.py").is_file()
                        for n in range(2, len(parts) + 1))
            if not found:
                bad.append(f"{doc.name}: {dotted}")
    assert not bad, bad


def test_no_module_over_the_size_the_docs_promise():
    long = {m: n for m in _package_modules() | {p.relative_to(PACKAGE).as_posix()
                                                 for p in PACKAGE.rglob("__init__.py")}
            if (n := len((PACKAGE / m).read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, long


def test_long_functions_say_why_in_their_docstring():
    """No function over ~60 lines unless its docstring gives the reason (says "long")."""
    unexplained = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                if lines > MAX_FUNCTION_LINES and "long" not in doc.lower():
                    unexplained.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not unexplained, unexplained


def test_package_init_files_only_re_export():
    """A subsystem lives in a named module; ``__init__.py`` holds imports, ``__all__`` and docstrings only
    (a module-level ``__getattr__`` for lazy re-exports is allowed: it imports, it does not compute)."""
    offenders = []
    for path in PACKAGE.rglob("__init__.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                continue
            if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id.startswith("__")
                                                   for t in node.targets):
                continue
            if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
                continue
            if isinstance(node, ast.If):   # if TYPE_CHECKING: imports
                continue
            offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {type(node).__name__}")
    assert not offenders, offenders
