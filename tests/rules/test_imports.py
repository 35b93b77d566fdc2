"""The import graph of unionfs/, runner/ and bench/: no cycles, and the layers' rules.

Every module's imports are read from its syntax tree (nothing is imported),
each an edge tagged "module" (run when the module loads: at top level, in
an `if`, a `try` or a class body) or "function" (run when a function is
called: the lazy imports the command line relies on).

Decision on cycles: no cycle among module-level edges (such a cycle runs a
module against a half-initialized one, and its outcome depends on which is
imported first); function-level imports may close a loop (by the time such a
function runs, both modules are loaded), and each such loop is tolerated
only where it stays inside one package area, never between areas. Layering
counts both kinds: a lazy import is a dependency all the same.

    unionfs.fs, unionfs.sys  the standard library, xxhash, and each other (sys
                             below fs: sys never imports fs)
    unionfs.fuse             nothing of unionfs.serve/cli, runner, bench
    unionfs.serve            nothing of unionfs.cli, runner, bench
    runner                   nothing of unionfs.cli, unionfs.fs, unionfs.fuse (it
                             talks to the filesystem through a server process)
    unionfs.cli, bench       anything
"""
import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ("unionfs", "runner", "bench")
STDLIB = frozenset(sys.stdlib_module_names)


# ---- reading the graph ---------------------------------------------------------

def discover(root, packages=PACKAGES):
    """{module name: source path} of every module of `packages` under `root`."""
    modules = {}
    for package in packages:
        for parent, dirs, files in os.walk(os.path.join(root, package)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(parent, name)
                    parts = os.path.relpath(path, root)[:-3].split(os.sep)
                    if parts[-1] == "__init__":
                        parts.pop()
                    modules[".".join(parts)] = path
    return modules


class _Collector(ast.NodeVisitor):
    def __init__(self):
        self.depth = 0          # > 0 inside a function
        self.found = []         # (module, level, names, kind)

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node):
        kind = "function" if self.depth else "module"
        for alias in node.names:
            self.found.append((alias.name, 0, (), kind))

    def visit_ImportFrom(self, node):
        kind = "function" if self.depth else "module"
        self.found.append((node.module or "", node.level, tuple(a.name for a in node.names),
                           kind))


