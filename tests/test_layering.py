"""The house rules of the library: qwt_core imports no task folder (anywhere, not even inside a
function), its modules form no import circle at module level, and ``qwt_core`` exports at most 20
names, each of which exists."""
from __future__ import annotations

import ast
import pathlib

import qwt_core

ROOT = pathlib.Path(__file__).resolve().parents[1]
TASK_FOLDERS = ("cls_repq_vit", "det_repq_vit", "det_torchvision", "mm_clip", "hf_transformers", "yolo_qwt",
                "benchmarks", "scripts", "tests")


def _module_name(p: pathlib.Path) -> str:
    parts = p.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(p: pathlib.Path, module_level_only: bool) -> set[str]:
    tree = ast.parse(p.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    pkg = _module_name(p).split(".")
    if p.name != "__init__.py":
        pkg = pkg[:-1]
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            # "from . import x" / "from qwt_core import export": submodules count too
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def _library_files() -> list[pathlib.Path]:
    return sorted((ROOT / "qwt_core").rglob("*.py"))


def test_qwt_core_imports_no_task_folder():
    bad = [(str(p.relative_to(ROOT)), m) for p in _library_files() for m in _imports(p, False)
           if m.split(".")[0] in TASK_FOLDERS]
    assert not bad, bad


def test_no_import_circle_in_qwt_core():
    names = {_module_name(p) for p in _library_files()}
    graph = {_module_name(p): {m for m in _imports(p, True) if m in names and m != _module_name(p)}
             for p in _library_files()}
    # a package's __init__ importing its own submodules is not a circle
    for n, deps in graph.items():
        graph[n] = {d for d in deps if not (d.startswith(n + ".") and n in ("qwt_core", "qwt_core.adapters"))}
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for d in graph.get(n, ()):
            assert state.get(d) != 1, " -> ".join(path + [d])
            if d not in state:
                visit(d, path + [d])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [n])


def test_public_names():
    assert len(qwt_core.__all__) <= 20
    for name in qwt_core.__all__:
        assert getattr(qwt_core, name) is not None, name
