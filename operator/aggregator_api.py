"""Client of the aggregator's status API (`pqfed fl aggregator --status-port`, fl_node.py):
GET /status (the RoundRecorder's status.json) and GET /checkpoint (the last round's weights).

The checkpoint is the global model, so the API listens on the aggregator pod's loopback only
and the operator reaches it the way every peer reaches the aggregator: over a pqfed1 channel
to the aggregator's sidecar (hybrid ML-KEM + X25519, mutual ML-DSA, docs/protocol.md) with
its own certificate of role `operator`, issued by the job's federation CA. The sidecar routes
an operator's channel to the status API and lets only `GET /status` and `GET /checkpoint`
through (pqc/sidecar/config.py OPERATOR_PATHS); the operator pins the peer to the node id
`aggregator` of the same CA. HTTP/1.1 framing on the channel is h11's.

In a job whose `channel.protocol` is tls13 the aggregator's sidecar speaks TLS 1.3 only, so
the operator does too (`pqfed.pqc.tls13`: X25519MLKEM768, its X.509 ML-DSA-65 certificate of
role `operator` from the job's X.509 CA, the same pin on `aggregator`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import h11

from pqfed.pqc import (
    ChannelClosed,
    Group,
    HandshakeConfig,
    Identity,
    PqcError,
    Role,
    SecureChannel,
    TrustAnchor,
    connect,
    default_suites,
)
from pqfed.pqc.pki import Usage, X509TrustAnchor
from pqfed.pqc.pki.profile import load_certificate_pem, load_private_key_pem
from pqfed.pqc.tls13 import TlsChannel, TlsConfig, TlsContext, tls_connect

TIMEOUT_S: Final = 5.0
# A Secret holds at most 1 MiB; leave room for status.json and the object's metadata.
MAX_CHECKPOINT_BYTES: Final = 900 * 1024
# Never buffer more than this of a response, whatever the peer announces.
MAX_RESPONSE_BYTES: Final = 8 * 1024 * 1024


class AggregatorUnreachable(Exception):
    """The status API did not answer (pod starting, restarting or gone, channel refused)."""


@dataclass(frozen=True)
class Checkpoint:
    round: int
    data: bytes
    status: dict[str, Any]


@dataclass(frozen=True)
class AggregatorEndpoint:
    """Where and as whom the operator reads one job's aggregator."""

    host: str  # the aggregator pod's IP
    port: int  # its sidecar's PQC port
    identity: Identity  # the operator's identity in this job's federation
    trust: TrustAnchor  # the job's federation CA
    peer_node_id: str = "aggregator"
    groups: tuple[Group, ...] = (Group.X25519_MLKEM768,)
    # tls13 jobs: the operator's TLS 1.3 client context (`operator_tls_context`); the channel
    # is then TLS 1.3 and `identity`/`trust` serve nothing.
    tls: TlsContext | None = None

    def handshake_config(self) -> HandshakeConfig:
        return HandshakeConfig(self.identity, self.trust, suites=default_suites(),
                               groups=self.groups,
                               peer_roles=(Role.AGGREGATOR,), peer_node_id=self.peer_node_id,
                               timeout_s=TIMEOUT_S)


def operator_tls_context(cert_pem: str, key_pem: str, ca_pem: str) -> TlsContext:
    """The operator's TLS 1.3 client side for a tls13 job: its X.509 identity (role
    `operator`), the job's X.509 CA as the only trust anchor, the peer pinned to the node id
    `aggregator` (role aggregator, server usage)."""
    config = TlsConfig(load_certificate_pem(cert_pem, "cert"),
                       load_private_key_pem(key_pem.encode(), "key"),
                       X509TrustAnchor(load_certificate_pem(ca_pem, "ca")),
                       peer_roles=(Role.AGGREGATOR,), peer_node_id="aggregator",
                       timeout_s=TIMEOUT_S)
    return TlsContext(config, Usage.CLIENT)


@dataclass(frozen=True)
class _Response:
    status: int
    headers: dict[str, str]
    body: bytes


async def _read_response(channel: SecureChannel | TlsChannel,
                         conn: h11.Connection) -> _Response:
    status, headers, body = 0, {}, bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            try:
                conn.receive_data(await channel.recv())
            except ChannelClosed:
                conn.receive_data(b"")
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
            headers = {k.decode().lower(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_RESPONSE_BYTES:
                raise AggregatorUnreachable(f"response over {MAX_RESPONSE_BYTES} bytes")
        elif isinstance(event, h11.EndOfMessage):
            return _Response(status, headers, bytes(body))
        elif isinstance(event, h11.ConnectionClosed):
            raise AggregatorUnreachable("the channel closed before the response ended")


async def _get_all(endpoint: AggregatorEndpoint, paths: Sequence[str]) -> list[_Response]:
    """GETs `paths` one after the other on one channel (HTTP/1.1 keep-alive)."""
    channel: SecureChannel | TlsChannel
    if endpoint.tls is not None:
        channel = await tls_connect(endpoint.host, endpoint.port, endpoint.tls)
    else:
        channel = await connect(endpoint.host, endpoint.port, endpoint.handshake_config())
    try:
        conn = h11.Connection(h11.CLIENT)
        out = []
        for i, path in enumerate(paths):
            last = i == len(paths) - 1
            headers = [("Host", endpoint.peer_node_id),
                       ("Connection", "close" if last else "keep-alive")]
            request = conn.send(h11.Request(method="GET", target=path, headers=headers))
            await channel.send((request or b"") + (conn.send(h11.EndOfMessage()) or b""))
            out.append(await _read_response(channel, conn))
            if not last:
                conn.start_next_cycle()
        return out
    finally:
        await channel.close()


def _get(endpoint: AggregatorEndpoint, *paths: str) -> list[_Response]:
    try:
        return asyncio.run(asyncio.wait_for(_get_all(endpoint, paths), TIMEOUT_S * 2))
    except (PqcError, OSError, TimeoutError, h11.ProtocolError) as exc:
        raise AggregatorUnreachable(
            f"{endpoint.host}:{endpoint.port}: {type(exc).__name__}: {exc}") from None


def _status_json(resp: _Response, job: str, where: str) -> dict[str, Any]:
    if resp.status != 200:
        raise AggregatorUnreachable(f"/status answered {resp.status}")
    try:
        data = json.loads(resp.body)
    except ValueError as exc:
        raise AggregatorUnreachable(f"/status is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("job", job) != job:
        raise AggregatorUnreachable(f"{where} does not serve job {job}")
    return data


def fetch_status(endpoint: AggregatorEndpoint, job: str) -> dict[str, Any]:
    """The aggregator's status.json. Refuses another job's (a reused pod IP)."""
    (resp,) = _get(endpoint, "/status")
    return _status_json(resp, job, endpoint.host)


def fetch_checkpoint(endpoint: AggregatorEndpoint, job: str) -> Checkpoint | None:
    """The last completed round's checkpoint with the status that describes it, or None if
    a round completed between the two requests (try again on the next tick)."""
    status_resp, ckpt_resp = _get(endpoint, "/status", "/checkpoint")
    status = _status_json(status_resp, job, endpoint.host)
    if ckpt_resp.status != 200:
        return None
    try:
        round_ = int(ckpt_resp.headers.get("x-pqfed-round", "0"))
    except ValueError:
        return None
    if round_ != int(status.get("currentRound") or 0) or round_ < 1:
        return None
    return Checkpoint(round_, ckpt_resp.body, status)
