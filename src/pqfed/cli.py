"""The `pqfed` command line. Each subpackage registers its own subcommands."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Subpackages whose `cli` module has register(subparsers); optional ones may be missing deps.
_COMMAND_MODULES = ("pqfed.selftest", "pqfed.pqc.cli", "pqfed.services.cli", "pqfed.operator.cli",
                    "pqfed.testbed.cli")
# Long-lived commands that run in every pod parse their arguments with only the module that
# registers them: building the whole parser imports numpy, pydantic and YAML (the job spec
# model) into the sidecar, ~12 MiB of PSS in each of them (docs/BENCHMARKS.md "Memory
# footprint"). `pqfed --help` and every other command still see the whole parser.
LEAN_COMMANDS = {"sidecar": "pqfed.pqc.cli", "fl": "pqfed.services.cli",
                 "operator": "pqfed.operator.cli"}


def command_modules(argv: Sequence[str]) -> tuple[str, ...]:
    """The modules whose subcommands the parser for `argv` needs."""
    if argv and argv[0] in LEAN_COMMANDS:
        return (LEAN_COMMANDS[argv[0]],)
    return _COMMAND_MODULES


def build_parser(modules: Sequence[str] = _COMMAND_MODULES) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pqfed", description="Post-quantum-secure federated learning for the IoMT")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(command_modules(argv)).parse_args(argv)
    from pqfed.pqc import PqcError

    try:
        return int(args.func(args))
    except PqcError as exc:
        print(f"pqfed: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"pqfed: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
