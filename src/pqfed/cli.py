"""The `pqfed` command line. Each subpackage registers its own subcommands."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Subpackages whose `cli` module has register(subparsers); optional ones may be missing deps.
_COMMAND_MODULES = ("pqfed.selftest", "pqfed.pqc.cli", "pqfed.services.cli", "pqfed.operator.cli",
                    "pqfed.testbed.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pqfed", description="Post-quantum-secure federated learning for the IoMT")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
