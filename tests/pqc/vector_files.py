"""A generic loader for the known-answer vector files under tests/pqc/vectors/ (pyca's style:
`[section]` headers, `key = value` lines, records separated by blank lines, `#` comments)."""

from __future__ import annotations

from pathlib import Path

VECTORS = Path(__file__).parent / "vectors"


def load_vectors(relative: str) -> list[dict[str, str]]:
    """Every record of one file; each record also carries its `section` (the parameter set)."""
    records: list[dict[str, str]] = []
    section = ""
    current: dict[str, str] = {}
    for raw in (VECTORS / relative).read_text().splitlines():
        line = raw.strip()
        if line.startswith("#"):
            continue
        if not line:
            if current:
                records.append(current)
                current = {}
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ValueError(f"{relative}: malformed line {raw!r} (want 'key = value')")
        current.setdefault("section", section)
        current[key] = value
    if current:
        records.append(current)
    return records
