"""The house as its imports draw it: arrows point inward only, and the inner layers know no source by name.

Layers, innermost first (ARCHITECTURE.md): the shared leaves; ``distributed``; ``collectors/``; ``estimators/``;
the pure decisions (``controllers/``, ``alerts/``); the facade (``monitor`` and what it is made of); the outside
(store, sinks, report, plan, integrations, dashboard, demo, cli).  A module may import its own layer and those
inside it, never one further out; the package faces (``__init__``) may re-export anything.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import noisescale

PACKAGE = Path(noisescale.__file__).resolve().parent

# Innermost first; each entry is a set of top-level names under noisescale/ (a module or a subpackage).
LAYERS: list[set[str]] = [
    {"errors", "events", "stats", "device_index", "grad_norms", "types", "group_types", "version", "columns"},
    {"optimizer_overrides"},
    {"distributed", "preconditioner"},
    {"collectors"},
    {"estimators"},
    {"controllers", "alerts"},
    {"sink", "sink_queue", "source_choice", "cadence", "group_stats", "preconditioned_noise", "monitor"},
    {"store"},
    {"sinks", "report", "planning"},
    {"integrations", "dashboard", "demo"},
    {"cli"},
]


def _layer_of(top: str) -> int | None:
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    return None


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _top(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` for every import of a noisescale module, including those inside functions."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(("noisescale", *path.relative_to(PACKAGE).parent.parts))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "noisescale"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            if name.split(".")[0] == "noisescale":
                out.append((node.lineno, name))
    return out


def test_every_top_level_module_has_a_layer():
    tops = {_top(p) for p in _modules()} - {"__init__", "__main__", "py"}
    unplaced = sorted(t for t in tops if _layer_of(t) is None)
    assert unplaced == [], f"place these in LAYERS: {unplaced}"


def test_imports_point_inward_only():
    upward = []
    for path in _modules():
        if (path.name == "__init__.py" and path.parent == PACKAGE) or path.name == "__main__.py":
            continue  # the package face re-exports (lazily) from every layer
        here = _layer_of(_top(path))
        assert here is not None
        for line, name in _imports(path):
            parts = name.split(".")
            if len(parts) < 2:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} imports the package face 'noisescale'")
                continue
            there = _layer_of(parts[1])
            if there is not None and there > here:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} imports {name}")
    assert upward == [], "imports that point outward:\n" + "\n".join(upward)


SOURCE_NAMES = ("example", "microbatch", "rank")
_NAMED = re.compile(r"source\s*=\s*['\"]|``(example|microbatch|rank)`` source")


@pytest.mark.parametrize("inner", ["collectors", "estimators"])
def test_inner_layers_mention_no_source_by_name(inner):
    found = []
    for path in sorted((PACKAGE / inner).rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value
                if text in SOURCE_NAMES or _NAMED.search(text):
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {text[:80]!r}")
    assert found == [], "source names belong to noisescale.source_choice:\n" + "\n".join(found)
