"""The package's shape: no import circles inside snat_sync, and the product never
imports its test bench (snat_sync.lab) when it is loaded.

Read from the source with ast. At module level nothing may go round in a circle
or reach the lab; counting the imports inside functions too, still no circle,
and the one product import of the lab is cli's demo subcommand's (`snat-sync
demo` runs the bench's demo).
"""

import ast
import pathlib

import snat_sync

PACKAGE_DIRECTORY = pathlib.Path(snat_sync.__file__).resolve().parent
LAB = "snat_sync.lab"
# The thin edges (netlink, /proc, processes, files, sockets) and what they may
# import: each other and the shared vocabulary, never a decision module.
EDGES = {f"snat_sync.{name}" for name in (
    "namespace", "conntrackd", "guard", "statedir", "watcher", "reports", "nftables",
    "refresh", "connection_table", "tcp_tracking", "announce",
    "neighbour_advertisement", "table_transfer", "mapping_sync")}
VOCABULARY = {f"snat_sync.{name}" for name in ("errors", "roles", "router")}
# The wire formats an edge speaks, parsed and built purely: the protocol half of
# an edge (pyroute2's split), importing nothing of ours beyond the vocabulary.
PROTOCOLS = {"snat_sync.ctnetlink"}


def module_name(path):
    parts = ("snat_sync", *path.relative_to(PACKAGE_DIRECTORY).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules():
    """{module name: parsed source} of every module under snat_sync/."""
    return {module_name(path): ast.parse(path.read_text(), str(path))
            for path in sorted(PACKAGE_DIRECTORY.rglob("*.py"))}


# The one product module allowed to import the lab, inside a function only.
LAZY_LAB_IMPORTS = {("snat_sync.cli", "snat_sync.lab.demo")}


def module_level_imports(name, tree, known, everywhere=False):
    """The snat_sync modules the module imports when it is loaded.

    Statements at module level, also inside if/try blocks there, but not inside
    functions or classes (everywhere: those too). `from snat_sync import x` names module x if there is
    one, else the package; `from . import x` is resolved the same way.
    """
    package = name if name in known and _is_package(name, known) else \
        name.rpartition(".")[0]
    imported = set()
    statements = ast.walk(tree) if everywhere else _module_level(tree.body)
    for statement in statements:
        if isinstance(statement, ast.Import):
            targets = [alias.name for alias in statement.names]
        elif isinstance(statement, ast.ImportFrom):
            base = statement.module or ""
            if statement.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (statement.level - 1)]
                base = ".".join([*anchor, *filter(None, [base])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known
                       else base for alias in statement.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                imported.add(target)
    return imported


def _is_package(name, known):
    return any(other.startswith(name + ".") for other in known)


def _module_level(statements):
    for statement in statements:
        yield statement
        if isinstance(statement, (ast.If, ast.Try, ast.With)):
            for block in ("body", "orelse", "finalbody"):
                yield from _module_level(getattr(statement, block, []))
            for handler in getattr(statement, "handlers", []):
                yield from _module_level(handler.body)


def import_graph(everywhere=False):
    modules = package_modules()
    return {name: module_level_imports(name, tree, modules, everywhere)
            for name, tree in modules.items()}


def find_cycle(graph):
    """One import circle as [a, b, ..., a], or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target, path)
                if cycle:
                    return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [])
            if cycle:
                return cycle
    return None


def is_lab(name):
    return name == LAB or name.startswith(LAB + ".")


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert "snat_sync.daemon" in graph and "snat_sync.lab.demo" in graph
    assert "snat_sync.reconcile" in graph["snat_sync.daemon"]
    assert "snat_sync.lab.topology" in graph["snat_sync.lab.demo"]


def test_no_import_circle_inside_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_edges_import_no_decision_module():
    graph = import_graph(everywhere=True)
    offenders = sorted(f"{edge} imports {target}" for edge in EDGES
                       for target in graph[edge] - EDGES - VOCABULARY - PROTOCOLS)
    assert offenders == [], "; ".join(offenders)


def test_protocols_import_only_the_vocabulary():
    graph = import_graph(everywhere=True)
    offenders = sorted(f"{protocol} imports {target}" for protocol in PROTOCOLS
                       for target in graph[protocol] - VOCABULARY)
    assert offenders == [], "; ".join(offenders)


def test_no_product_module_imports_the_lab():
    offenders = sorted(f"{name} imports {target}"
                       for name, targets in import_graph().items()
                       if not is_lab(name)
                       for target in targets if is_lab(target))
    assert offenders == [], "the product imports its test bench: " + "; ".join(offenders)


def test_no_import_circle_even_through_imports_inside_functions():
    cycle = find_cycle(import_graph(everywhere=True))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_only_the_demo_subcommand_imports_the_lab_inside_a_function():
    imports = {(name, target)
               for name, targets in import_graph(everywhere=True).items()
               if not is_lab(name)
               for target in targets if is_lab(target)}
    assert imports == LAZY_LAB_IMPORTS


def test_find_cycle_reports_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
