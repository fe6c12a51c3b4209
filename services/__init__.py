"""pqfed.services: the federated-learning workload (job spec, datasets, models, the Flower apps
and runtime, the local runner) and the names the operator, the testbed and the CLI share with it.

This module is the package's front door (as kopf's ``kopf/__init__.py`` is kopf's): code
outside services/ imports what it needs from here, never from a module behind it
(tests/test_layering.py checks that). Names load lazily, on first use, so ``import
pqfed.services`` costs nothing and the operator and sidecar images, which ship no torch and
no Flower, import only the modules behind the names they use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pqfed.services.commands import (
        SidecarRoute,
        aggregator_command,
        client_command,
        edge_command,
        sidecar_command,
    )
    from pqfed.services.fl_node import IDLE_BACKOFF
    from pqfed.services.flower.patches import install_fast_poll
    from pqfed.services.flower.polling import IdlePoller
    from pqfed.services.flower.processes import SuperLinkProcess
    from pqfed.services.flower.settings import FlowerTuning, IdleBackoff
    from pqfed.services.hierarchy import edge_members, edge_node_id, edge_of
    from pqfed.services.labels import (
        INDEX_LABEL,
        JOB_LABEL,
        LOG_DIR_ANNOTATION,
        NET_ANNOTATION,
        NODE_LABEL,
        ROLE_LABEL,
        ROUND_ANNOTATION,
        TESTBED_LABEL,
    )
    from pqfed.services.mods import client_mods
    from pqfed.services.node_defaults import (
        FLEET_PATH_PREFIX,
        FLEET_PORT,
        IDENTITY_DIR,
        ROUTE_PORT,
        RUNTIME_PORT,
        STATE_DIR,
        STATUS_FILE,
        STATUS_PORT,
        SUPERLINK_ROUTE,
    )
    from pqfed.services.ports import LOCALHOST, free_port, free_ports
    from pqfed.services.procs import ManagedProcess, terminate_process_tree
    from pqfed.services.records import BLOB_KEY, UPDATE_KEY, array_record, blob_of, float_arrays
    from pqfed.services.rounds import read_status
    from pqfed.services.runner import Interrupted, run_local
    from pqfed.services.spec import (
        API_GROUP,
        API_GROUP_VERSION,
        API_VERSION,
        KIND,
        NAME_MAX,
        NAME_PATTERN,
        OPERATOR_ONLY,
        PLURAL,
        RULES,
        FederationJobSpec,
        JobSpecError,
        SpecRule,
        check_runnable,
        load_job,
        load_spec,
        parse_spec,
    )

# Each public name and the module that defines it.
EXPORTS: dict[str, str] = {
    **dict.fromkeys(("API_GROUP", "API_VERSION", "API_GROUP_VERSION", "KIND", "PLURAL",
                     "NAME_MAX", "NAME_PATTERN", "RULES", "OPERATOR_ONLY", "SpecRule",
                     "FederationJobSpec", "JobSpecError", "parse_spec", "load_job",
                     "check_runnable", "load_spec"), "pqfed.services.spec"),
    **dict.fromkeys(("JOB_LABEL", "ROLE_LABEL", "INDEX_LABEL", "NODE_LABEL", "ROUND_ANNOTATION",
                     "TESTBED_LABEL", "LOG_DIR_ANNOTATION", "NET_ANNOTATION"),
                    "pqfed.services.labels"),
    **dict.fromkeys(("IDENTITY_DIR", "STATE_DIR", "STATUS_FILE", "STATUS_PORT", "FLEET_PORT",
                     "ROUTE_PORT", "RUNTIME_PORT", "SUPERLINK_ROUTE", "FLEET_PATH_PREFIX"),
                    "pqfed.services.node_defaults"),
    **dict.fromkeys(("edge_of", "edge_members", "edge_node_id"), "pqfed.services.hierarchy"),
    **dict.fromkeys(("LOCALHOST", "free_port", "free_ports"), "pqfed.services.ports"),
    **dict.fromkeys(("terminate_process_tree", "ManagedProcess"), "pqfed.services.procs"),
    "read_status": "pqfed.services.rounds",
    # for the capacity benchmark's emulated clients (testbed/bench/capacity_client.py)
    **dict.fromkeys(("BLOB_KEY", "UPDATE_KEY", "array_record", "blob_of", "float_arrays"),
                    "pqfed.services.records"),
    "client_mods": "pqfed.services.mods",
    "install_fast_poll": "pqfed.services.flower.patches",
    "IDLE_BACKOFF": "pqfed.services.fl_node",
    "IdlePoller": "pqfed.services.flower.polling",
    "IdleBackoff": "pqfed.services.flower.settings",
    # for `pqfed bench fleet-cost` (testbed/bench/fleet_cost.py): one SuperLink as pqfed runs it
    "FlowerTuning": "pqfed.services.flower.settings",
    "SuperLinkProcess": "pqfed.services.flower.processes",
    **dict.fromkeys(("run_local", "Interrupted"), "pqfed.services.runner"),
    **dict.fromkeys(("SidecarRoute", "sidecar_command", "aggregator_command", "edge_command",
                     "client_command"), "pqfed.services.commands"),
}

__all__ = [
    "API_GROUP",
    "API_GROUP_VERSION",
    "API_VERSION",
    "BLOB_KEY",
    "FLEET_PATH_PREFIX",
    "FLEET_PORT",
    "IDENTITY_DIR",
    "IDLE_BACKOFF",
    "INDEX_LABEL",
    "JOB_LABEL",
    "KIND",
    "LOCALHOST",
    "LOG_DIR_ANNOTATION",
    "NAME_MAX",
    "NAME_PATTERN",
    "NET_ANNOTATION",
    "NODE_LABEL",
    "OPERATOR_ONLY",
    "PLURAL",
    "ROLE_LABEL",
    "ROUND_ANNOTATION",
    "ROUTE_PORT",
    "RULES",
    "RUNTIME_PORT",
    "STATE_DIR",
    "STATUS_FILE",
    "STATUS_PORT",
    "SUPERLINK_ROUTE",
    "TESTBED_LABEL",
    "UPDATE_KEY",
    "FederationJobSpec",
    "FlowerTuning",
    "IdleBackoff",
    "IdlePoller",
    "Interrupted",
    "JobSpecError",
    "ManagedProcess",
    "SidecarRoute",
    "SpecRule",
    "SuperLinkProcess",
    "aggregator_command",
    "array_record",
    "blob_of",
    "check_runnable",
    "client_command",
    "client_mods",
    "edge_command",
    "edge_members",
    "edge_node_id",
    "edge_of",
    "float_arrays",
    "free_port",
    "free_ports",
    "install_fast_poll",
    "load_job",
    "load_spec",
    "parse_spec",
    "read_status",
    "run_local",
    "sidecar_command",
    "terminate_process_tree",
]


def __getattr__(name: str) -> object:
    """Load the module behind a public name on first use (PEP 562) and keep the name here."""
    module = EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
