"""The package's layering, read from its source with ast: every import statement of every module, at
module level and inside functions. No import cycle between modules, nor between packages; train/ and evaluate/
never import each other (spatialnet_dist.jobs, above both, wires them); tasks/ never names config/, not even for a
type checker; deepspeed in one module, Ray connected from one."""

from __future__ import annotations

import ast
from pathlib import Path

import spatialnet_dist

PACKAGE = Path(spatialnet_dist.__file__).parent
ROOT = PACKAGE.name


def _module_names() -> dict[str, Path]:
    """{"spatialnet_dist.train.trainer": path} for every module; a package by its __init__.py."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = (ROOT, *path.relative_to(PACKAGE).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


MODULES = _module_names()


def _known(name: str) -> str:
    """The module an imported name lives in: `pkg.module.attr` -> `pkg.module`."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _run_time_nodes(tree: ast.AST):
    """ast.walk, less the bodies of `if TYPE_CHECKING:`: an import only a type checker runs orders nothing at
    run time (tasks/base.py names the data types its methods take that way)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            todo += node.orelse
            continue
        yield node
        todo += ast.iter_child_nodes(node)


def imported_names(module: str, source: str, type_checking: bool = False) -> set[str]:
    """Every name an import statement in `source` brings in at run time, absolute (`from . import x`: the
    package's x); with `type_checking`, also those under `if TYPE_CHECKING:`."""
    package = module if MODULES.get(module, Path()).name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    tree = ast.parse(source)
    for node in ast.walk(tree) if type_checking else _run_time_nodes(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def _with_packages(module: str, importer: str) -> set[str]:
    """`module` and the packages Python initialises to import it (a.b.c -> {a.b.c, a.b}), less the root and
    the importer's own packages, which are initialised before the importer runs."""
    parts = module.split(".")
    packages = {".".join(parts[:i]) for i in range(2, len(parts))}
    return {module} | {p for p in packages if not importer.startswith(p + ".")} & MODULES.keys()


def import_graph() -> dict[str, set[str]]:
    """{module: the package's modules it imports}, with the package inits those imports run (an init that
    re-exports is an edge to what it re-exports), self-imports of a package's own names left out."""
    graph = {}
    for module, path in MODULES.items():
        inside = {_known(n) for n in imported_names(module, path.read_text()) if n.split(".")[0] == ROOT}
        graph[module] = set().union(*(_with_packages(n, module) for n in inside)) - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_walk_sees_function_local_imports_and_finds_cycles():
    graph = import_graph()
    assert "spatialnet_dist.engine" in graph["spatialnet_dist.checkpoint"]  # imported inside a function
    assert "spatialnet_dist.checkpoint_weights" in graph["spatialnet_dist.evaluate.run"]  # likewise
    assert "spatialnet_dist.store" in graph["spatialnet_dist.evaluate.run"]  # the package init storage's import runs
    assert imported_names("spatialnet_dist.evaluate.run", "from . import report\nfrom ..store import storage") \
        == {"spatialnet_dist.evaluate.report", "spatialnet_dist.store.storage"}
    assert imported_names("spatialnet_dist.x", "if TYPE_CHECKING:\n    import spatialnet_dist.config\nelse:\n"
                          "    import spatialnet_dist.text") == {"spatialnet_dist.text"}
    assert imported_names("spatialnet_dist.x", "if TYPE_CHECKING:\n    from spatialnet_dist import config",
                          type_checking=True) == {"spatialnet_dist.config"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_train_and_evaluate_never_import_each_other():
    graph = import_graph()
    crossing = [f"{m} imports {t}" for m, targets in graph.items() for t in sorted(targets)
                for a, b in (("train", "evaluate"), ("evaluate", "train"))
                if m.startswith(f"{ROOT}.{a}") and t.startswith(f"{ROOT}.{b}")]
    assert not crossing, "; ".join(crossing)


def test_no_import_cycle_between_packages():
    """Packages (data/, model/, tasks/, ...) and top-level modules, each one node: imports point one way. So the
    task modules stand on networks/, batch_format.py, symmetry.py and metrics/, and what iterates the tasks
    (data loading, model/, evaluate/) stands on them; no package imports one that imports it back."""
    packages: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        packages.setdefault(_top(module), set()).update(_top(t) for t in targets if _top(t) != _top(module))
    found = cycles(packages)
    assert not found, "package import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_tasks_never_name_config_not_even_for_a_type_checker():
    """config stands on the task registry (schema.py makes the tasks.<task> sections from it), so a task module
    importing config, even under `if TYPE_CHECKING:`, is a cycle a type checker follows. The sections a task reads
    are in task_sections.py, below both."""
    naming = [f"{m} imports {n}" for m, path in MODULES.items() if _top(m) == "tasks"
              for n in sorted(imported_names(m, path.read_text(), type_checking=True))
              if n.split(".")[0] == ROOT and _top(_known(n)) == "config"]
    assert not naming, "; ".join(naming)


def _top(module: str) -> str:
    """spatialnet_dist.data.streams -> data; spatialnet_dist.config -> config."""
    return module.split(".")[1] if "." in module else module


def test_deepspeed_in_one_module_and_ray_connected_from_one():
    importers, connectors = [], []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        if any(n.split(".")[0] == "deepspeed" for n in imported_names(module, path.read_text())):
            importers.append(module)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "ray.init":
                connectors.append(module)
    assert importers == ["spatialnet_dist.engine"]
    assert set(connectors) == {"spatialnet_dist.ray_cluster"}
