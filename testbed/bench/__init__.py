"""``pqfed bench``: the testbed benchmark (per-node PQC costs, node->aggregator handshakes and
channel throughput, a real federation round, and the seed-004 sequential / parallel /
distributed crypto experiment), on local processes or on a Kubernetes cluster.

Modules: ``common`` (stats, host info, the control protocol, key material), ``node`` and
``aggregator`` (what runs on every node / the aggregator), ``local`` and ``cluster`` (the two
launchers), ``report`` (results.json, results.csv, report.md, plots), ``main`` (CLI).
"""

SCHEMA = "pqfed.bench.testbed/1"
