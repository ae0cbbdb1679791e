"""The shape of src/pecd, read from its source (pure AST, nothing imported or run).

(a) No import cycle among pecd's modules. Every ``import``/``from … import`` counts, wherever it
    is (inside functions, under ``if TYPE_CHECKING:``): a cycle is a cycle. Relative imports are
    resolved; ``from pecd.x import y`` is an edge to ``pecd.x.y`` when that is a module, else to
    ``pecd.x``; a package's ``__init__`` is a module (``pecd.x``).
(b) No private name crosses modules: ``from pecd.a import _x``, or ``pecd.a._x`` / ``a._x`` after
    ``import pecd.a`` / ``from pecd import a``, in any module but ``pecd.a`` itself. Dunders
    (``__version__``) are public.
(c) ``pecd.engine`` (the PEC rules, sans-I/O) reaches, through itself and every pecd module it
    imports transitively, none of the I/O libraries in :data:`ENGINE_FORBIDDEN`, and none of
    those modules calls the builtin ``open`` (``io`` is allowed for ``BytesIO``; ``io.open`` is not).

Known violations of (a) and (b) that live in the runtime modules being split into ``engine/`` are
listed in :data:`ALLOWED_CYCLES` and :data:`ALLOWED_PRIVATE_IMPORTS`, exactly: an entry that no
longer matches fails too, so each list shrinks to empty as the work lands.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
ROOT = "pecd"

#: The runtime modules whose PEC rules are moving into engine/ (issue 11); the only ones the
#: allowlists below may name.
RUNTIME_IN_TRANSITION = frozenset(
    f"pecd.runtime.{m}" for m in ("pipeline", "reception", "relay", "timers", "formats", "workers")
)

#: Import cycles (as the set of modules of each strongly connected component) allowed for now
#: in the runtime modules above; an entry must match a cycle that exists. Empty: the one there was
#: at 5a4589b (pipeline <-> relay) is gone with runtime/pipeline.py.
ALLOWED_CYCLES: frozenset[frozenset[str]] = frozenset()

#: (importing module, defining module, private name) allowed for now in the runtime modules
#: above; an entry must match an import that exists. Empty: those at 5a4589b (reception's and
#: relay's and timers' ``pipeline._event``, reception's ``pipeline._store_job``) are gone.
ALLOWED_PRIVATE_IMPORTS: frozenset[tuple[str, str, str]] = frozenset()

ENGINE = "pecd.engine"
ENGINE_FORBIDDEN = frozenset(
    {
        "asyncio",
        "socket",
        "ssl",
        "selectors",
        "sqlalchemy",
        "alembic",
        "subprocess",
        "multiprocessing",
        "threading",
        "concurrent",
        "os",
        "shutil",
        "tempfile",
        "pathlib",
        "aiosmtpd",
        "aiosmtplib",
        "pymap",
        "dns",
        "asyncpg",
        "aiosqlite",
    }
)


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    tree: ast.Module
    imports: set[str] = field(default_factory=set)  # pecd modules (edges of the graph)
    external: set[str] = field(default_factory=set)  # top-level names of everything else
    private: set[tuple[str, str, int]] = field(default_factory=set)  # (module, name, line)
    opens: list[int] = field(default_factory=list)  # lines calling open() / io.open()


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _dotted(node: ast.expr) -> list[str] | None:
    """``a.b.c`` -> ["a", "b", "c"]; None for anything but a chain of names."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return parts[::-1]


@cache
def modules() -> dict[str, Module]:
    found: dict[str, Module] = {}
    for path in sorted((SRC / ROOT).rglob("*.py")):
        name, is_package = _module_name(path)
        tree = ast.parse(path.read_text("utf-8"), str(path))
        found[name] = Module(name, path, is_package, tree)
    for mod in found.values():
        _analyse(mod, found)
    return found


