"""The runtime ships alone: ``edgekit/runtime`` with ``errors.py``, ``units.py`` and the package ``__init__`` is
all a robot gets (README), so a copy of just those must import and generate, with no other part of edgekit.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import edgekit

PACKAGE = Path(edgekit.__file__).parent
SHIPPED = ("__init__.py", "errors.py", "units.py")          # besides runtime/
OPTIONAL = {"edgekit.runtime.constrain": "llguidance"}     # imported only when that library is installed
THIRD_PARTY = ("numpy", "onnxruntime", "tokenizers", "jinja2", "markupsafe")


def _runtime_modules(root: Path) -> list[str]:
    """Dotted names of every module under ``root``/edgekit/runtime."""
    names = []
    for path in sorted((root / "edgekit" / "runtime").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _copy_runtime(dest: Path) -> Path:
    (dest / "edgekit").mkdir(parents=True)
    shutil.copytree(PACKAGE / "runtime", dest / "edgekit" / "runtime",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in SHIPPED:
        shutil.copy2(PACKAGE / name, dest / "edgekit" / name)
    return dest


def test_the_package_init_imports_nothing():
    # Copied as is: it must not pull in any other part of edgekit.
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_every_edgekit_import_in_the_runtime_is_shipped_with_it(tmp_path):
    """Static: also the imports inside functions (TensorRT backend, constraints), which the run below does not
    reach, name only modules of the copy."""
    root = _copy_runtime(tmp_path / "copy")
    shipped = set(_runtime_modules(root)) | {"edgekit", "edgekit.errors", "edgekit.units"}
    bad = []
    for path in sorted((root / "edgekit" / "runtime").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        package = parts if parts[-1] == "__init__" else parts[:-1]
        package = package[:-1] if package[-1] == "__init__" else package
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = list(package[:len(package) - node.level + 1])
                target = ".".join(base + ([node.module] if node.module else []))
                names = [f"{target}.{a.name}" for a in node.names]
                if target not in shipped and not any(n in shipped for n in names):
                    bad.append(f"{path.relative_to(root)}:{node.lineno} imports {target}")
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                bad += [f"{path.relative_to(root)}:{node.lineno} imports {t}" for t in targets
                        if t.split(".")[0] == "edgekit" and t not in shipped]
    assert not bad, bad


_CHILD = r"""
import importlib, importlib.util, json, sys
root, sites, modules, optional, bundle = json.loads(sys.argv[1])
sys.path.insert(0, root)
sys.path.extend(sites)
import edgekit
assert edgekit.__file__.startswith(root), edgekit.__file__
imported = []
for name in modules:
    if name in optional and importlib.util.find_spec(optional[name]) is None:
        continue
    importlib.import_module(name)
    imported.append(name)
from edgekit.runtime.model import load
model = load(bundle, backend="onnxruntime-cpu")
result = model.generate("Hello", max_new_tokens=4, temperature=0.0)
model.close()
outside = sorted(m for m, mod in sys.modules.items() if m.split(".")[0] == "edgekit"
                 and not (getattr(mod, "__file__", None) or root).startswith(root))
print(json.dumps({"imported": imported, "tokens": result.completion_tokens, "finish": result.finish_reason,
                  "edgekit": sorted(m for m in sys.modules if m.split(".")[0] == "edgekit"), "outside": outside}))
"""


def test_a_copy_of_the_runtime_alone_imports_and_generates(tmp_path, tiny_bundle):
    root = _copy_runtime(tmp_path / "copy")
    # Only the third-party libraries' own folders, never the environment's edgekit (an editable install's .pth
    # is not read: -S skips site, -I ignores PYTHONPATH and the user site).
    sites = sorted({str(Path(importlib.util.find_spec(m).origin).parent.parent) for m in THIRD_PARTY})
    modules = _runtime_modules(root)
    args = json.dumps([str(root), sites, modules, OPTIONAL, str(tiny_bundle)])
    done = subprocess.run([sys.executable, "-I", "-S", "-c", _CHILD, args], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["outside"] == []
    assert set(modules) - set(OPTIONAL) <= set(report["imported"])
    shipped = {"edgekit", "edgekit.errors", "edgekit.units", *modules}
    assert set(report["edgekit"]) <= shipped, set(report["edgekit"]) - shipped
    assert report["tokens"] >= 1 or report["finish"] == "stop"
