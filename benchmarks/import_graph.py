"""A package's import graph, function-level imports included: every module of ``recbole_ilora`` (or of the benchmark
grid's package, ``benchmarks.gridlib``) and the modules of the package it imports, then any circle among them and any
import against the layers (:data:`LAYERS`, :data:`GRID_LAYERS`).

    python benchmarks/import_graph.py                      # one line per module: what it imports of the package
    python benchmarks/import_graph.py --dot                # the same as a Graphviz digraph
    python benchmarks/import_graph.py --package gridlib    # the grid's package
"""

import argparse
import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "recbole_ilora"
GRID_PACKAGE = REPO / "benchmarks" / "gridlib"


def module_name(path, root):
    """The dotted name of the module at ``path`` for an import path ``root``."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(package=PACKAGE, root=None):
    """``{module name: its file}`` for every module of the package (imported from ``root``, default its folder's
    parent; the grid's package is imported from the repository as ``benchmarks.gridlib``)."""
    root = package.parent if root is None else root
    return {module_name(path, root): path for path in sorted(package.rglob("*.py"))}


def import_graph(package=PACKAGE, root=None):
    """``{module: sorted modules of the package it imports}``, imports inside functions included."""
    root = package.parent if root is None else root
    modules = package_modules(package, root)
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            found |= {target for target in targets if target in modules and target != name}
        graph[name] = sorted(found - {module_name(package / "__init__.py", root)})
    return graph


# The package's layers, lowest first: a module imports from its own layer or below, never above (docs/design.md draws
# them). A module not named here belongs to the layer of its package (recbole_ilora.model.*: "model").
LAYERS = [
    ("foundation", ["recbole_ilora", "recbole_ilora.checkpoints", "recbole_ilora.validation", "recbole_ilora.journal",
                    "recbole_ilora.provenance", "recbole_ilora.lapse"]),
    ("shims", ["recbole_ilora._compat"]),
    ("model", ["recbole_ilora.model"]),
    ("configuration and data", ["recbole_ilora.utils", "recbole_ilora.config", "recbole_ilora.continual",
                                "recbole_ilora.data"]),
    ("training, loading, the paper's protocol", ["recbole_ilora.trainer", "recbole_ilora.saved_run",
                                                 "recbole_ilora.generative"]),
    ("pipeline", ["recbole_ilora.pipeline"]),
    ("entries", ["recbole_ilora.quick_start", "recbole_ilora.continual_runner", "recbole_ilora.gate_report"]),
]  # fmt: skip


# The grid's package: what it runs, then planning and records, running, the tables and reports, the command line.
GRID_LAYERS = [
    ("what the grid runs", ["benchmarks.gridlib", "benchmarks.gridlib.rows"]),
    ("planning", ["benchmarks.gridlib.planning"]),
    ("records and encoders", ["benchmarks.gridlib.encoders", "benchmarks.gridlib.records"]),
    ("running", ["benchmarks.gridlib.execution"]),
    ("tables", ["benchmarks.gridlib.tables"]),
    ("one report per protocol", ["benchmarks.gridlib.report_standard", "benchmarks.gridlib.report_lapse",
                                 "benchmarks.gridlib.report_continual", "benchmarks.gridlib.readme"]),
    ("charts", ["benchmarks.gridlib.plots"]),
    ("writing the reports", ["benchmarks.gridlib.reports"]),
    ("command line", ["benchmarks.gridlib.cli"]),
]  # fmt: skip


def layer_of(module, layers=LAYERS):
    """The index in ``layers`` of ``module`` (its package's when it is not named), or None."""
    for index, (_, members) in enumerate(layers):
        if module in members:
            return index
    parent = module.rpartition(".")[0]
    return layer_of(parent, layers) if parent else None


def upward_imports(graph, layers=LAYERS):
    """Every import of a module from a higher layer (or of a module in no layer): ``[(module, imported), ...]``."""
    found = []
    for module, targets in graph.items():
        for target in targets:
            low, high = layer_of(module, layers), layer_of(target, layers)
            if low is None or high is None or high > low:
                found.append((module, target))
    return found


def circles(graph):
    """Every import circle (a list of modules, the first repeated at the end), each found once."""
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for target in graph.get(node, []):
            if state.get(target) == "open":
                found.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dot", action="store_true", help="print a Graphviz digraph")
    parser.add_argument("--package", choices=["recbole_ilora", "gridlib"], default="recbole_ilora")
    args = parser.parse_args()
    package, root, layers = (
        (PACKAGE, None, LAYERS) if args.package == "recbole_ilora" else (GRID_PACKAGE, REPO, GRID_LAYERS)
    )
    graph = import_graph(package, root)
    if args.dot:
        print(f"digraph {args.package} {{")
        for module, targets in graph.items():
            for target in targets:
                print(f'  "{module}" -> "{target}";')
        print("}")
    else:
        files = package_modules(package, root)
        for module, targets in graph.items():
            lines = len(files[module].read_text(encoding="utf-8").splitlines())
            print(f"{module} ({lines} lines): {', '.join(targets) or '-'}")
    found = circles(graph)
    print(f"{len(found)} import circle(s)" + "".join(f"\n  {' -> '.join(circle)}" for circle in found))
    upward = upward_imports(graph, layers)
    print(f"{len(upward)} import(s) against the layers" + "".join(f"\n  {a} -> {b}" for a, b in upward))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
