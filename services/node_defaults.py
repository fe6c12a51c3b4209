"""Where one FL node (`pqfed fl aggregator|client|edge`) listens and keeps its files by
default: the `pqfed fl` flags' defaults and what the operator's pods (operator/pods.py) mount
and wire together, in one place so the two cannot drift apart."""

from __future__ import annotations

from typing import Final

# In-pod paths.
IDENTITY_DIR: Final = "/etc/pqfed/identity"  # the node's certificate, key, CA and CRL
STATE_DIR: Final = "/var/lib/pqfed"  # status.json, checkpoints, the audit log
STATUS_FILE: Final = "status.json"  # in STATE_DIR, and beside a saved checkpoint

# In-pod loopback ports (peers reach a pod only through its sidecar).
STATUS_PORT: Final = 8080  # aggregator status API (/status, /checkpoint)
FLEET_PORT: Final = 9092  # SuperLink Fleet API, behind the aggregator's sidecar
ROUTE_PORT: Final = 19092  # a client sidecar's plaintext route to the aggregator
RUNTIME_PORT: Final = 9094  # a client SuperNode's ClientAppIo port
SUPERLINK_ROUTE: Final = f"127.0.0.1:{ROUTE_PORT}"
# What an aggregator's sidecar lets through to the SuperLink: the Fleet API only.
FLEET_PATH_PREFIX: Final = "/v1/fleet/"
