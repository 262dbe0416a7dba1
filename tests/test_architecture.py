"""The package's import structure (ARCHITECTURE.md): layers, no circles, no private reach-ins.

Read from the source with ``ast`` (every import counts: module level, inside functions, and
under ``TYPE_CHECKING``), so the rules hold for what the code could import, not only for what
one run happens to import.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "lowlevel"

# Layer of each module, bottom (0) to top; a module may import its own layer or lower ones.
LAYERS: dict[str, int] = {
    "errors": 0, "_version": 0,
    "device": 1,
    "_runtime": 2,
    "event": 3, "stream": 3, "interop": 3, "lifetime": 3, "graphs": 3, "sm_control": 3,
    "parallel": 4, "cpu_gpu_event": 4, "cudagraph_dispatch": 4, "graph_runner": 4, "ubatch_slices": 4,
    "dp": 4, "collectives": 4, "ubatch_ring": 4, "ubatch_generators": 4, "ubatching": 4, "ubatch_runner": 4,
    "testing": 4,
    "kernels": 5,
    "timeline": 6, "trace_merge": 6,
    "info": 7, "__main__": 7, "__init__": 8,
}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).with_suffix("")
        parts = rel.parts
        name = "kernels" if parts[0] == "kernels" else parts[0]
        out[".".join(parts)] = path
        assert name in LAYERS, f"lowlevel/{rel}.py has no layer: add it to ARCHITECTURE.md and LAYERS"
    return out


def _layer_of(module: str) -> str:
    return "kernels" if module.startswith("kernels") else module


def _resolve(current: str, level: int, target: str | None) -> str:
    """'lowlevel'-relative dotted name of an import made in ``current``."""
    base = current.split(".")
    base = base[:-1]  # the module's package
    if level:
        drop = level - 1
        base = base[:len(base) - drop] if drop else base
        return ".".join([*base, *(target.split(".") if target else [])])
    assert target is not None
    return target[len("lowlevel."):] if target.startswith("lowlevel.") else ("" if target == "lowlevel" else "?")


def _imports(name: str, path: pathlib.Path) -> list[tuple[str, list[str]]]:
    """(imported lowlevel module, names taken from it) for every import in the file."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.module == "__future__":
                continue
            if node.level == 0 and not (node.module or "").startswith("lowlevel"):
                continue
            mod = _resolve(name, node.level, node.module)
            names = [a.name for a in node.names]
            if mod in ("", "kernels") or mod.endswith("__init__"):
                # `from . import x` / `from .. import _runtime`: each name is a module
                for n in names:
                    sub = f"{mod}.{n}" if mod else n
                    found.append((sub, []))
            else:
                found.append((mod, names))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("lowlevel."):
                    found.append((a.name[len("lowlevel."):], []))
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    g: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for target, _ in _imports(m, p):
            if target in mods:
                g[m].add(target)
            elif f"{target}.__init__" in mods:
                g[m].add(f"{target}.__init__")
    return g


def test_every_module_has_a_layer_and_imports_go_down():
    mods = _modules()
    upward = []
    for m, p in mods.items():
        for target, _ in _imports(m, p):
            if target.split(".")[0] not in LAYERS and target not in mods:
                continue
            src, dst = LAYERS[_layer_of(m.split(".")[0])], LAYERS[_layer_of(target.split(".")[0])]
            if dst > src:
                upward.append(f"{m} (layer {src}) imports {target} (layer {dst})")
    assert not upward, "imports that run upward:\n" + "\n".join(upward)


def test_no_import_circles():
    g = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for t in sorted(g[n]):
            if state.get(t) == 1:
                cycles.append(path[path.index(t):] + [t] if t in path else [n, t])
            elif t not in state:
                visit(t, path + [t])
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n, [n])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_only_the_runtime_layer_is_reached_into():
    """No module takes an underscore name from another lowlevel module, except from the
    private runtime layer, whose names are all plain."""
    mods = _modules()
    bad = []
    for m, p in mods.items():
        for target, names in _imports(m, p):
            for n in names:
                if n.startswith("_") and not n.startswith("__") and target != m:
                    bad.append(f"{m} takes {n} from {target}")
        tree = ast.parse(p.read_text())
        aliases = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level
                   for a in node.names if a.name != "_runtime"}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{m} reads {node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", ["lowlevel.kernels", "lowlevel.kernels.matmul", "lowlevel.kernels.rms_norm",
                                    "lowlevel.kernels.copy"])
def test_kernel_modules_declare_all(module):
    import importlib

    m = importlib.import_module(module)
    assert isinstance(getattr(m, "__all__", None), list) and m.__all__


def test_package_all_is_the_union_of_the_modules():
    import lowlevel

    union = set()
    for m in lowlevel._MODULES:
        assert len(m.__all__) == len(set(m.__all__)), f"{m.__name__}.__all__ repeats a name"
        union |= set(m.__all__)
    assert set(lowlevel.__all__) == union
    for name in lowlevel.__all__:
        assert getattr(lowlevel, name) is not None
