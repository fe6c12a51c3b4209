"""The records pqfed's Flower apps exchange, and typed access to them.

One home for the message schema shared by the client mods (services/mods.py), the ClientApp
(services/clientapp.py), the ServerApp's `VerifiedStrategy` (services/serverapp.py), the edge
(services/edge.py) and SecAgg+ (services/secagg.py): record keys, node-config keys and
accessors that turn a record of the wrong type into a TypeError, which the aggregator treats
like any other bad update (rejected and audited, never trusted).
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from pqfed.services.spec import FederationJobSpec, parse_spec

# -- message records
UPDATE_KEY = "pqfed-update"  # ConfigRecord carrying the signed manifest of an update
# In that record: "signed" (pqc.signing.SignedUpdate, a pqfed-format identity) or SITE_SIGNED
# (X509SignedUpdate, an external node's site-held X.509 key).
SITE_SIGNED = "signed-x509"
BLOB_KEY = "blob"  # the one array of an encoded update or a compressed broadcast
BROADCAST_KEY = "pqfed-broadcast"  # ConfigRecord marking a compressed model broadcast
MODEL_SIG_KEY = "pqfed-model-sig"  # ConfigRecord: the central aggregator's SignedModel

# -- node state (context.state)
MODEL_SEEN_KEY = "pqfed-model-seen"  # (epoch, round, version) last trained from
RESIDUAL_KEY = "residual"  # error-feedback residual of the update encoder
PUBLIC_KEY = "public"  # the public model of compressed broadcasts
PUBLIC_META_KEY = "public-meta"  # its (epoch, version)

# -- node config
EDGE_SOCKET_KEY = "edge-socket"  # an edge's upstream SuperNode: its edge ServerApp's socket
# A client behind an edge: the node id of the central aggregator whose model signature it
# requires (set from the node's own job file, never from the edge's run config).
MODEL_SIGNER_KEY = "model-signer"
AGGREGATOR_NODE_ID = "aggregator"  # the central aggregator's certificate node id

Weights = list[np.ndarray[Any, Any]]


def job_spec(context: Context) -> FederationJobSpec:
    """The job spec of the run (run_config `spec`, JSON), parsed once per distinct text."""
    return spec_from_json(str(context.run_config["spec"]))


@functools.lru_cache(maxsize=4)
def spec_from_json(text: str) -> FederationJobSpec:
    return parse_spec(json.loads(text), "run_config.spec")


def array_record(content: RecordDict, key: str) -> ArrayRecord:
    rec = content[key]
    if not isinstance(rec, ArrayRecord):
        raise TypeError(f"{key!r} is not an ArrayRecord")
    return rec


def config_record(content: RecordDict, key: str) -> ConfigRecord:
    rec = content[key]
    if not isinstance(rec, ConfigRecord):
        raise TypeError(f"{key!r} is not a ConfigRecord")
    return rec


def metric_record(content: RecordDict, key: str = "metrics") -> MetricRecord:
    rec = content[key]
    if not isinstance(rec, MetricRecord):
        raise TypeError(f"{key!r} is not a MetricRecord")
    return rec


def number(value: object) -> float:
    """A record value that must be a number (bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{value!r} is not a number")
    return float(value)


def round_of(msg: Message) -> int:
    """The global round an instruction belongs to (its config record's `round`)."""
    return int(number(config_record(msg.content, "config")["round"]))


def float_arrays(record: ArrayRecord) -> Weights:
    """The record's arrays as float32 numpy arrays, in order."""
    return [np.asarray(a, dtype=np.float32) for a in record.to_numpy_ndarrays()]


def blob_of(content: RecordDict) -> bytes:
    """The bytes of the single `blob` array of an encoded update or a broadcast."""
    return array_record(content, "arrays")[BLOB_KEY].numpy().tobytes()


def arrays_digest_bytes(record: ArrayRecord) -> bytes:
    """Canonical bytes of an ArrayRecord (names, dtypes, shapes, data in order)."""
    h = hashlib.sha3_256()
    for name, arr in record.items():
        h.update(json.dumps([name, arr.dtype, list(arr.shape), arr.stype]).encode())
        h.update(arr.data)
    return h.digest()
