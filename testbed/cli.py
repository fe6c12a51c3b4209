"""``pqfed`` subcommands of the testbed: ``node-agent`` (an emulated Raspberry Pi node)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add the testbed subcommands to the ``pqfed`` argument parser."""
    from pqfed.testbed.nodeagent import main

    p: argparse.ArgumentParser = sub.add_parser(
        "node-agent",
        help="run an emulated Raspberry Pi node: register a Node, run its pods as processes",
        description=(
            "A process-based mini-kubelet for the testbed control plane "
            "(testbed/cluster/up.sh): registers a Raspberry Pi 4 Node, renews its Lease and "
            "runs the pods scheduled to it as local processes, each in its own network and "
            "mount namespace. See testbed/nodeagent/README.md."
        ),
    )
    main.add_arguments(p)
    p.set_defaults(func=main.run)
