"""How services/ modules may depend on each other, read from their source (every import
statement, including imports inside functions):

* no import cycle (STYLE.md habit 2), e.g. between the apps and the edge;
* no module imports another module's underscore names (`from x import _y`, `x._y`): what
  one module needs from another is public (records, identity loading: services/records.py,
  services/identity_dir.py);
* the production apps never reach the benchmark and test code (poisoning emulation, the
  in-process harnesses);
* each app module imports on its own, in a fresh interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.import_graph import Use, uses

SERVICES = Path(__file__).resolve().parents[2] / "services"
PACKAGE = "pqfed.services"
APP_MODULES = ("records", "identity_dir", "task", "mods", "clientapp", "serverapp", "edge",
               "secagg")
BENCHMARK_ONLY = ("poisoning", "testing", "simulation")


def _module_name(path: Path) -> str:
    rel = path.relative_to(SERVICES).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join([PACKAGE, *parts])


MODULES = {_module_name(p): p for p in sorted(SERVICES.rglob("*.py"))}


def _uses(module: str) -> Iterator[Use]:
    path = MODULES[module]
    return uses(module, path.read_text(), MODULES, path.name == "__init__.py")


def _graph() -> dict[str, set[str]]:
    return {m: {u.target for u in _uses(m) if u.target in MODULES and u.target != m}
            for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    return seen


def test_the_services_import_graph_has_no_cycle() -> None:
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_one() -> None:
    graph = _graph()
    graph[f"{PACKAGE}.serverapp"].add(f"{PACKAGE}.edge")  # edge imports serverapp
    assert [f"{PACKAGE}.edge", f"{PACKAGE}.serverapp"] in _cycles(graph)


def test_no_module_imports_another_modules_private_names() -> None:
    bad = [f"{MODULES[u.module].relative_to(SERVICES.parent)}:{u.line}: {u.target}.{u.name}"
           for m in MODULES for u in _uses(m)
           if u.name and u.name.startswith("_") and not u.name.startswith("__")
           and u.target != u.module]
    assert bad == []


def test_the_private_name_check_finds_both_forms(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    src = ("from pqfed.services.identity_dir import _load_identity\n"
           "from pqfed.services import records\nrecords._hidden\n")
    monkeypatch.setitem(MODULES, f"{PACKAGE}.probe", tmp_path / "probe.py")
    (tmp_path / "probe.py").write_text(src)
    found = {(u.target, u.name) for u in _uses(f"{PACKAGE}.probe")}
    assert (f"{PACKAGE}.identity_dir", "_load_identity") in found
    assert (f"{PACKAGE}.records", "_hidden") in found


@pytest.mark.parametrize("app", ["clientapp", "serverapp", "mods", "edge", "secagg"])
def test_production_apps_do_not_reach_benchmark_code(app: str) -> None:
    reached = _closure(_graph(), f"{PACKAGE}.{app}")
    assert reached.isdisjoint({f"{PACKAGE}.{m}" for m in BENCHMARK_ONLY})


@pytest.mark.parametrize("module", ["edge", "clientapp", "serverapp", "secagg", "testing"])
def test_each_module_imports_alone_in_a_fresh_interpreter(module: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run([sys.executable, "-c", f"import {PACKAGE}.{module}"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
