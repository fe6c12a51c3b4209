"""The pqc package's front door (`pqfed.pqc`) and the handshake module's purity, read from the
code: what other packages use is public and loads lazily; the state machine owns no thread and
reads nothing from the host (STYLE.md: kopf's front door, h11's pure state machine)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pqfed.pqc as pqc

ROOT = Path(__file__).resolve().parents[2]
OTHER_PACKAGES = ("services", "operator", "testbed", "src/pqfed")


def test_every_public_name_resolves_to_its_home_module() -> None:
    assert sorted(pqc.__all__) == sorted(set(pqc.__all__))
    for name in pqc.__all__:
        value = getattr(pqc, name)
        home = getattr(value, "__module__", None)
        assert home is None or home.startswith("pqfed.pqc."), (name, home)
    assert set(dir(pqc)) >= set(pqc.__all__)


def test_importing_the_package_loads_no_submodule() -> None:
    """Lazy: a process that needs one name (the sidecar, the CLI) pays for its module only."""
    code = ("import sys, pqfed.pqc; "
            "print(sorted(m for m in sys.modules if m.startswith('pqfed.pqc.')))")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True).stdout.strip()
    assert out == "[]"
    code = ("import sys; from pqfed.pqc import Role; "
            "print('pqfed.pqc.signing' in sys.modules, 'pqfed.pqc.audit' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True).stdout.strip()
    assert out == "False False"


def test_an_unknown_name_is_an_attribute_error() -> None:
    try:
        pqc.NoSuchThing  # type: ignore[attr-defined]
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def _imports(path: Path) -> list[tuple[str, str, int]]:
    """(module, name, line) of every `from pqfed.pqc... import name` in a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pqfed.pqc"):
            out.extend((node.module or "", a.name, node.lineno) for a in node.names)
    return out


def test_other_packages_take_exported_names_from_the_front_door() -> None:
    """A name the front door exports is imported from `pqfed.pqc`, and no underscore name of
    a pqc module is imported anywhere outside pqc/."""
    exported = set(pqc.__all__)
    offences = []
    for package in OTHER_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for module, name, line in _imports(path):
                where = f"{path.relative_to(ROOT)}:{line}"
                if name.startswith("_"):
                    offences.append(f"{where}: private {module}.{name}")
                elif name in exported and module != "pqfed.pqc":
                    offences.append(f"{where}: {name} from {module}, not pqfed.pqc")
    assert offences == []


def test_handshake_state_machine_owns_no_thread_and_reads_no_host_state() -> None:
    source = (ROOT / "pqc" / "handshake.py").read_text()
    tree = ast.parse(source)
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"threading", "concurrent.futures", "multiprocessing", "pathlib",
                           "asyncio", "socket", "pqfed.pqc.pool"}
    attrs = {(n.value.id, n.attr) for n in ast.walk(tree)
             if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
    assert not attrs & {("os", "environ"), ("os", "getenv"), ("os", "sched_getaffinity")}
    calls = {n.func.id for n in ast.walk(tree)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert "open" not in calls
    strings = [n.value for n in ast.walk(tree)
               if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    assert not [s for s in strings if s.startswith("/proc") or s.startswith("/sys")]
