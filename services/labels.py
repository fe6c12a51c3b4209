"""Kubernetes label and annotation keys pqfed puts on the objects it creates: their one home.

The operator labels a job's pods, Services and Secrets (operator/pods.py), the emulated node
agent annotates the pods it runs (testbed/nodeagent), and the CLI, the testbed and the
benchmarks select and read by the same keys. All of them import the keys from here (layering:
services is below both the operator and the testbed).
"""

from __future__ import annotations

from typing import Final

# Labels the operator puts on every object of a job.
JOB_LABEL: Final = "pqfed.io/job"
ROLE_LABEL: Final = "pqfed.io/role"
INDEX_LABEL: Final = "pqfed.io/index"
NODE_LABEL: Final = "pqfed.io/node"
# The last round whose checkpoint the operator saved (on the checkpoint Secret).
ROUND_ANNOTATION: Final = "pqfed.io/round"
# Node label: which kind of testbed node runs the pods ("emulated" node agent or "real").
TESTBED_LABEL: Final = "pqfed.io/testbed"
# Pod annotations of the emulated node agent: where the containers' logs are on the host, and
# the network shaping (netem) the pod's sandbox got.
LOG_DIR_ANNOTATION: Final = "pqfed.io/log-dir"
NET_ANNOTATION: Final = "pqfed.io/net-shaping"
