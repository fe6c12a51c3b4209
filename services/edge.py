"""Hierarchical edge aggregation (as in the seeds' IoMT hierarchy: clients -> edge -> cloud).

An edge aggregator is two Flower roles in one process set (`pqfed fl edge`):

* downstream, an aggregator for its member clients: its own SuperLink, behind its own PQC
  sidecar, running the long-lived *edge ServerApp* of this module;
* upstream, a client of the central aggregator: a SuperNode (through the same sidecar's route
  to the central sidecar) whose ClientApp, on a train message, hands the global model to the
  edge ServerApp over a unix socket, waits for the pre-aggregated model and replies with it.

The global model goes down unchanged: the edge forwards the central aggregator's model
signature (pqc.signing.sign_model) with the exact weights it received, densely, and its
clients verify that signature against the pinned central aggregator before training, so an
edge can neither alter the model its clients train from nor replay an older one. (The edge
therefore does not re-compress the broadcast to its clients: a lossy re-encoding would no
longer match the signed digest.)

The upstream reply then goes through the normal client mods (services/mods.py): it is
compressed (with the edge's own error feedback) and ML-DSA-signed by the edge's identity
(Role.EDGE). The central aggregator accepts only edge-signed updates in hierarchical mode and
an edge accepts only client-signed ones, so no client can bypass its edge and no edge can pose
as a client.

Per edge round the edge verifies every client update (signature, certificate against the CA and
the newest revocation list in force, job, round), audits rejects in
its own signed log, aggregates with the job's Flower strategy (robust strategies therefore see
individual client updates at the edge; at most one update per client certificate and round),
and records the round in its own status.json. The central aggregator runs FedAvg over the
edges weighted by the examples each edge aggregated, as signed in the edge's manifest.

Socket protocol (loopback-only unix socket, one request per connection): a frame is a u32
big-endian header length, a JSON header, a u32 payload length and the payload (an .npz of the
weights, loaded with allow_pickle=False). A round request's header carries the round, the
train config, the timeout and `modelSignature` (hex of the central SignedModel).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import socket
import struct
import time
import zlib
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from pqfed.pqc import AuditLog, Role, TrustAnchor, TrustStore
from pqfed.services.identity_dir import identity_source, load_identity, trust_store
from pqfed.services.records import (
    EDGE_SOCKET_KEY,
    MODEL_SIG_KEY,
    array_record,
    config_record,
    float_arrays,
    job_spec,
    round_of,
)
from pqfed.services.rounds import RoundRecorder
from pqfed.services.serverapp import VerifiedStrategy
from pqfed.services.spec import FederationJobSpec
from pqfed.services.strategies import build_strategy

log = logging.getLogger("pqfed.edge")

MAX_HEADER = 64 * 1024
MAX_PAYLOAD = 512 * 1024 * 1024
Weights = list[npt.NDArray[np.float32]]


class EdgeRunner(Protocol):
    """Runs one edge round: (round, global weights, train config, timeout, the central
    aggregator's model signature) -> (aggregated weights, metrics)."""

    def __call__(self, round_number: int, weights: list[npt.NDArray[Any]],
                 config: dict[str, Any], timeout: float, model_sig: bytes
                 ) -> tuple[Weights, dict[str, float]]: ...


class EdgeRoundError(RuntimeError):
    """An edge could not produce an aggregate for a round (no valid client update, timeout,
    or the edge ServerApp is unreachable)."""


def socket_path(state_dir: Path) -> Path:
    path = state_dir / "edge.sock"
    if len(str(path)) > 100:  # AF_UNIX path limit (108 bytes on Linux)
        path = Path("/tmp") / f"pqfed-{zlib.crc32(str(state_dir).encode())}-edge.sock"  # noqa: S108
    return path


# ---------------------------------------------------------------- framing ---------------

def pack_weights(weights: list[npt.NDArray[Any]]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, *weights)
    return buf.getvalue()


def unpack_weights(data: bytes) -> Weights:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return [np.asarray(z[f"arr_{i}"], dtype=np.float32) for i in range(len(z.files))]


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    chunks: list[bytes] = []
    left = size
    while left:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("edge socket closed mid-frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def send_frame(conn: socket.socket, header: dict[str, Any], payload: bytes = b"") -> None:
    head = json.dumps(header).encode()
    conn.sendall(struct.pack("!I", len(head)) + head + struct.pack("!I", len(payload)))
    conn.sendall(payload)


def recv_frame(conn: socket.socket) -> tuple[dict[str, Any], bytes]:
    (hlen,) = struct.unpack("!I", _recv_exact(conn, 4))
    if hlen > MAX_HEADER:
        raise ValueError(f"edge frame header of {hlen} bytes exceeds {MAX_HEADER}")
    header = json.loads(_recv_exact(conn, hlen))
    if not isinstance(header, dict):
        raise ValueError("edge frame header is not a JSON object")
    (plen,) = struct.unpack("!I", _recv_exact(conn, 4))
    if plen > MAX_PAYLOAD:
        raise ValueError(f"edge frame payload of {plen} bytes exceeds {MAX_PAYLOAD}")
    return header, _recv_exact(conn, plen)


# ---------------------------------------------------------------- upstream side ---------

def request_edge_round(path: Path, round_number: int, weights: list[npt.NDArray[Any]],
                       config: dict[str, Any], timeout: float, model_sig: bytes
                       ) -> tuple[Weights, dict[str, float]]:
    """Called by the edge's upstream ClientApp: runs one edge round, returns the edge's
    aggregated weights and its metrics (num-examples, clients, ...)."""
    deadline = time.monotonic() + timeout
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        while True:  # the edge ServerApp may still be starting
            try:
                conn.connect(str(path))
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise EdgeRoundError(f"edge ServerApp socket {path} unreachable: {exc}"
                                         ) from None
                time.sleep(0.05)
        conn.settimeout(max(1.0, deadline - time.monotonic()))
        send_frame(conn, {"round": round_number, "config": config,
                          "timeout": max(1.0, deadline - time.monotonic()),
                          "modelSignature": model_sig.hex()},
                   pack_weights(weights))
        header, payload = recv_frame(conn)
    except (OSError, ValueError) as exc:
        raise EdgeRoundError(f"edge round {round_number}: {exc}") from None
    finally:
        conn.close()
    if not header.get("ok"):
        raise EdgeRoundError(str(header.get("error", "edge round failed")))
    metrics = {str(k): float(v) for k, v in dict(header.get("metrics", {})).items()}
    return unpack_weights(payload), metrics


def edge_train(msg: Message, context: Context, run_round: EdgeRunner,
               received: float | None = None) -> Message:
    """An edge's upstream train handler: one edge round over the edge's own clients
    (`run_round(round, global weights, config, timeout, model_sig)`). The central
    aggregator's model signature (checked by mods.verify_model_mod) goes to the clients as is."""
    received = time.time() if received is None else received
    spec = job_spec(context)
    config = {k: v for k, v in config_record(msg.content, "config").items()
              if isinstance(v, int | float | str | bool)}
    sig = config_record(msg.content, MODEL_SIG_KEY)["signed"]
    if not isinstance(sig, bytes):
        raise TypeError("the model signature is not bytes")
    try:
        weights, edge_metrics = run_round(round_of(msg),
                                          float_arrays(array_record(msg.content, "arrays")),
                                          config, float(spec.timeouts.round_seconds), sig)
    except EdgeRoundError as exc:
        raise RuntimeError(str(exc)) from None  # Flower turns it into an error reply
    metrics = MetricRecord({**edge_metrics, "t-received": received, "t-replied": time.time()})
    return Message(RecordDict({"arrays": ArrayRecord(list(weights)), "metrics": metrics}),
                   reply_to=msg)


# ---------------------------------------------------------------- downstream side -------

edge_server_app = ServerApp()


class EdgeAggregator:
    """The downstream half of an edge: forwards the signed global model, verifies and
    aggregates its clients' signed updates with the job's Flower strategy; `run_round` is an
    `EdgeRunner`."""

    def __init__(self, grid: Grid, spec: FederationJobSpec, job: str, *,
                 trust: TrustAnchor | TrustStore, recorder: RoundRecorder,
                 audit: AuditLog | None) -> None:
        self.grid = grid
        self.recorder = recorder
        self.strategy = VerifiedStrategy(
            build_strategy(spec, level="edge"), trust=trust, job=job, recorder=recorder,
            audit=audit, round_offset=0, min_clients=1, roles=(Role.CLIENT,),
            downlink=None)  # dense and exact: the clients check the central signature

    def run_round(self, round_number: int, weights: list[npt.NDArray[Any]],
                  config: dict[str, Any], timeout: float, model_sig: bytes
                  ) -> tuple[Weights, dict[str, float]]:
        """Sends the global model, with the central aggregator's signature, to the member
        clients and aggregates their verified updates. Raises EdgeRoundError when nothing
        valid came back."""
        strategy = self.strategy
        strategy.offset = round_number - 1  # so the clients sign the central round number
        strategy.relay_model_sig = model_sig
        train_config = ConfigRecord({k: v for k, v in config.items()
                                     if isinstance(v, int | float | str | bool)})
        msgs = list(strategy.configure_train(1, ArrayRecord(list(weights)), train_config,
                                             self.grid))
        if not msgs:
            self.recorder.close_round(round_number)
            raise EdgeRoundError("no client of this edge is connected")
        replies = list(self.grid.send_and_receive(msgs, timeout=timeout))
        arrays, _ = strategy.aggregate_train(1, replies)
        rec = self.recorder.close_round(round_number)
        if arrays is None:
            raise EdgeRoundError("; ".join(rec.notes) or "no valid client update")
        metrics = {"num-examples": strategy.accepted_examples,
                   "clients": float(strategy.accepted_clients),
                   "rejected": float(rec.rejected_updates),
                   "train-seconds": rec.compute_seconds,
                   "edge-crypto-seconds": rec.crypto_seconds,
                   "edge-bytes-received": float(rec.bytes_received)}
        return [np.asarray(a, dtype=np.float32) for a in arrays.to_numpy_ndarrays()], metrics


def open_edge(grid: Grid, context: Context) -> tuple[EdgeAggregator, AuditLog]:
    """The edge ServerApp's aggregator for `context`: client updates checked against the CA
    and the newest revocation list of the identity directory (re-read mid-job), rejects
    audited in the edge's own log, which follows the edge's certificate renewals."""
    spec = job_spec(context)
    job = str(context.run_config["job"])
    state_dir = Path(str(context.run_config["state-dir"]))
    identity_dir = str(context.run_config["identity-dir"])
    ident, _ = load_identity(identity_dir)
    recorder = RoundRecorder(state_dir, job, spec)  # (creates state_dir)
    audit = AuditLog.resume(state_dir / "audit.jsonl", ident,
                            renewed=identity_source(identity_dir))
    audit.append("edge-started", job=job, edge=ident.certificate.node_id)
    aggregator = EdgeAggregator(grid, spec, job, trust=trust_store(identity_dir),
                                recorder=recorder, audit=audit)
    return aggregator, audit


@edge_server_app.main()
def edge_main(grid: Grid, context: Context) -> None:
    """Serves edge rounds over the unix socket until the edge's run is stopped."""
    spec = job_spec(context)
    aggregator, audit = open_edge(grid, context)
    path = Path(str(context.run_config[EDGE_SOCKET_KEY]))
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    path.chmod(0o600)
    srv.listen(8)
    log.info("edge %s serving rounds on %s", audit.identity.certificate.node_id, path)
    while True:
        conn, _ = srv.accept()
        with conn:
            try:
                header, payload = recv_frame(conn)
                weights, metrics = aggregator.run_round(
                    int(header["round"]), unpack_weights(payload),
                    dict(header.get("config", {})),
                    float(header.get("timeout", spec.timeouts.round_seconds)) * 0.9,
                    bytes.fromhex(str(header.get("modelSignature", ""))))
                send_frame(conn, {"ok": True, "metrics": metrics}, pack_weights(weights))
            except (EdgeRoundError, KeyError, TypeError, ValueError, OSError) as exc:
                log.warning("edge round failed: %s", exc)
                with contextlib.suppress(OSError):
                    send_frame(conn, {"ok": False, "error": str(exc)})
