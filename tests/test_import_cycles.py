"""The modules of devstream's three packages import each other without a circle: each module
can be read (and changed) knowing only the modules it imports.

Every import counts, those under ``if TYPE_CHECKING:`` and inside functions too: a circle
through a type annotation still ties the modules together for a reader and for mypy. (So the
hub's parts, ``control_channels``, ``initiation``, ``registry_api`` and ``requests``, name what
they use of the hub in a protocol of their own, and do not import ``hub``, which imports them.)
The modules are read with :mod:`ast`, not imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGES = ("devstream_core", "devstream_trio", "devstream_asyncio")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(name: str, path: Path, modules: set[str]) -> set[str]:
    """The modules of *modules* that module *name* (read from *path*) imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".")
                package = package[: len(package) - node.level + int(path.name == "__init__.py")]
                base = ".".join([*package, *([node.module] if node.module else [])])
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else base)
    return {module for module in found if module in modules and module != name}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for package in PACKAGES for p in (SRC / package).rglob("*.py")}
    return {name: imported(name, path, set(paths)) for name, path in paths.items()}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of *graph* (its modules in import order, the first repeated), or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        path.append(module)
        for target in sorted(graph[module]):
            circle = visit(target)
            if circle is not None:
                return circle
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        circle = visit(module)
        if circle is not None:
            return circle
    return None


def test_the_reading_sees_the_hubs_imports() -> None:
    graph = import_graph()
    assert {
        "devstream_trio.server.control_channels",
        "devstream_trio.server.initiation",
        "devstream_trio.server.registry_api",
        "devstream_trio.server.requests",
    } <= graph["devstream_trio.server.hub"]
    assert "devstream_trio.server.control_channels" in graph["devstream_trio.server.requests"]


def test_no_import_circle() -> None:
    assert find_circle(import_graph()) is None


def test_a_circle_is_found() -> None:
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]
    assert find_circle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
