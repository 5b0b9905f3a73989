"""The library's layering: imports go one way (DESIGN.md), with one deliberate exception, and
importing the library changes nothing in the process."""

import ast
from pathlib import Path

import tinygrad_llm

PACKAGE = Path(tinygrad_llm.__file__).parent
DELIBERATE = ("tinygrad_llm.tensor", "tinygrad_llm.functional")  # Tensor's operators call ops


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_level_imports(path: Path) -> set[str]:
    """Library modules imported at module level (not inside functions) by the file at path."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            module = (f"{base}.{node.module}" if node.module else base) if node.level else \
                node.module
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}
    return {m for m in found if m.startswith("tinygrad_llm")}


def library_graph() -> dict:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")
             if "train" not in p.relative_to(PACKAGE).parts}
    return {name: {m for m in module_level_imports(path) if m in files and m != name}
            for name, path in files.items()}


def test_the_only_import_cycle_is_tensor_and_functional():
    graph = library_graph()
    graph[DELIBERATE[0]].discard(DELIBERATE[1])  # remove the deliberate back edge
    for name in graph:  # a package's __init__ re-exports its modules: not a layer of its own
        if name.count(".") == 0 or Path(PACKAGE.parent, *name.split("."), "__init__.py").exists():
            graph[name] = set()
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join(path + [nxt])}"
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_checkpoint_io_knows_no_models_and_loading_is_the_one_place_that_builds_them():
    graph = library_graph()
    assert not {m for m in graph["tinygrad_llm.checkpoint"]
                if m.startswith(("tinygrad_llm.hf", "tinygrad_llm.models"))}
    assert "tinygrad_llm.loading" not in graph["tinygrad_llm.hf"]


def test_importing_the_library_tunes_no_allocator():
    for path in PACKAGE.rglob("*.py"):
        if "train" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.parse(path.read_text()).body:  # module-level statements only
            calls = [n for n in ast.walk(node) if isinstance(n, ast.Call)]
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                continue
            names = {getattr(c.func, "id", getattr(c.func, "attr", None)) for c in calls}
            assert "tune_cpu_allocator" not in names, f"{path.name} tunes malloc at import"
