"""Each shared constant has one home: its literal appears in no other production module.

A value that several packages must agree on (the CRD's group, version, kind and plural, label
and annotation keys, the FL node's in-pod ports and paths, the status file, the cache
directory, where a kubeconfig is looked for) is defined once, in the lowest package that uses
it (pqc <- services <- operator/testbed), and imported everywhere else. This test reads every
production module's syntax tree (string and integer literals outside docstrings, and
attribute names) and fails when a known constant's literal reappears outside its home, so a
copy cannot drift from the original. Tests may spell values out: they are the independent
check that the constants are right.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The production trees (src/pqfed's own files; its package folders are links to these).
TREES = ("pqc", "services", "operator", "testbed", "images", "src/pqfed")


@dataclass(frozen=True)
class Known:
    """A constant: its literal, the one module allowed to spell it, and how to match it.

    `match` is "exact" (a string literal equal to it), "part" (a string literal, or a piece
    of an f-string, containing it: label keys inside selectors), "int" (an integer literal)
    or "attr" (an attribute name: a call that must be made in one place only)."""

    literal: str | int
    home: str
    match: str = "exact"
    composed: bool = False  # the home builds it from other constants (an f-string)


KNOWN = (
    # The FederationJob custom resource.
    Known("pqfed.io", "services/spec.py"),
    Known("v1alpha1", "services/spec.py"),
    Known("FederationJob", "services/spec.py"),
    Known("federationjobs", "services/spec.py"),
    Known("pqfed.io/v1alpha1", "services/spec.py", "part", composed=True),
    # Labels and annotations on the objects pqfed creates.
    Known("pqfed.io/job", "services/labels.py", "part"),
    Known("pqfed.io/role", "services/labels.py", "part"),
    Known("pqfed.io/index", "services/labels.py", "part"),
    Known("pqfed.io/node", "services/labels.py", "part"),
    Known("pqfed.io/round", "services/labels.py", "part"),
    Known("pqfed.io/testbed", "services/labels.py", "part"),
    Known("pqfed.io/log-dir", "services/labels.py", "part"),
    Known("pqfed.io/net-shaping", "services/labels.py", "part"),
    Known("pqfed.io/cancel", "operator/reconcile.py", "part"),
    Known("pqfed.io/cleanup", "operator/handlers.py", "part"),
    # One FL node's in-pod paths and ports (the `pqfed fl` defaults, the operator's pods).
    Known("status.json", "services/node_defaults.py"),
    Known("/var/lib/pqfed", "services/node_defaults.py"),
    Known("/etc/pqfed/identity", "services/node_defaults.py"),
    Known(9092, "services/node_defaults.py", "int"),
    Known(19092, "services/node_defaults.py", "int"),
    Known(9094, "services/node_defaults.py", "int"),
    Known("/v1/fleet/", "services/node_defaults.py"),
    # The sidecar's admin and probe ports; the backend's environment variable.
    Known(9901, "pqc/sidecar/config.py", "int"),
    Known(9902, "pqc/sidecar/config.py", "int"),
    Known("PQFED_CRYPTO_BACKEND", "pqc/backends/__init__.py"),
    # Where the CRL sits in an identity directory.
    Known("crl.pem", "pqc/truststore.py"),
    # The cache directory, and the kubeconfig precedence of the operator and the CLI.
    Known("PQFED_CACHE", "src/pqfed/cache.py"),
    Known("load_incluster_config", "operator/kube.py", "attr"),
)


@dataclass(frozen=True)
class Literal:
    path: str
    line: int
    value: str | int
    kind: str  # "str" | "int" | "attr"


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring constants of the module, its classes and functions."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                found.add(id(body[0].value))
    return found


def literals(source: str, path: str) -> Iterator[Literal]:
    tree = ast.parse(source, path)
    skip = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and id(node) not in skip:
            if isinstance(node.value, str):
                yield Literal(path, node.lineno, node.value, "str")
            elif isinstance(node.value, int) and not isinstance(node.value, bool):
                yield Literal(path, node.lineno, node.value, "int")
        elif isinstance(node, ast.Attribute):
            yield Literal(path, node.lineno, node.attr, "attr")


def _production_files() -> Iterator[Path]:
    for tree in TREES:
        base = ROOT / tree
        for path in sorted(base.rglob("*.py")):
            if path.is_symlink() or any(p.is_symlink() for p in path.relative_to(ROOT).parents
                                        if p != Path(".") and (ROOT / p).is_symlink()):
                continue
            yield path


def hits(known: Known, lit: Literal) -> bool:
    if known.match == "int":
        return lit.kind == "int" and lit.value == known.literal
    if known.match == "attr":
        return lit.kind == "attr" and lit.value == known.literal
    if lit.kind != "str":
        return False
    assert isinstance(lit.value, str) and isinstance(known.literal, str)
    return lit.value == known.literal if known.match == "exact" else known.literal in lit.value


def strays(files: dict[str, str]) -> list[str]:
    """`path:line: literal (home: ...)` for every known literal outside its home."""
    out = []
    for path, source in files.items():
        for lit in literals(source, path):
            for known in KNOWN:
                if path != known.home and hits(known, lit):
                    out.append(f"{path}:{lit.line}: {known.literal!r} (import it from "
                               f"{known.home})")
    return out


@pytest.fixture(scope="module")
def production() -> dict[str, str]:
    files = {p.relative_to(ROOT).as_posix(): p.read_text() for p in _production_files()}
    assert "services/spec.py" in files and "operator/pods.py" in files
    assert not any(p.startswith("src/pqfed/services/") for p in files)  # links, not copies
    return files


def test_every_known_constant_is_defined_in_its_home(production: dict[str, str]) -> None:
    for known in (k for k in KNOWN if not k.composed):
        found = [lit for lit in literals(production[known.home], known.home)
                 if hits(known, lit)]
        assert found, f"{known.literal!r} is not in {known.home}: update KNOWN"


def test_no_known_constant_is_spelled_outside_its_home(production: dict[str, str]) -> None:
    assert strays(production) == []


@pytest.mark.parametrize(("source", "expected"), [
    ('PLURAL = "federationjobs"\n', "'federationjobs'"),
    ('sel = f"{job},pqfed.io/role=aggregator"\n', "'pqfed.io/role'"),
    ("p.add_argument('--fleet-port', type=int, default=9092)\n", "9092"),
    ("config.load_incluster_config()\n", "'load_incluster_config'"),
])
def test_the_check_finds_a_copy(source: str, expected: str) -> None:
    found = strays({"operator/copy.py": source})
    assert len(found) == 1 and f": {expected} (import it from" in found[0], found


def test_docstrings_and_other_values_are_not_copies() -> None:
    source = ('"""Writes status.json; see pqfed.io/role."""\n'
              'def f() -> None:\n    """federationjobs"""\n'
              'PORT = 8080\nKEY = "pqfed.io/bench-role"\nNAME = "status.json.tmp"\n')
    assert strays({"operator/copy.py": source}) == []
