"""The package's import graph, drawn from the source (every ``import arjax...``, at module level or inside a
function): no cycles between modules, and a CLI module imports only ``cli.common`` and the library."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = {"model": "arjax.model", "decode": "arjax.decode", "train": "arjax.train"}


def modules() -> dict[str, pathlib.Path]:
    found = {}
    for folder, name in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            dotted = ".".join((name, *parts[:-1])) if parts[-1] == "__init__" else ".".join((name, *parts))
            found[dotted] = path
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node but those under ``if TYPE_CHECKING:`` (annotations only: never imported at run time)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                todo.extend(child.orelse)
            else:
                todo.append(child)


def import_graph() -> dict[str, set[str]]:
    """module -> the arjax modules it imports at run time (``from arjax.x import y`` counts as x.y when y
    is a module)."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        edges = set()
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("arjax"):
                names = {f"{node.module}.{a.name}" for a in node.names}
                sub = names & mods.keys()
                edges |= sub if sub else {node.module}
        graph[mod] = {e for e in edges if e in mods and e != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_drawn_from_every_module():
    graph = import_graph()
    assert {"arjax.decode.step", "arjax.train.cli.common", "arjax.model.transformer"} <= graph.keys()
    assert "arjax.decode.sampling" in graph["arjax.decode.step"]  # edges are read, not assumed


def test_no_import_cycles():
    # A package's __init__ re-exports its modules, so package -> module edges are expected; a module that
    # imports its own package back would close a loop through it, and that is what this catches.
    assert cycles(import_graph()) == []


def test_a_cli_module_imports_only_common_and_the_library():
    graph = import_graph()
    for mod, edges in graph.items():
        if mod.startswith("arjax.train.cli.") and mod != "arjax.train.cli.__main__":
            bad = sorted(e for e in edges if e.startswith("arjax.train.cli") and e != "arjax.train.cli.common")
            assert not bad, (
                f"{mod} imports {bad}; a CLI module parses and calls the library (shared flags: cli/common.py)"
            )


def test_decode_and_model_do_not_import_train():
    for mod, edges in import_graph().items():
        if mod.startswith(("arjax.decode", "arjax.model")):
            assert not [e for e in edges if e.startswith("arjax.train")], mod


def test_no_script_shadows_a_standard_module():
    """A script folder is the first entry of sys.path when one of its scripts runs, so bench/profile.py
    once hid the standard `profile` module (cProfile, then torch and transformers, failed to import)."""
    import sys

    clashes = [
        str(p.relative_to(ROOT))
        for folder in ("bench", "tests")
        for p in (ROOT / folder).glob("*.py")
        if p.stem in sys.stdlib_module_names
    ]
    assert not clashes, f"rename {clashes}: each hides the standard module of that name"
