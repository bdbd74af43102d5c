"""The package's architecture holds: layers import only downward, no import cycle, no
private name taken from another module.

Read from the source with ``ast`` (nothing is imported), so a function-level import counts
as much as one at the top of a module.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bids_roimae"
BASE = {"config", "errors", "host", "interrupt", "__init__"}
# What each layer may import besides itself (the base modules are open to every layer).
ALLOWED = {
    "base": set(),
    "core": set(),
    "model": {"core"},
    "analysis": {"core", "model"},
    "io": {"core", "model"},
    "training": {"core", "model", "analysis", "io"},
    "reports": {"core", "model", "analysis", "io"},
    "synth": {"core", "io"},
    "app": {"core", "model", "analysis", "io", "training", "reports"},
    "cli": {"app"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "base"
    if len(parts) == 2 and parts[1] in BASE:
        return "base"
    if len(parts) == 2 and parts[1] == "cli":
        return "cli"
    return parts[1]


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _package_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(modules: dict[str, Path]) -> dict[str, list[tuple[str, list[str], int]]]:
    """``{module: [(imported module, names taken, line), ...]}`` within the package."""
    found: dict[str, list] = defaultdict(list)
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "bids_roimae":
                        found[module].append((alias.name, [], node.lineno))
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, node, path.name == "__init__.py")
                if target.split(".")[0] != "bids_roimae":
                    continue
                names = [a.name for a in node.names]
                submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
                if submodules:  # "from bids_roimae.io import atomic"
                    found[module].extend((s, [], node.lineno) for s in submodules)
                    names = [n for n in names if f"{target}.{n}" not in modules]
                if names:
                    found[module].append((target, names, node.lineno))
    return found


MODULES = _package_modules()
IMPORTS = _imports(MODULES)


def test_the_walk_sees_the_package():
    assert {"bids_roimae.core.geometry", "bids_roimae.app.dispatch",
            "bids_roimae.io.checkpoint"} <= set(MODULES)
    assert any(t == "bids_roimae.core.geometry" for t, _, _ in
               IMPORTS["bids_roimae.io.preparation"] + IMPORTS["bids_roimae.app.common"])


def test_layers_import_only_downward():
    wrong = []
    for module, imports in IMPORTS.items():
        layer = _layer(module)
        for target, _, line in imports:
            other = _layer(target)
            if other in ("base", layer) and not (layer == "base" and other != "base"):
                continue
            if other not in ALLOWED[layer]:
                wrong.append(f"{module}:{line} ({layer}) imports {target} ({other})")
    assert not wrong, "upward or sideways imports:\n" + "\n".join(wrong)


def test_no_import_cycle():
    graph = {m: {t for t, _, _ in IMPORTS.get(m, []) if t in MODULES and t != m}
             for m in MODULES}
    # The package's own __init__ is imported implicitly by everything; it defines only
    # the version and imports nothing of the package.
    graph.pop("bids_roimae", None)
    for edges in graph.values():
        edges.discard("bids_roimae")
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle.extend(stack[stack.index(nxt):] + [node, nxt] if nxt in stack
                             else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, stack + [node]):
                return True
        state[node] = 2
        return False

    for module in sorted(graph):
        if state.get(module) is None and visit(module, []):
            break
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_no_private_name_crosses_a_module_border():
    taken = [f"{module}:{line} takes {name} from {target}"
             for module, imports in IMPORTS.items()
             for target, names, line in imports for name in names
             if name.startswith("_") and name != "__version__" and target != module]
    assert not taken, "\n".join(taken)


@pytest.mark.parametrize("layer", ["core", "model", "analysis"])
def test_numerics_and_model_do_no_file_io(layer):
    """The pure layers never open files (reading and writing is the io layer's job)."""
    offenders = []
    for module, path in MODULES.items():
        if _layer(module) != layer:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in ("open", "read_text", "write_text", "read_bytes", "write_bytes",
                            "save", "load", "to_csv", "read_csv", "savefig"):
                    offenders.append(f"{module}:{node.lineno} calls {name}")
    assert not offenders, "\n".join(offenders)
