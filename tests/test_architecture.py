"""The layers of the house: imports only run downward, and no module imports itself back.

    tfrec (library)  <-  export (artifacts, server), tfx_pipeline  <-  tfrec_cli (CLI wiring)

Walks every module of `tfrec`, `export`, `tfx_pipeline` and `tfrec_cli` with
`ast`, including imports inside functions and modules named by string for
`importlib` (a string literal in code that is exactly an internal module's
name), and fails on

- an upward or sideways import: `tfrec` -> `export` / `tfx_pipeline` / `tfx` /
  `tfrec_cli`; `export` <-> `tfx_pipeline`; anything -> `tfrec_cli` but itself;
- an import cycle between modules (a strongly connected component of the
  module import graph with more than one module).

The serving contract and the servables live in `tfrec.serving` (below both
`export` and `tfx_pipeline`); the CLI wiring lives in `tfrec_cli` (above all
three). `ALLOWED` / `ALLOWED_CYCLES` are empty and must stay so: an entry that
no longer occurs fails too.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tfrec", "export", "tfx_pipeline", "tfrec_cli")
# importer package -> packages it must never import (top-level names).
FORBIDDEN = {
    "tfrec": {"export", "tfx_pipeline", "tfx", "tfrec_cli"},
    "export": {"tfx_pipeline", "tfrec_cli"},
    "tfx_pipeline": {"export", "tfrec_cli"},
    "tfrec_cli": set(),
}

# Known violations: none. Do not add to these.
ALLOWED = set()
ALLOWED_CYCLES = set()


def module_files():
    """`{module name: path}` of every module of PACKAGES."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _docstring_nodes(tree):
    nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                nodes.add(id(first.value))
    return nodes


def imports_of(name, path, modules):
    """Top-level names and internal modules that module `name` imports anywhere in its code."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    docstrings = _docstring_nodes(tree)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            subs = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in modules]
            found.update(subs)
            if len(subs) < len(node.names):
                found.add(target)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if node.value in modules and "." in node.value:  # a module named for importlib
                found.add(node.value)
    return found


def import_graph():
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}, modules


def layer_violations(graph):
    out = set()
    for importer, imported in graph.items():
        forbidden = FORBIDDEN[importer.split(".")[0]]
        out.update((importer, target) for target in imported if target.split(".")[0] in forbidden)
    return out


def cycles(graph, modules):
    """Strongly connected components (> 1 module) of the internal import graph (Tarjan)."""
    edges = {m: sorted(t for t in graph[m] if t in modules and t != m) for m in graph}
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(frozenset(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return set(result)


def test_the_walk_sees_imports_inside_functions_and_by_name():
    graph, modules = import_graph()
    assert len(modules) > 50
    assert "tfrec.layers.transformer" in graph["tfrec.layers"]  # from-import of a submodule
    assert "tfrec.serving.servables" in graph["tfx_pipeline.trainer"]  # import inside a function
    assert "export.export_cli" in graph["tfrec_cli.main"]  # named in COMMAND_MODULES for importlib


def test_imports_only_run_downward():
    graph, _ = import_graph()
    violations = layer_violations(graph)
    assert violations - ALLOWED == set(), "upward/sideways imports (see FORBIDDEN)"
    assert ALLOWED - violations == set(), "allow-listed violations that no longer exist: remove them from ALLOWED"


def test_no_import_cycles():
    graph, modules = import_graph()
    found = cycles(graph, modules)
    assert found - ALLOWED_CYCLES == set(), "import cycles between modules"
    assert ALLOWED_CYCLES - found == set(), "allow-listed cycles that no longer exist: remove them"


def test_the_checks_catch_a_planted_violation_and_cycle():
    graph = {"tfrec.a": {"tfrec.b", "numpy"}, "tfrec.b": {"tfrec.a", "tfx.types"}, "export.c": {"tfx_pipeline.d"},
             "tfx_pipeline.d": {"tfrec_cli.main"}, "tfrec_cli.main": {"export.c", "tfx_pipeline.d", "tfrec.a"}}
    assert layer_violations(graph) == {("tfrec.b", "tfx.types"), ("export.c", "tfx_pipeline.d"),
                                       ("tfx_pipeline.d", "tfrec_cli.main")}
    assert cycles(graph, set(graph)) == {frozenset({"tfrec.a", "tfrec.b"}),
                                         frozenset({"export.c", "tfx_pipeline.d", "tfrec_cli.main"})}


def public_classes(modules):
    """`{class name: [modules defining it at top level]}` of public (not `_`-prefixed) classes."""
    found = {}
    for name, path in modules.items():
        for node in ast.parse(path.read_text(), filename=str(path)).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                found.setdefault(node.name, []).append(name)
    return found


def test_public_class_names_are_unique_across_packages():
    # One name, one concept: e.g. the model server's `ServedModelConfig` is not `tfrec.config.ModelConfig`.
    classes = public_classes(module_files())
    assert "ServedModelConfig" in classes and "ModelConfig" in classes
    duplicates = {name: where for name, where in classes.items() if len(where) > 1}
    assert duplicates == {}, f"public class names defined more than once: {duplicates}"
