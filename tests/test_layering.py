"""How pqfed's packages may depend on each other, read from every import statement of the
production code (imports inside functions included):

* dependencies point one way (STYLE.md habit 2): pqc <- services <- operator/testbed; pqc
  imports nothing else of the project, services neither the operator nor the testbed, the
  operator never the testbed (the testbed drives the operator, never the reverse);
* outside services/, services' API is reached through its front door: `from pqfed.services
  import NAME` with NAME in `pqfed.services.__all__`, never a module behind it;
* no module imports another module's underscore names (`from x import _y`, `x._y`), in
  services/, operator/, testbed/, images/ and src/pqfed (pqc/ has its own check);
* `import pqfed.services` costs nothing: the front door loads a module when a name from it is
  first used, so the operator and sidecar images (no torch, no Flower) import what they use.

services/ keeps its own finer rules (no cycles, the apps never reach benchmark code) in
tests/services/test_layering.py.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import pqfed.services
from tests.import_graph import Use, uses

ROOT = Path(__file__).resolve().parents[1]
# Package folder -> the module prefix it is imported as.
PACKAGES = {"pqc": "pqfed.pqc", "services": "pqfed.services", "operator": "pqfed.operator",
            "testbed": "pqfed.testbed", "src/pqfed": "pqfed", "images/imagebuild": "imagebuild",
            "images": ""}
PRIVATE_NAME_TREES = ("services", "operator", "testbed", "images", "src/pqfed")
# What each package may import of the project (besides itself and the top-level pqfed
# modules such as pqfed.cache).
MAY_IMPORT = {
    "pqfed.pqc": set(),
    "pqfed.services": {"pqfed.pqc"},
    "pqfed.operator": {"pqfed.pqc", "pqfed.services"},
    "pqfed.testbed": {"pqfed.pqc", "pqfed.services", "pqfed.operator"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    for folder, prefix in sorted(PACKAGES.items(), key=lambda kv: -len(kv[0])):
        if rel.is_relative_to(folder):
            parts = [p for p in rel.relative_to(folder).with_suffix("").parts if p != "__init__"]
            return ".".join(x for x in (prefix, *parts) if x)
    raise AssertionError(path)


def _production_files() -> Iterator[Path]:
    for folder in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if folder == "src/pqfed" and rel.parts[2] in {"pqc", "services", "operator",
                                                          "testbed"}:
                continue  # the links to the package folders
            if folder == "images" and rel.is_relative_to("images/imagebuild"):
                continue
            yield path


MODULES = {_module_name(p): p for p in _production_files()}


def _uses(module: str, source: str, is_pkg: bool = False) -> Iterator[Use]:
    return uses(module, source, MODULES, is_pkg, ours=("pqfed", "imagebuild"))


def _all_uses() -> Iterator[Use]:
    for module, path in MODULES.items():
        yield from _uses(module, path.read_text(), path.name == "__init__.py")


def _package(module: str) -> str:
    return next((p for p in MAY_IMPORT if module == p or module.startswith(p + ".")), "")


def _where(u: Use) -> str:
    return f"{MODULES[u.module].relative_to(ROOT)}:{u.line}"


def private_imports(found: Iterator[Use]) -> list[str]:
    return [f"{u.target}.{u.name}" for u in found
            if u.name and u.name.startswith("_") and not u.name.startswith("__")
            and u.target != u.module]


def test_dependencies_point_one_way() -> None:
    bad = [f"{_where(u)}: {u.module} imports {u.target}" for u in _all_uses()
           if _package(u.module) and _package(u.target)
           and _package(u.target) not in {_package(u.module), *MAY_IMPORT[_package(u.module)]}]
    assert bad == []


def test_no_module_imports_another_modules_private_names() -> None:
    bad = [f"{_where(u)}: {name}" for u in _all_uses()
           if MODULES[u.module].relative_to(ROOT).parts[0] in {"services", "operator",
                                                               "testbed", "images", "src"}
           for name in private_imports(iter([u]))]
    assert bad == []


def test_outside_services_only_the_front_door_is_used() -> None:
    exported = set(pqfed.services.__all__)
    bad = []
    for u in _all_uses():
        if _package(u.target) != "pqfed.services" or _package(u.module) == "pqfed.services":
            continue
        if u.target != "pqfed.services":
            bad.append(f"{_where(u)}: {u.target} (import it from pqfed.services)")
        elif u.name not in exported:
            bad.append(f"{_where(u)}: pqfed.services.{u.name} is not in its __all__")
    assert bad == []


def test_the_checks_find_what_they_look_for() -> None:
    source = ("from pqfed.services.records import _record\n"
              "from pqfed.pqc import identity\nidentity._load\n"
              "from pqfed.testbed import testing\n"
              "from pqfed.services.spec import PLURAL\n")
    found = list(_uses("pqfed.operator.probe", source))
    assert private_imports(iter(found)) == ["pqfed.services.records._record",
                                            "pqfed.pqc.identity._load"]
    assert {u.target for u in found} >= {"pqfed.testbed.testing", "pqfed.services.spec"}
    assert "pqfed.testbed" not in MAY_IMPORT["pqfed.operator"]


def test_every_export_resolves_to_its_module() -> None:
    for name in pqfed.services.__all__:
        value = getattr(pqfed.services, name)
        home = importlib.import_module(pqfed.services.EXPORTS[name])
        assert getattr(home, name) is value, name
    with pytest.raises(AttributeError, match="no_such_name"):
        pqfed.services.no_such_name


def test_importing_the_front_door_loads_nothing_behind_it(tmp_path: Path) -> None:
    code = ("import sys, pqfed.services\n"
            "print(sorted(m for m in sys.modules if m.startswith('pqfed.services.')"
            " or m.split('.')[0] in ('pydantic', 'flwr', 'torch', 'numpy')))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.strip() == "[]"
