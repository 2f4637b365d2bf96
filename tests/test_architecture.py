"""The layers of the code, read from its own imports (every ``import``, including those
inside functions and under TYPE_CHECKING), as docs/architecture.md draws them:

    commands    fedlora.simulate, deploy, plan, study, cli, comparison, processes
    server      server/
    strategies  strategies/      client  client/     (neither imports the other)
    core        fedlora: errors, seeds, config, codec, aggregate, privacy, data, models,
                train, evaluate, adapters, wire

A module imports only from its own layer and the layers below, and no import cycle
exists, between modules or within a layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedlora", "strategies", "server", "client")
CORE = {"errors", "seeds", "config", "codec", "aggregate", "privacy", "data", "prompts", "models",
        "train", "evaluate", "adapters", "wire", "memory", "secure_aggregation"}
COMMANDS = {"simulate", "deploy", "plan", "study", "cli", "comparison", "processes"}
RANK = {"core": 0, "strategies": 1, "client": 1, "server": 2, "commands": 3}


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the product packages, by dotted name (a package by its own name)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    return modules


def imports(source: str, modules: set[str], own: str) -> set[str]:
    """The project modules that ``source`` imports anywhere (``from a import b`` counts as
    importing ``a.b`` where that is a module, else ``a``)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != own:
                found.add(target)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {name: imports(path.read_text(), set(modules), name) for name, path in modules.items()}


def layer(module: str) -> str:
    """The layer of a project module; ValueError for a fedlora module placed in none."""
    package, _, rest = module.partition(".")
    if package != "fedlora":
        return package
    name = rest.split(".")[0]
    if name in CORE or not name:  # "fedlora" itself: the package's __init__
        return "core"
    if name in COMMANDS:
        return "commands"
    raise ValueError(f"fedlora.{name} is in no layer: add it to CORE or COMMANDS (and to "
                     "docs/architecture.md)")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Each import of a higher layer, or between strategies and client, as 'a -> b'."""
    wrong = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            low, high = layer(module), layer(target)
            if RANK[high] > RANK[low] or {low, high} == {"strategies", "client"}:
                wrong.append(f"{module} ({low}) -> {target} ({high})")
    return wrong


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in graph.get(module, ()):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_the_checks_find_a_cycle_and_an_upward_import():
    graph = {"fedlora.config": {"strategies"}, "strategies": {"fedlora.data"},
             "fedlora.data": {"fedlora.config"}, "fedlora.errors": set()}
    assert cycles(graph) == [["fedlora.config", "fedlora.data", "strategies"]]
    assert upward_imports(graph) == ["fedlora.config (core) -> strategies (strategies)"]
    assert upward_imports({"client.app": {"strategies.base"}, "strategies.base": set()}) == [
        "client.app (client) -> strategies.base (strategies)"]


def test_the_reader_sees_imports_inside_functions(tmp_path):
    source = "def f():\n    from fedlora.study import run\n    import server.run\n"
    modules = {"fedlora.study", "server.run", "server"}
    assert imports(source, modules, "fedlora.data") == {"fedlora.study", "server.run"}


def test_every_module_is_in_a_layer():
    for module in import_graph():
        layer(module)  # raises for a fedlora module in no layer


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_no_module_imports_a_layer_above_it():
    assert upward_imports(import_graph()) == []


@pytest.mark.parametrize("module", sorted(f"fedlora.{name}" for name in CORE))
def test_the_core_imports_only_the_core(module):
    graph = import_graph()
    assert {layer(target) for target in graph[module]} <= {"core"}, graph[module]
