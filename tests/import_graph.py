"""The project's imports as data, read from source (every import statement, including imports
inside functions), for the layering tests (tests/test_layering.py,
tests/services/test_layering.py)."""

from __future__ import annotations

import ast
from collections.abc import Container, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Use:
    """One import in `module`: the module it names, and the attribute taken from it."""

    module: str
    target: str
    name: str | None
    line: int


def resolve(module: str, base: str, level: int, is_pkg: bool) -> str:
    """The absolute module a (possibly relative) `from base import ...` in `module` names."""
    if level == 0:
        return base
    parts = module.split(".")
    anchor = parts if is_pkg else parts[:-1]
    anchor = anchor[: len(anchor) - (level - 1)]
    return ".".join([*anchor, base] if base else anchor)


def uses(module: str, source: str, modules: Container[str], is_pkg: bool = False,
         ours: tuple[str, ...] = ("pqfed",)) -> Iterator[Use]:
    """Every use of a project module in `source` (the text of `module`): imports, and the
    attributes taken from a module bound to a local name. `modules` are the known module
    names (`from pqfed.services import edge` binds a module, not a name); `ours` the
    prefixes of the project's modules."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}  # local name -> project module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith(ours):
                    aliases[a.asname or a.name] = a.name
                    yield Use(module, a.name, None, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = resolve(module, node.module or "", node.level, is_pkg)
            if not base.startswith(ours):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in modules:
                    aliases[a.asname or a.name] = sub
                    yield Use(module, sub, None, node.lineno)
                else:
                    yield Use(module, base, a.name, node.lineno)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases):
            yield Use(module, aliases[node.value.id], node.attr, node.lineno)
