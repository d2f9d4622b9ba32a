"""The package's layers, read from its source with ``ast`` (nothing of goodnet is imported to
build the graph).

Two rules (issue 28):

- Scanners and input detectors stand below the repairs: no module of ``goodnet.scans`` or
  ``goodnet.detectors`` imports ``goodnet.defenses``, directly or through other modules. What
  they share with the defenses (the scan verdict, the reversed trigger, the clean-data checks,
  the :class:`~goodnet.methods.Method` contract) lives in :mod:`goodnet.methods`.
- No import circle among goodnet's modules.

The graph: one node per module under ``src/goodnet`` (a package is its ``__init__``). Every
``import`` statement counts, at the top of a module or inside a function, a class or an ``if``
(a deferred import is still a dependency: deferring it only hides a circle).
``import a.b`` and ``from a.b import c`` give an edge to ``a.b``, or to ``a.b.c`` where that is
a module. Importing ``a.b`` first runs package ``a``'s ``__init__``, which may re-export (and so
import) much more: the edge also goes to every package above the imported module that the
importing module is not itself inside (a module's own packages are already being imported when
it runs, so a submodule importing a sibling is no circle, while a submodule importing its own
package's ``__init__`` is).

Run this file as a script to print the circles of the tree as it is.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import ClassVar

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "goodnet"



def module_names(src: Path = SRC, package: str = PACKAGE) -> dict[str, Path]:
    """Every module's dotted name → its file."""
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported(module: str, path: Path, modules: dict[str, Path],
             package: str = PACKAGE) -> set[str]:
    """The names of the package's modules that ``module``'s import statements name (relative
    imports resolved; ``from a import b`` is ``a.b`` where that is a module)."""
    home = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = home.split(".")
                anchor = parts[:len(parts) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                name = f"{base}.{alias.name}"
                names.add(name if name in modules else base)
    return {name for name in names if name == package or name.startswith(package + ".")}


def import_graph(src: Path = SRC, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module → the package's modules that importing it runs first (see the module docstring)."""
    modules = module_names(src, package)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        edges = set()
        for target in imported(module, path, modules, package):
            while target not in modules:  # ``import goodnet.x.name``: the module is goodnet.x
                target = target.rpartition(".")[0]
            edges.add(target)
            parts = target.split(".")
            for depth in range(1, len(parts)):
                parent = ".".join(parts[:depth])
                if not (module == parent or module.startswith(parent + ".")):
                    edges.add(parent)
        edges.discard(module)
        graph[module] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle (``[a, b, ..., a]``) through each group of modules that reach one another."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_cycle_in(graph, group) for group in groups]


def _cycle_in(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest circle through the group's first module (breadth-first within the group)."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & group):
                if nxt == start:
                    return [*paths[node], start]
                if nxt not in paths:
                    paths[nxt] = [*paths[node], nxt]
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no circle through {start}")  # a strongly connected group has one


def path_to(graph: dict[str, set[str]], start: str, wanted: str) -> list[str] | None:
    """A shortest import chain from ``start`` to ``wanted`` or a module inside it; None if none."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node]):
                if nxt in paths:
                    continue
                paths[nxt] = [*paths[node], nxt]
                if nxt == wanted or nxt.startswith(wanted + "."):
                    return paths[nxt]
                following.append(nxt)
        frontier = following
    return None


def without(graph: dict[str, set[str]], edges: set[tuple[str, str]]) -> dict[str, set[str]]:
    return {node: {t for t in targets if (node, t) not in edges} for node, targets in graph.items()}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_scans_and_detectors_reach_nothing_of_the_defenses(graph):
    lower = [m for m in graph if m.split(".")[:2] in (["goodnet", "scans"],
                                                      ["goodnet", "detectors"])]
    assert "goodnet.scans.nc" in lower and "goodnet.detectors.teco" in lower
    chains = [" -> ".join(chain) for m in lower
              if (chain := path_to(graph, m, "goodnet.defenses")) is not None]
    assert not chains, "scanners and detectors must not import goodnet.defenses:\n" + \
        "\n".join(chains)


def test_the_method_layer_stands_below_the_three_families(graph):
    for family in ("goodnet.defenses", "goodnet.scans", "goodnet.detectors"):
        chain = path_to(graph, "goodnet.methods", family)
        assert chain is None, " -> ".join(chain or [])


def test_no_import_circle(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_old_names_are_the_method_layers():
    """``goodnet.defenses.base`` still offers what moved down, as the very same objects."""
    from goodnet import methods
    from goodnet.attacks import base as attacks_base
    from goodnet.defenses import base

    assert base.Trigger is methods.ReversedTrigger
    assert attacks_base.Trigger is not methods.ReversedTrigger  # an attack's: a function
    for name in ("ScanVerdict", "check_clean", "clean_or_blank", "Method"):
        assert getattr(base, name) is getattr(methods, name)


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_the_graph_counts_deferred_imports_and_package_inits(tmp_path):
    """By hand, on a made-up package: ``low.a`` imports a sibling (no circle), ``high``
    imports ``low.a`` (which runs ``low``'s ``__init__``), and ``low.b`` imports ``high``
    inside a function: the circle is low → low.b → high → low."""
    src = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low/__init__.py": "from pkg.low.a import A\nfrom pkg.low.b import B\n",
        "pkg/low/a.py": "from pkg.low import b\nA = 1\n",
        "pkg/low/b.py": "B = 2\n\ndef later():\n    from pkg.high import H\n    return H\n",
        "pkg/high.py": "from .low.a import A as H\n",
    })
    graph = import_graph(src, "pkg")
    assert graph == {"pkg": set(), "pkg.low": {"pkg.low.a", "pkg.low.b"},
                     "pkg.low.a": {"pkg.low.b"}, "pkg.low.b": {"pkg.high"},
                     "pkg.high": {"pkg.low.a", "pkg.low"}}
    assert find_cycles(graph) == [["pkg.high", "pkg.low", "pkg.low.b", "pkg.high"]]
    assert find_cycles(without(graph, {("pkg.low.b", "pkg.high")})) == []
    assert path_to(graph, "pkg.high", "pkg.low") == ["pkg.high", "pkg.low"]


if __name__ == "__main__":
    for cycle in find_cycles(import_graph()):
        print(" -> ".join(cycle))


def test_every_registry_spells_its_names_in_kebab_case():
    """One spelling for method names across the four registries (and the names a registry's
    class carries are its registry keys)."""
    import re

    from goodnet.attacks import ATTACKS
    from goodnet.defenses import DEFENSES
    from goodnet.detectors import DETECTORS
    from goodnet.scans import SCANNERS

    for registry in (ATTACKS, DEFENSES, SCANNERS, DETECTORS):
        for name, cls in registry.items():
            assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name), name
            assert cls.name == name


# Names the glossary (docs/settings.md) retired: each meant different things in different
# methods, or one idea had two names. A method may accept them only as old names (``renamed``).
RETIRED = {"alpha", "test_alpha", "holdout", "portion", "unlearning_lr", "unlearning_epochs",
           "recovering_lr", "recovering_epochs", "K", "n_rounds", "perturbation_lr"}


def test_every_setting_name_follows_the_glossary():
    """No method's settings use a retired name, and every old name a settings class still
    accepts maps to one of its settings."""
    import dataclasses

    from goodnet.attacks import ATTACKS
    from goodnet.defenses import DEFENSES
    from goodnet.detectors import DETECTORS
    from goodnet.scans import SCANNERS
    from goodnet.settings import renamed

    for registry in (ATTACKS, DEFENSES, SCANNERS, DETECTORS):
        for name, cls in registry.items():
            fields = {f.name for f in dataclasses.fields(cls.Config)}
            assert not fields & RETIRED, (name, fields & RETIRED)
            old = renamed(cls.Config)
            assert set(old.values()) <= fields and not set(old) & fields, (name, old)


def test_a_setting_added_later_changes_no_key_at_its_old_behaviour():
    """A setting a method gains later (``added``: name → the value that behaves as before) is
    left out of stored keys while it holds that value, and hashed once it differs."""
    import dataclasses

    from goodnet.settings import key_names

    @dataclasses.dataclass(frozen=True)
    class Before:
        lr: float = 0.1

    @dataclasses.dataclass(frozen=True)
    class After:
        added: ClassVar[dict[str, object]] = {"optimizer": "sgd"}
        lr: float = 0.1
        optimizer: str = "sgd"

    def key(config):
        return key_names(type(config), dataclasses.asdict(config))

    assert key(After()) == key(Before()) == {"lr": 0.1}
    assert key(After(optimizer="pam")) == {"lr": 0.1, "optimizer": "pam"}
