"""The import direction of docs/ARCHITECTURE.md, held to the code.

Every module of effllm (effllm/, kernels/ as effllm.kernels, recipes/ as effllm.recipes) has a
layer, and imports only modules of lower layers: a layer never reaches the trainer or the parallel
code, which apply FP8, expert parallelism and activation checkpointing from outside. Checked twice:
on the source (every import statement, function bodies included, where no effllm import may
hide), and by importing each module in a fresh interpreter with every module of its own layer
and above blocked, so an import the parser cannot see would fail too.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"effllm": ROOT / "effllm", "effllm.kernels": ROOT / "kernels", "effllm.recipes": ROOT / "recipes"}

# Lowest first. A module may import modules of lower layers only; a recipe may also import other
# recipes (it extends them). docs/ARCHITECTURE.md draws the same map.
LAYERS = [
    ["effllm.errors", "effllm.docfields", "effllm.kernels", "effllm.kernels.launch"],
    ["effllm.fsutil", "effllm.devices", "effllm.licenses", "effllm.metrics", "effllm.content",
     "effllm.kernels.fp8_quant",
     "effllm.kernels.grouped_gemm", "effllm.kernels.moe_combine"],
    ["effllm.kernels.fp8_gemm", "effllm.kernels.scaled_mm"],
    ["effllm.kernels.fp8_grouped", "effllm.kernels.backends"],
    ["effllm.kernels.fp8_grouped_gemm"],
    ["effllm.layers", "effllm.attention", "effllm.goldfish", "effllm.filters", "effllm.tokenizer", "effllm.sources"],
    ["effllm.moe", "effllm.mla", "effllm.mtp"],
    ["effllm.model", "effllm.fp8_experts"],
    ["effllm.fp8", "effllm.parallelize", "effllm.data", "effllm.checkpoint", "effllm.flops", "effllm.memory"],
    ["effllm.config", "effllm.card", "effllm.prepare"],
    ["effllm.run", "effllm.hf", "effllm.eu_summary", "effllm.recipes", "effllm.recipes.*"],
    ["effllm.train", "effllm.hf_import"],
    ["effllm.cli"],
    ["effllm", "effllm.__main__"],
]


def layer_of(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if module in names or (module.startswith("effllm.recipes.") and "effllm.recipes.*" in names):
            return i
    raise AssertionError(f"{module} has no layer: add it to LAYERS here and to docs/ARCHITECTURE.md")


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in FOLDERS.items():
        for path in sorted(folder.glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def is_module(name: str) -> bool:
    return name in modules()


def imported(node: ast.AST) -> list[str]:
    """The effllm modules an import statement loads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "effllm"]
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "effllm":
        names = [f"{node.module}.{a.name}" for a in node.names]
        return [n if is_module(n) else node.module for n in names]
    return []


def is_main_block(node: ast.stmt) -> bool:
    """`if __name__ == "__main__":`, a script's entry point (a recipe run as `python recipes/x.py`)."""
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and isinstance(test.comparators[0], ast.Constant) and test.comparators[0].value == "__main__")


def imports_of(path: Path) -> tuple[list[str], list[tuple[int, str]]]:
    """(the effllm modules imported at module level, (line, module) of those imported elsewhere).
    What a script's `if __name__ == "__main__":` block imports runs only when it is the program, never
    on import, and is left out."""
    tree = ast.parse(path.read_text())
    top, nested = [], []
    top_nodes = {id(n) for n in tree.body}
    skipped = {id(n) for block in tree.body if is_main_block(block) for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        for name in imported(node):
            (top.append(name) if id(node) in top_nodes else nested.append((node.lineno, name)))
    return top, nested


def test_every_module_has_a_layer_and_imports_only_lower_layers():
    wrong = []
    for module, path in modules().items():
        own = layer_of(module)
        top, _ = imports_of(path)
        for name in top:
            if module.startswith("effllm.recipes.") and name.startswith("effllm.recipes"):
                continue  # recipes build on recipes
            if layer_of(name) >= own:
                wrong.append(f"{module} (layer {own}) imports {name} (layer {layer_of(name)})")
    assert not wrong, "imports that do not point down:\n" + "\n".join(wrong)


def test_no_effllm_import_hides_inside_a_function():
    hidden = [f"{path.relative_to(ROOT)}:{line} imports {name}" for module, path in modules().items()
              for line, name in imports_of(path)[1]]
    assert not hidden, "function-local imports of effllm modules (import them at the top):\n" + "\n".join(hidden)


PROBE = r"""
import importlib, importlib.abc, json, sys, types
folders, order = json.loads(sys.argv[1]), json.loads(sys.argv[2])
import torch  # once: what every module needs, outside the check
failures = {}
for module, blocked in order:
    for name in [n for n in sys.modules if n == "effllm" or n.startswith("effllm.")]:
        del sys.modules[name]
    for package, folder in folders.items():  # the packages without their __init__ (effllm's loads the trainer)
        pkg = types.ModuleType(package)
        pkg.__path__ = [folder]
        sys.modules[package] = pkg

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name in blocked:
                raise ImportError(f"{name} is blocked")
            return None

    sys.meta_path.insert(0, Block())
    try:
        if module in folders:
            del sys.modules[module]
        importlib.import_module(module)
    except Exception as e:
        failures[module] = f"{type(e).__name__}: {e}"
    finally:
        sys.meta_path.pop(0)
print(json.dumps(failures))
"""


@pytest.mark.slow
def test_each_module_imports_with_its_own_layer_and_those_above_blocked():
    """effllm.moe loads with the trainer, the parallel code, the model and everything else at or
    above its layer unimportable; so does every module, down to the kernels."""
    mods = modules()
    order = []
    for module in mods:
        own = layer_of(module)
        if module.startswith("effllm.recipes") or module in ("effllm", "effllm.__main__", "effllm.kernels"):
            continue  # packages and recipes: their __init__ or siblings are theirs to import
        blocked = [m for m in mods if m != module and layer_of(m) >= own and m not in FOLDERS]
        order.append((module, blocked))
    run = subprocess.run([sys.executable, "-c", PROBE, json.dumps({k: str(v) for k, v in FOLDERS.items()}),
                          json.dumps(order)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    failures = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(order) > 30 and not failures, failures


def test_every_effllm_name_the_code_uses_exists():
    """Each name taken from an effllm module (`from effllm.x import name`, `module.name` after
    `import effllm.x as module` or `from effllm import x`) exists, in the library, its benchmarks and
    its tests: code that runs only on a GPU never runs here, and a rename must not break it unseen."""
    import importlib

    files = [p for folder in ("effllm", "kernels", "recipes", "benchmarks", "tests") for p in (ROOT / folder).rglob("*.py")]
    missing = []
    for path in files:
        tree = ast.parse(path.read_text())
        aliases = {}  # local name -> effllm module
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("effllm.") and a.asname:
                        aliases[a.asname] = a.name
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "effllm":
                module = importlib.import_module(node.module)
                for a in node.names:
                    if is_module(f"{node.module}.{a.name}"):
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                    elif not hasattr(module, a.name):
                        missing.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.module}.{a.name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                module = importlib.import_module(aliases[node.value.id])
                if not hasattr(module, node.attr):
                    missing.append(f"{path.relative_to(ROOT)}:{node.lineno} {aliases[node.value.id]}.{node.attr}")
    assert not missing, "names that do not exist:\n" + "\n".join(missing)