def _analyse(mod: Module, known: dict[str, Module]) -> None:
    package = mod.name if mod.is_package else mod.name.rpartition(".")[0]

    def target(dotted: str) -> str | None:
        """The pecd module ``dotted`` names, or its nearest enclosing pecd module."""
        while dotted:
            if dotted in known:
                return dotted
            dotted = dotted.rpartition(".")[0]
        return None

    # Local names bound to pecd modules, for (b)'s attribute accesses.
    aliases: dict[str, str] = {}
    for node in ast.walk(mod.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == ROOT or alias.name.startswith(ROOT + "."):
                    t = target(alias.name)
                    if t is not None:
                        mod.imports.add(t)
                    if alias.asname:
                        aliases[alias.asname] = alias.name
                    else:
                        aliases[ROOT] = ROOT
                else:
                    mod.external.add(alias.name.partition(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not (source == ROOT or source.startswith(ROOT + ".")):
                mod.external.add(source.partition(".")[0])
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in known:  # a submodule
                    mod.imports.add(sub)
                    aliases[alias.asname or alias.name] = sub
                    continue
                t = target(source)
                if t is not None:
                    mod.imports.add(t)
                    if _private(alias.name) and t != mod.name:
                        mod.private.add((t, alias.name, node.lineno))
        elif isinstance(node, ast.Call):
            func = node.func
            if (isinstance(func, ast.Name) and func.id == "open") or (
                _dotted(func) == ["io", "open"]
            ):
                mod.opens.append(node.lineno)
    mod.imports.discard(mod.name)
    for node in ast.walk(mod.tree):
        if not isinstance(node, ast.Attribute) or not _private(node.attr):
            continue
        chain = _dotted(node.value)
        if chain is None or chain[0] not in aliases:
            continue
        dotted = ".".join([aliases[chain[0]], *chain[1:]])
        if dotted in known and dotted != mod.name:
            mod.private.add((dotted, node.attr, node.lineno))


# --- (a) cycles -----------------------------------------------------------------------------------


def _components(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with a cycle (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[set[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp: set[str] = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        comp.add(member)
                        if member == node:
                            break
                    if len(comp) > 1 or node in graph[node]:
                        out.append(comp)
    return out


def _one_cycle(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A concrete cycle through the component, to print: shortest path back to its first node."""
    first = min(comp)
    paths = {first: [first]}
    queue = [first]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node] & comp):
            if nxt == first:
                return [*paths[node], first]
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                queue.append(nxt)
    return [first]  # pragma: no cover - a component always has a cycle


def _graph() -> dict[str, set[str]]:
    return {name: set(m.imports) for name, m in modules().items()}


def test_no_import_cycle() -> None:
    graph = _graph()
    found = {frozenset(c): _one_cycle(graph, c) for c in _components(graph)}
    new = {c: cycle for c, cycle in found.items() if c not in ALLOWED_CYCLES}
    gone = ALLOWED_CYCLES - found.keys()
    assert not new, "import cycles:\n" + "\n".join(" -> ".join(c) for c in new.values())
    assert not gone, (
        f"cycles no longer there, remove them from ALLOWED_CYCLES: {sorted(map(sorted, gone))}"
    )


def test_allowed_cycles_are_only_in_the_runtime_in_transition() -> None:
    for cycle in ALLOWED_CYCLES:
        assert cycle <= RUNTIME_IN_TRANSITION, sorted(cycle)


# --- (b) private names ----------------------------------------------------------------------------


def test_no_private_name_imported_across_modules() -> None:
    found = {
        (m.name, source, name): line for m in modules().values() for source, name, line in m.private
    }
    new = sorted(
        f"{m}:{line} uses {s}.{n}"
        for (m, s, n), line in found.items()
        if (m, s, n) not in ALLOWED_PRIVATE_IMPORTS
    )
    gone = ALLOWED_PRIVATE_IMPORTS - found.keys()
    assert not new, "private names used across modules:\n" + "\n".join(new)
    assert not gone, f"no longer there, remove from ALLOWED_PRIVATE_IMPORTS: {sorted(gone)}"


def test_allowed_private_imports_are_only_in_the_runtime_in_transition() -> None:
    for importer, _source, _name in ALLOWED_PRIVATE_IMPORTS:
        assert importer in RUNTIME_IN_TRANSITION, importer


# --- (c) the engine is sans-I/O -------------------------------------------------------------------


def _engine_closure() -> dict[str, list[str]]:
    """Every pecd module the engine reaches -> the import path that reaches it."""
    mods = modules()
    starts = sorted(n for n in mods if n == ENGINE or n.startswith(ENGINE + "."))
    paths = {n: [n] for n in starts}
    queue = list(starts)
    while queue:
        node = queue.pop(0)
        for nxt in sorted(mods[node].imports):
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                queue.append(nxt)
    return paths


def test_engine_exists() -> None:
    assert ENGINE in modules()


def test_engine_reaches_no_io_library() -> None:
    mods = modules()
    bad = sorted(
        f"{' -> '.join(path)} imports {lib}"
        for name, path in _engine_closure().items()
        for lib in sorted(mods[name].external & ENGINE_FORBIDDEN)
    )
    assert not bad, "engine/ must stay sans-I/O:\n" + "\n".join(bad)


def test_engine_opens_no_file() -> None:
    mods = modules()
    bad = sorted(
        f"{' -> '.join(path)} calls open() at line {line}"
        for name, path in _engine_closure().items()
        for line in mods[name].opens
    )
    assert not bad, "engine/ must stay sans-I/O:\n" + "\n".join(bad)


# --- the checker itself ---------------------------------------------------------------------------


def test_the_checker_sees_what_it_should(tmp_path: Path) -> None:
    """The analysis on a small made-up package: relative, nested and TYPE_CHECKING imports,
    submodule imports, private names by import and by attribute."""
    pkg = {
        "pecd/__init__.py": "",
        "pecd/a.py": "from pecd import b\n_x = 1\n",
        "pecd/b.py": "import typing\nif typing.TYPE_CHECKING:\n    from . import c\n",
        "pecd/c.py": "def f():\n    from .a import _x\n    import pecd.a\n    return pecd.a._y\n",
        "pecd/d.py": "from pecd import a as aa\nimport os\naa._z\naa.__doc__\nopen('f')\n",
    }
    for rel, text in pkg.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text, "utf-8")
    found: dict[str, Module] = {}
    for path in sorted((tmp_path / "pecd").rglob("*.py")):
        parts = list(path.relative_to(tmp_path).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        found[name] = Module(name, path, is_package, ast.parse(path.read_text("utf-8")))
    for m in found.values():
        _analyse(m, found)
    graph = {n: m.imports for n, m in found.items()}
    assert graph["pecd.a"] == {"pecd.b"} and graph["pecd.b"] == {"pecd.c"}
    assert graph["pecd.c"] == {"pecd.a"}
    assert [sorted(c) for c in _components(graph)] == [["pecd.a", "pecd.b", "pecd.c"]]
    assert _one_cycle(graph, {"pecd.a", "pecd.b", "pecd.c"}) == [
        "pecd.a",
        "pecd.b",
        "pecd.c",
        "pecd.a",
    ]
    assert {(s, n) for s, n, _ in found["pecd.c"].private} == {("pecd.a", "_x"), ("pecd.a", "_y")}
    assert {(s, n) for s, n, _ in found["pecd.d"].private} == {("pecd.a", "_z")}
    assert found["pecd.d"].external == {"os"} and found["pecd.d"].opens == [5]
