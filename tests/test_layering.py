"""The layering of the package, checked on the source: the daemons never import each other.

A reader of the tree should see the architecture (STYLE.md "One home per
contract"): three daemons (``gateway``, ``processor``, ``api``) on top of the
shared floors (the client wire ``protocol``, the daemons' wire ``envelope``,
``store``, ``bus``, ``registry``, ``config``, ...). What two daemons share
moves down a floor; a daemon that imported another would drag that daemon's
dependencies (and its changes) into its own process. Every ``import`` counts,
including those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "imcluster"

#: the daemons: each may import itself and the floors below, never another daemon
DAEMONS = {"gateway", "processor", "api", "push"}

#: the floors, and what each may import (besides the standard library and third parties)
FLOORS: dict[str, set[str]] = {
    "protocol": set(),
    "interfaces": set(),
    "metrics": set(),
    "logs": set(),
    "config": set(),
    "service": set(),
    "envelope": {"protocol", "metrics"},
    "auth": {"interfaces", "protocol"},
    "db": {"metrics", "config"},
    "store": {"protocol", "interfaces", "db", "metrics", "store"},
    "bus": {"interfaces", "metrics", "service"},
    "registry": {"interfaces", "metrics", "envelope"},
    "presence": {"metrics", "envelope"},
    "web": {"service", "metrics"},
}

#: every daemon may use every floor
DAEMON_MAY_USE = set(FLOORS)


def _module_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every ``imcluster.*`` module that ``path`` imports, at any depth of the code."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    here = _module_of(path).split(".")
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "imcluster")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here if is_pkg else here[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "imcluster":
                continue
            if mod == "imcluster" or (node.level and not node.module):
                # "from imcluster import protocol, metrics", "from . import y": the names are modules
                found.update(f"{mod}.{a.name}" for a in node.names)
            else:
                found.add(mod)
    return found


def _unit(module: str) -> str | None:
    """The daemon or floor a module belongs to (``imcluster.store.postgres`` -> ``store``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        graph[_module_of(path)] = _imports(path)
    return graph


def test_daemons_never_import_each_other():
    """A daemon that imports another drags it into its process: imapi would start a gateway's code."""
    bad = []
    for module, deps in _graph().items():
        unit = _unit(module)
        if unit not in DAEMONS:
            continue
        for dep in deps:
            other = _unit(dep)
            if other in DAEMONS and other != unit:
                bad.append(f"{module} imports {dep}")
            elif other not in DAEMONS and other not in DAEMON_MAY_USE and other is not None:
                if other not in ("testing", "client", "cli", "static", "migrations"):
                    bad.append(f"{module} imports {dep}, which is no known floor")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("floor", sorted(FLOORS))
def test_floors_import_only_what_is_below_them(floor):
    """A shared floor that imports a daemon (or a floor above it) is no floor: its users would import that daemon."""
    allowed = FLOORS[floor] | {floor}
    bad = []
    for module, deps in _graph().items():
        if _unit(module) != floor:
            continue
        for dep in deps:
            other = _unit(dep)
            if other is not None and other not in allowed:
                bad.append(f"{module} imports {dep}")
    assert not bad, "\n".join(bad)


def test_every_floor_exists():
    """The table above names real modules (a renamed floor must be renamed here too)."""
    units = {_unit(m) for m in _graph()}
    assert set(FLOORS) <= units, set(FLOORS) - units


def test_the_check_sees_function_level_imports(tmp_path):
    """The rule would be empty if imports inside functions (as in twisted plugins' makeService) were missed."""
    src = tmp_path / "imcluster" / "api" / "x.py"
    src.parent.mkdir(parents=True)
    src.write_text("def f():\n    from imcluster.gateway.service import Publisher\n    from . import y\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "imcluster"
    try:
        assert _imports(src) == {"imcluster.gateway.service", "imcluster.api.y"}
    finally:
        PACKAGE = saved
