"""The layering of DESIGN.md, checked on the source: ``frameworks/`` (with ``patching.py``) is the only code
that hooks or swaps anything in a model, the import graph has no circle, and ``core/`` imports no other layer."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "visattn"
#: calls that touch a model: hooks, class swaps, processor installation, attention-function registration
TOUCHING = {"register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook", "swap_class",
            "set_attn_processor", "set_attention_backend"}
REGISTRIES = {"AttentionInterface", "AttentionMaskInterface"}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The visattn modules ``name`` imports, at the top or inside functions."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            origin = ".".join(base + ([node.module] if node.module else []))
            targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in modules else origin for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def test_the_import_graph_has_no_circle_and_core_imports_no_other_layer() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            assert state.get(target) != 1, f"import circle: {' -> '.join(path[path.index(target):] + [target])}"
            if target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    for name, targets in graph.items():
        if name.startswith("visattn.core"):
            upward = sorted(t for t in targets if not t.startswith("visattn.core")
                            and t not in ("visattn.errors", "visattn._logging"))
            assert not upward, f"{name} imports {upward}: core is the kernels' oracle and imports no other layer"


def test_only_frameworks_and_patching_touch_models() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("frameworks/") or relative == "patching.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in TOUCHING and isinstance(node.ctx, ast.Load):
                offenders.append(f"{relative}:{node.lineno} {node.attr}")
            if isinstance(node, ast.Name) and node.id in REGISTRIES:
                offenders.append(f"{relative}:{node.lineno} {node.id}")
    assert not offenders, f"model hooks and swaps belong in visattn/frameworks/: {offenders}"
