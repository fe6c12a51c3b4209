"""STYLE.md habit 4: a module does one thing; past ~500 lines its docstring says why it is
still one thing (it names the ~500-line habit and gives the reason), so a long module is a
decision someone wrote down, not an accident. pqc/ has its own check."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREES = ("services", "operator", "testbed", "images", "src/pqfed")
LIMIT = 500


def long_modules_without_a_reason(files: dict[str, str]) -> list[str]:
    out = []
    for path, source in files.items():
        lines = source.count("\n")
        if lines > LIMIT and "~500" not in (ast.get_docstring(ast.parse(source)) or ""):
            out.append(f"{path}: {lines} lines, no reason in its docstring")
    return out


def test_every_long_module_says_why() -> None:
    files = {}
    for tree in TREES:
        for path in sorted((ROOT / tree).rglob("*.py")):
            if not any(p.is_symlink() for p in (path, *path.parents)):
                files[path.relative_to(ROOT).as_posix()] = path.read_text()
    assert "operator/reconcile.py" in files
    assert long_modules_without_a_reason(files) == []


def test_the_check_finds_a_long_module() -> None:
    body = "x = 1\n" * (LIMIT + 1)
    assert long_modules_without_a_reason({"a.py": '"""A module."""\n' + body}) == [
        f"a.py: {LIMIT + 2} lines, no reason in its docstring"]
    assert long_modules_without_a_reason(
        {"b.py": '"""A module, past our ~500-line habit because ..."""\n' + body}) == []
    assert long_modules_without_a_reason({"c.py": body[: 6 * LIMIT]}) == []
