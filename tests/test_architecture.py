"""The package's shape, checked from its source with ``ast`` (nothing is imported, no Jittor).

* The import graph of ``jt_lora`` has no cycles. Every import counts, lazy ones inside functions
  included: a lazy import hides a cycle from Python's loader, not from a reader, who still cannot
  understand either module without the other.
* Only ``jt_lora/io/atomic.py`` renames files into place or makes temp files for outputs, so there is
  one write policy (temp file in the target's directory, fsync, rename, fsync of the directory).
"""
import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

PKG = Path(__file__).resolve().parent.parent / "jt_lora"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> Dict[str, Set[str]]:
    """module -> the jt_lora modules it imports (``from .x import y`` counts y when y is a module)."""
    mods = _modules()
    graph: Dict[str, Set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            elif (isinstance(node, ast.Assign) and is_pkg and isinstance(node.value, ast.Dict)
                  and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets)):
                # the lazy public API: {"name": "sub.module"}, imported by importlib on first use
                targets = [f"{mod}.{v.value}" for v in node.value.values if isinstance(v, ast.Constant)]
            for t in targets:
                while t and t not in mods:      # `import jt_lora.a.b as c` -> the deepest module that exists
                    t = t.rpartition(".")[0]
                if t and t.startswith("jt_lora") and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycle(graph: Dict[str, Set[str]]):
    """One cycle as a list of modules (first == last), or None. Package __init__ edges to their
    own submodules are the lazy public API (``jt_lora/__init__`` -> ``jt_lora.models.gpt2``) and
    count like any other edge."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_graph_sees_lazy_and_relative_imports():
    g = import_graph()
    assert "jt_lora.backend" in g["jt_lora.models.gpt2"]          # from ..backend import jt
    assert "jt_lora.models.gpt2" in g["jt_lora"]                   # _EXPORTS, imported on first use


def test_find_cycle_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_graph_has_no_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# Calls that put a file in place or create a temp file for an output. TemporaryDirectory (scratch
# space for a subprocess) is not an output, and fsync of an append-only log is not a replace.
_WRITER_CALLS = {("os", "replace"), ("os", "rename"), ("tempfile", "mkstemp"), ("tempfile", "NamedTemporaryFile"),
                 ("shutil", "move")}


def test_only_io_atomic_renames_files_into_place():
    offenders = []
    for mod, path in _modules().items():
        if mod == "jt_lora.io.atomic":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = node.func.value
                name = owner.id if isinstance(owner, ast.Name) else None
                if (name, node.func.attr) in _WRITER_CALLS:
                    offenders.append(f"{path.relative_to(PKG.parent)}:{node.lineno}: {name}.{node.func.attr}")
                elif node.func.attr in ("mkstemp", "fsync_dir") or (
                        node.func.attr in ("rename", "replace") and name not in ("str", None) and len(node.args) == 1
                        and not isinstance(node.args[0], ast.Constant)):
                    offenders.append(f"{path.relative_to(PKG.parent)}:{node.lineno}: .{node.func.attr}()")
    assert not offenders, "write outputs through jt_lora.io.atomic:\n  " + "\n  ".join(offenders)


# --- one adapter layer family: the front-ends only say where tensors live ---------------------------
_MATH_CALLS = {"matmul", "matmul_transpose", "leaky_relu", "dropout", "dense", "scale_last_dim", "block_b",
               "lora_delta", "lora_update", "ia3_vector", "ia3_scaled"}


def _class_bases(path: Path) -> Dict[str, List[str]]:
    tree = ast.parse(path.read_text())
    return {n.name: [ast.unparse(b) for b in n.bases] for n in tree.body if isinstance(n, ast.ClassDef)}


def _calls_in_class(path: Path, name: str) -> Set[str]:
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
    out = set()
    for node in ast.walk(cls):
        if isinstance(node, ast.Call):
            f = node.func
            out.add(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
    return out


def test_peft_layers_are_front_ends_of_the_nn_layer_classes():
    """The PEFT-style layers subclass the one LoRA / (IA)³ layer classes and compute nothing themselves:
    the forward and merge math is in ``nn`` only, for both front-ends."""
    bases = _class_bases(PKG / "peft" / "layers.py")
    assert "LoraAdapterLayer" in bases["LoraLayer"] and "IA3AdapterLayer" in bases["IA3Layer"]
    for cls in ("TunerLayer", "LoraLayer", "IA3Layer"):
        assert not (_calls_in_class(PKG / "peft" / "layers.py", cls) & _MATH_CALLS), cls
        assert "execute" not in {n.name for n in ast.walk(ast.parse((PKG / "peft" / "layers.py").read_text()))
                                 if isinstance(n, ast.ClassDef) and n.name == cls
                                 for n in n.body if isinstance(n, ast.FunctionDef)}, cls


def test_loralib_layers_are_front_ends_of_the_same_classes():
    lora, ia3 = _class_bases(PKG / "nn" / "lora.py"), _class_bases(PKG / "nn" / "ia3.py")
    assert lora["LoRALayer"] == ["LoraAdapterLayer"] and ia3["IA3Linear"] == ["IA3AdapterLayer"]
    assert {lora[c][0] for c in ("Linear", "MergedLinear", "Embedding")} == {"LoRALayer"}
    assert lora["LoraAdapterLayer"] == ["AdapterLayer"] and ia3["IA3AdapterLayer"] == ["AdapterLayer"]
    # the loralib-style front-end adds no forward of its own (Embedding's lookup aside)
    for cls in ("LoRALayer", "Linear", "MergedLinear"):
        assert not (_calls_in_class(PKG / "nn" / "lora.py", cls) & (_MATH_CALLS - {"dense"})), cls
