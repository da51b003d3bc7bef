"""The package's import graph: no cycles (function-local imports included) and layers only import down.

The layers, lowest first (docs/design.md draws them):

    leaves    errors constants validate env token keys outcomes metrics crypto
    core      tokencache.core      (connections, record, locks, scripts, the refresh queue, sources)
    app       tokencache.app       (the sync app-side store and what its asyncio twin shares)
    aio | worker | adapters        (siblings: none imports another)
    testing   tokencache.testing
    cli       tokencache.cli
    root      tokencache, tokencache.__main__, the stable-path modules refresh and scheduling

Imports under ``if TYPE_CHECKING:`` are for annotations only and never run, so they do not count.
"""

from __future__ import annotations

import ast
import graphlib
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tokencache"

LEAVES = ("errors", "constants", "validate", "env", "token", "keys", "outcomes", "metrics", "crypto")
RANKS: dict[str, int] = {
    **{f"tokencache.{leaf}": 0 for leaf in LEAVES},
    "tokencache.core": 1,
    "tokencache.app": 2,
    "tokencache.aio": 3,
    "tokencache.worker": 3,
    "tokencache.adapters": 3,
    "tokencache.testing": 4,
    "tokencache.cli": 5,
}
ROOT_RANK = 6


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        names[name] = path
    return names


MODULES = module_names()


def layer_of(module: str) -> tuple[int, str]:
    """(rank, layer name) of a module: the longest layer prefix it falls under."""
    for prefix in sorted(RANKS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return RANKS[prefix], prefix
    return ROOT_RANK, "root"


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement at any depth, except those in ``if TYPE_CHECKING:`` bodies."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from _import_nodes(ast.Module(body=node.orelse, type_ignores=[]))  # the else runs
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        yield from _import_nodes(node)


def _resolve(module: str, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """The package modules an import statement loads (``from X import m`` loads X.m if m is a module)."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names if alias.name in MODULES)
        return
    base = node.module or ""
    if node.level:
        is_package = MODULES[module].name == "__init__.py"
        parent = module.split(".")[: len(module.split(".")) - node.level + is_package]
        base = ".".join([*parent, base] if base else parent)
    for alias in node.names:
        full = f"{base}.{alias.name}"
        if full in MODULES:
            yield full
        elif base in MODULES:
            yield base


def _named_modules(tree: ast.AST) -> Iterator[str]:
    """Submodules named by a whole string constant: what ``importlib.import_module`` or a lazy map loads.

    Only dotted names count: ``"tokencache"`` alone is also the command's and the namespace's name.
    """
    for node in ast.walk(tree):
        value = node.value if isinstance(node, ast.Constant) else None
        if isinstance(value, str) and "." in value and value in MODULES:
            yield value


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[module] = {target for node in _import_nodes(tree) for target in _resolve(module, node)}
        graph[module] |= set(_named_modules(tree))
        graph[module].discard(module)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (as the modules along it), or [] when it has none."""
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        return list(e.args[1])
    return []


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports that go up a layer, or across to a sibling layer."""
    bad = []
    for module, targets in sorted(graph.items()):
        rank, layer = layer_of(module)
        for target in sorted(targets):
            target_rank, target_layer = layer_of(target)
            if target_rank > rank or (target_rank == rank and target_layer != layer and rank > 0):
                bad.append(f"{module} ({layer}) imports {target} ({target_layer})")
    return bad


def test_the_graph_is_read_whole() -> None:
    graph = import_graph()
    assert len(graph) >= 40, "the walk found too few modules"
    assert "tokencache.worker.refresh" in graph["tokencache.refresh"]
    # a function-local import is seen (cli imports the worker pool only when it runs it)
    assert any(t.startswith("tokencache.worker") for t in graph["tokencache.cli.commands"])


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_layers_only_import_down() -> None:
    assert layer_violations(import_graph()) == []


def test_every_module_is_in_a_layer() -> None:
    roots = {"tokencache", "tokencache.__main__", "tokencache.refresh", "tokencache.scheduling"}
    unplaced = [m for m in MODULES if layer_of(m)[1] == "root" and m not in roots]
    assert unplaced == [], "place new top-level modules in a layer of this test and docs/design.md"


def test_the_checks_catch_what_they_guard() -> None:
    """A planted cycle and a planted upward import are reported (the checks can fail)."""
    graph = import_graph()
    graph["tokencache.keys"] = {*graph["tokencache.keys"], "tokencache.app.tokenstore"}
    assert cycles(graph), "a leaf importing the store closes a cycle"
    assert "tokencache.keys (tokencache.keys) imports tokencache.app.tokenstore (tokencache.app)" in (
        layer_violations(graph)
    )
    graph = import_graph()
    graph["tokencache.worker.pool"] = {*graph["tokencache.worker.pool"], "tokencache.aio"}
    assert any("imports tokencache.aio" in v for v in layer_violations(graph)), "siblings stay apart"


def test_no_public_name_shadows_a_submodule() -> None:
    """``tokencache.store`` the function once hid a subpackage of that name: imports of it then failed."""
    import tokencache

    public = set(tokencache.__all__)
    submodules = {name.split(".")[1] for name in MODULES if name.count(".") >= 1}
    assert public & submodules == set()


def test_else_of_type_checking_and_string_imports_count() -> None:
    tree = ast.parse(
        "if TYPE_CHECKING:\n    import tokencache.cli\nelse:\n    import tokencache.aio\n"
        "importlib.import_module('tokencache.worker')\n"
    )
    seen = {t for node in _import_nodes(tree) for t in _resolve("tokencache.keys", node)}
    assert seen == {"tokencache.aio"}
    assert set(_named_modules(tree)) == {"tokencache.worker"}
