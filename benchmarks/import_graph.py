"""The package's import graph, function-level imports included: every module of ``recbole_ilora`` and the modules of
the package it imports, then any circle among them and any import against the layers (:data:`LAYERS`).

    python benchmarks/import_graph.py          # one line per module: what it imports of the package
    python benchmarks/import_graph.py --dot    # the same as a Graphviz digraph
"""

import argparse
import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "recbole_ilora"


def module_name(path, package=PACKAGE):
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(package=PACKAGE):
    """``{module name: its file}`` for every module of the package."""
    return {module_name(path, package): path for path in sorted(package.rglob("*.py"))}


def import_graph(package=PACKAGE):
    """``{module: sorted modules of the package it imports}``, imports inside functions included."""
    modules = package_modules(package)
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
        graph[name] = sorted(found - {package.name})
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


def layer_of(module):
    """The index in :data:`LAYERS` of ``module`` (its package's when it is not named), or None."""
    for index, (_, members) in enumerate(LAYERS):
        if module in members:
            return index
    parent = module.rpartition(".")[0]
    return layer_of(parent) if parent else None


def upward_imports(graph):
    """Every import of a module from a higher layer (or of a module in no layer): ``[(module, imported), ...]``."""
    found = []
    for module, targets in graph.items():
        for target in targets:
            low, high = layer_of(module), layer_of(target)
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
    args = parser.parse_args()
    graph = import_graph()
    if args.dot:
        print("digraph recbole_ilora {")
        for module, targets in graph.items():
            for target in targets:
                print(f'  "{module}" -> "{target}";')
        print("}")
    else:
        files = package_modules()
        for module, targets in graph.items():
            lines = len(files[module].read_text(encoding="utf-8").splitlines())
            print(f"{module} ({lines} lines): {', '.join(targets) or '-'}")
    found = circles(graph)
    print(f"{len(found)} import circle(s)" + "".join(f"\n  {' -> '.join(circle)}" for circle in found))
    upward = upward_imports(graph)
    print(f"{len(upward)} import(s) against the layers" + "".join(f"\n  {a} -> {b}" for a, b in upward))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