def imports_of(name, path, modules):
    """[(imported module, kind)] of module `name`: relative imports resolved, and
    `from P import x` counted as an import of P.x where that is a module."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    collector = _Collector()
    collector.visit(tree)
    is_package = os.path.basename(path) == "__init__.py"
    edges = []
    for module, level, names, kind in collector.found:
        if level:
            base = name.split(".")
            base = base[:len(base) - level + (1 if is_package else 0)]
            module = ".".join(base + ([module] if module else []))
        targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules]
        if len(targets) < len(names) or not names:
            targets.append(module)
        edges += [(target, kind) for target in targets]
    return edges


def import_graph(root=ROOT, packages=PACKAGES):
    """{module: {(imported, kind), ...}} for every module of `packages`."""
    modules = discover(root, packages)
    return {name: set(imports_of(name, path, modules)) for name, path in modules.items()}


# ---- checking it ---------------------------------------------------------------

def cycles(graph, kinds=("module",)):
    """Strongly connected sets of modules (size > 1, or a self-import) over the
    edges of `kinds` between modules of the graph (Tarjan's algorithm)."""
    edges = {m: sorted({t for t, k in targets if k in kinds and t in graph})
             for m, targets in graph.items()}
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(module):
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in edges[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1 or module in edges[module]:
                found.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return found


def area(module):
    """The layer a module belongs to: unionfs.<sub> or a top-level package."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "unionfs" and len(parts) > 1 else parts[0]


def _within(module, *prefixes):
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def forbidden(importer, imported):
    """Why `importer` may not import `imported` (None if it may)."""
    top = imported.split(".")[0]
    if _within(importer, "unionfs.sys"):
        if top in STDLIB or _within(imported, "unionfs.sys") or imported == "unionfs":
            return None
        return "unionfs.sys imports only the standard library and itself"
    if _within(importer, "unionfs.fs"):
        if top in STDLIB or top == "xxhash" or imported == "unionfs" or _within(
                imported, "unionfs.fs", "unionfs.sys"):
            return None
        return "unionfs.fs imports only the standard library, xxhash and unionfs.fs/sys"
    if _within(importer, "unionfs.fuse") and _within(
            imported, "unionfs.serve", "unionfs.cli", "runner", "bench"):
        return "unionfs.fuse imports nothing of serve, cli, runner or bench"
    if _within(importer, "unionfs.serve") and _within(imported, "unionfs.cli", "runner",
                                                         "bench"):
        return "unionfs.serve imports nothing of cli, runner or bench"
    if _within(importer, "runner") and _within(imported, "unionfs.cli", "unionfs.fs",
                                                "unionfs.fuse"):
        return "runner imports nothing of unionfs.cli, unionfs.fs or unionfs.fuse"
    return None


def violations(graph):
    """['importer -> imported (kind): rule', ...] over edges of both kinds."""
    found = []
    for importer, targets in sorted(graph.items()):
        for imported, kind in sorted(targets):
            why = forbidden(importer, imported)
            if why:
                found.append(f"{importer} -> {imported} ({kind}): {why}")
    return found


# ---- the project ---------------------------------------------------------------

@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_graph_covers_every_package(graph):
    assert {"unionfs.cli", "unionfs.serve.process", "unionfs.fs.union", "runner.plan",
            "bench.startup"} <= set(graph)


def test_no_module_level_import_cycle(graph):
    assert cycles(graph) == []


def test_function_level_imports_close_no_loop_between_areas(graph):
    loops = cycles(graph, kinds=("module", "function"))
    assert [c for c in loops if len({area(m) for m in c}) > 1] == []


def test_the_layers_import_only_what_their_rules_allow(graph):
    assert violations(graph) == []


# ---- the checker itself, on small graphs -----------------------------------------

def test_a_cycle_of_three_is_found_and_a_dag_is_clean():
    dag = {"a": {("b", "module")}, "b": {("c", "module")}, "c": set()}
    assert cycles(dag) == []
    looped = dict(dag, c={("a", "module")})
    assert cycles(looped) == [["a", "b", "c"]]


def test_a_self_import_is_a_cycle_and_function_edges_count_only_when_asked():
    assert cycles({"a": {("a", "module")}}) == [["a"]]
    lazy = {"a": {("b", "module")}, "b": {("a", "function")}}
    assert cycles(lazy) == []
    assert cycles(lazy, kinds=("module", "function")) == [["a", "b"]]


def test_edges_to_modules_outside_the_graph_are_ignored():
    assert cycles({"a": {("os", "module"), ("a.x", "module")}}) == []


def test_a_cycle_added_to_real_files_is_found(tmp_path):
    pkg = tmp_path / "unionfs"
    (pkg / "serve").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "serve" / "__init__.py").write_text("")
    (pkg / "serve" / "a.py").write_text("from . import b\n")
    (pkg / "serve" / "b.py").write_text("import os\nfrom .c import thing\n")
    (pkg / "serve" / "c.py").write_text("def f():\n    import json\n"
                                        "from unionfs.serve.a import x  # noqa\n")
    graph = import_graph(str(tmp_path), ("unionfs",))
    assert cycles(graph) == [["unionfs.serve.a", "unionfs.serve.b", "unionfs.serve.c"]]
    assert ("json", "function") in graph["unionfs.serve.c"]


def test_the_layer_rules_catch_a_wrong_way_import(tmp_path):
    pkg = tmp_path / "unionfs"
    (pkg / "fs").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "fs" / "__init__.py").write_text("")
    (pkg / "fs" / "core.py").write_text("import xxhash\nfrom ..sys import libc\n"
                                        "def f():\n    import trio\n")
    graph = import_graph(str(tmp_path), ("unionfs",))
    assert violations(graph) == [
        "unionfs.fs.core -> trio (function): unionfs.fs imports only the standard library, "
        "xxhash and unionfs.fs/sys"]
    assert forbidden("runner.union", "unionfs.fs.union")
    assert forbidden("unionfs.serve.process", "runner.prestart")
    assert forbidden("unionfs.sys.mountinfo", "unionfs.fs.profile")
    assert forbidden("unionfs.cli.run", "runner.plan") is None
    assert forbidden("runner.union", "unionfs.serve.process") is None
