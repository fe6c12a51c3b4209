"""The operator reads the aggregator's status and checkpoint (the global model) only through
the aggregator's PQC sidecar, with an operator identity: a real status API (fl_node), a real
sidecar and real pqfed1 channels. The status API itself listens on loopback only."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from pqfed.operator.aggregator_api import (
    AggregatorEndpoint,
    AggregatorUnreachable,
    fetch_checkpoint,
    fetch_status,
)
from pqfed.pqc.identity import CertificateAuthority, Identity, Role, TrustAnchor
from pqfed.pqc.sidecar import Endpoint, Route, Sidecar, SidecarConfig
from pqfed.services import fl_node

CHECKPOINT = b"PK\x03\x04 the global model " * 100


def _wait_listening(port: int, timeout: float = 20) -> None:
    """Until something accepts on 127.0.0.1:`port`; the last connection error after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Loop:
    """An event loop on a thread, for sidecars beside the operator's synchronous client."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)  # type: ignore[arg-type]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@dataclass
class Aggregator:
    sidecar: Sidecar
    status_port: int
    fleet_requests: list[bytes]
    state: Path

    @property
    def port(self) -> int:
        return self.sidecar.bound["listen"]


def _files(tmp: Path, name: str, ident: Identity, ca: CertificateAuthority) -> tuple[Path, ...]:
    ident.save(tmp / f"{name}.crt", tmp / f"{name}.key")
    (tmp / "ca.crt").write_text(ca.root.to_pem())
    return tmp / f"{name}.crt", tmp / f"{name}.key", tmp / "ca.crt"


@pytest.fixture(scope="module")
def loop() -> Iterator[_Loop]:
    lp = _Loop()
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def agg(tmp_path_factory: pytest.TempPathFactory, ca: CertificateAuthority,
        aggregator: Identity, loop: _Loop) -> Iterator[Aggregator]:
    tmp = tmp_path_factory.mktemp("agg")
    state = tmp / "state"
    (state / "checkpoints").mkdir(parents=True)
    (state / "status.json").write_text(json.dumps(
        {"job": "fed-a", "phase": "Running", "currentRound": 2, "rounds": []}))
    (state / "checkpoints" / "round-00002.npz").write_bytes(CHECKPOINT)
    status_port = _free_port()
    fl_node._serve_status(state, status_port)
    fleet_requests: list[bytes] = []

    async def fleet(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        fleet_requests.append(await r.read(65536))
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nfleet")
        await w.drain()
        w.close()

    async def start() -> tuple[Sidecar, asyncio.Server]:
        app = await asyncio.start_server(fleet, "127.0.0.1", 0)
        cert, key, ca_file = _files(tmp, "agg", aggregator, ca)
        sidecar = Sidecar(SidecarConfig(
            cert=cert, key=key, ca=ca_file, listen=Endpoint("127.0.0.1", 0),
            upstream=Endpoint("127.0.0.1", app.sockets[0].getsockname()[1]),
            allow_path_prefixes=("/v1/fleet/",),
            operator_upstream=Endpoint("127.0.0.1", status_port), admin=None))
        await sidecar.start()
        return sidecar, app

    sidecar, app = loop.run(start())  # type: ignore[misc]
    _wait_listening(status_port)  # the status API starts on its own thread
    yield Aggregator(sidecar, status_port, fleet_requests, state)
    loop.run(sidecar.stop())
    app.close()


def _endpoint(agg: Aggregator, ident: Identity, ca: CertificateAuthority) -> AggregatorEndpoint:
    return AggregatorEndpoint("127.0.0.1", agg.port, ident, TrustAnchor(ca.root))


@pytest.fixture(scope="module")
def operator_identity(ca: CertificateAuthority) -> Identity:
    return ca.new_identity("operator", Role.OPERATOR)


def test_operator_reads_status_and_checkpoint_through_the_sidecar(
        agg: Aggregator, ca: CertificateAuthority, operator_identity: Identity) -> None:
    ep = _endpoint(agg, operator_identity, ca)
    assert fetch_status(ep, "fed-a")["currentRound"] == 2
    ckpt = fetch_checkpoint(ep, "fed-a")
    assert ckpt is not None and ckpt.round == 2 and ckpt.data == CHECKPOINT
    assert agg.sidecar.metrics.registry.get_sample_value(
        "pqfed_channels_negotiated_total", {"version": "pqfed1", "group": "X25519_MLKEM768"})
    with pytest.raises(AggregatorUnreachable, match="does not serve job other"):
        fetch_status(ep, "other")
    assert not any(agg.fleet_requests)  # the operator never reaches the Fleet API


def test_a_round_without_its_checkpoint_is_fetched_later(
        tmp_path: Path, agg: Aggregator, ca: CertificateAuthority,
        operator_identity: Identity) -> None:
    state = agg.state
    saved = (state / "status.json").read_text()
    (state / "status.json").write_text(json.dumps({"job": "fed-a", "currentRound": 3}))
    try:  # round 3 is recorded, its checkpoint not written yet: try again next tick
        assert fetch_checkpoint(_endpoint(agg, operator_identity, ca), "fed-a") is None
    finally:
        (state / "status.json").write_text(saved)


def test_status_api_listens_on_loopback_only(agg: Aggregator) -> None:
    """Before, it listened on 0.0.0.0 and the aggregator's Service published it: anyone on the
    pod network downloaded the model in plain HTTP."""
    listening = [c for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == agg.status_port]
    assert listening
    assert {c.laddr.ip for c in listening} == {"127.0.0.1"}


def test_a_client_cannot_read_the_model(tmp_path: Path, agg: Aggregator,
                                        ca: CertificateAuthority, client: Identity,
                                        loop: _Loop) -> None:
    """An enrolled client's channel goes to the Fleet API under its allow-list: /checkpoint is
    refused by the sidecar and never reaches an upstream."""
    # Its own client: a pinned aggregator, but a client certificate.
    ep = AggregatorEndpoint("127.0.0.1", agg.port, client, TrustAnchor(ca.root))
    with pytest.raises(AggregatorUnreachable, match="403"):
        fetch_status(ep, "fed-a")
    # And through a real client sidecar, as a client pod would.
    cert, key, ca_file = _files(tmp_path, "cli", client, ca)
    side = Sidecar(SidecarConfig(cert=cert, key=key, ca=ca_file, admin=None, routes=(
        Route(Endpoint("127.0.0.1", 0), Endpoint("127.0.0.1", agg.port), "aggregator"),)))

    async def ask() -> bytes:
        await side.start()
        r, w = await asyncio.open_connection("127.0.0.1", side.bound["route0"])
        w.write(b"GET /checkpoint HTTP/1.1\r\nhost: a\r\n\r\n")
        await w.drain()
        data = await r.read()
        await side.stop()
        return data

    answer = loop.run(ask())
    assert isinstance(answer, bytes) and answer.startswith(b"HTTP/1.1 403"), answer
    assert CHECKPOINT[:20] not in answer
    assert not any(agg.fleet_requests)  # nothing reached the Fleet app


def test_operator_cannot_reach_the_fleet_api_or_write(
        agg: Aggregator, ca: CertificateAuthority, operator_identity: Identity) -> None:
    from pqfed.operator import aggregator_api

    ep = _endpoint(agg, operator_identity, ca)
    (resp,) = aggregator_api._get(ep, "/v1/fleet/pull-messages")
    assert resp.status == 403
    assert not any(agg.fleet_requests)  # nothing reached the Fleet app


def test_foreign_or_unpinned_identities_fail_closed(
        agg: Aggregator, ca: CertificateAuthority, other_ca: CertificateAuthority,
        operator_identity: Identity) -> None:
    stranger = other_ca.new_identity("operator", Role.OPERATOR)
    with pytest.raises(AggregatorUnreachable):
        fetch_status(AggregatorEndpoint("127.0.0.1", agg.port, stranger,
                                        TrustAnchor(other_ca.root)), "fed-a")
    # The operator pins the node id: another aggregator of the same CA is not the job's.
    with pytest.raises(AggregatorUnreachable):
        fetch_status(AggregatorEndpoint("127.0.0.1", agg.port, operator_identity,
                                        TrustAnchor(ca.root), peer_node_id="aggregator-2"),
                     "fed-a")


def test_sidecar_without_operator_upstream_refuses_operators(
        tmp_path: Path, ca: CertificateAuthority, aggregator: Identity,
        operator_identity: Identity, loop: _Loop) -> None:
    cert, key, ca_file = _files(tmp_path, "agg2", aggregator, ca)
    sidecar = Sidecar(SidecarConfig(cert=cert, key=key, ca=ca_file,
                                    listen=Endpoint("127.0.0.1", 0),
                                    upstream=Endpoint("127.0.0.1", _free_port()), admin=None))
    loop.run(sidecar.start())
    try:
        with pytest.raises(AggregatorUnreachable):
            fetch_status(AggregatorEndpoint("127.0.0.1", sidecar.bound["listen"],
                                            operator_identity, TrustAnchor(ca.root)), "fed-a")
        assert sidecar.metrics.registry.get_sample_value(
            "pqfed_channel_failures_total",
            {"stage": "handshake", "field": "client_flight.certificate.role"}) == 1
    finally:
        loop.run(sidecar.stop())


# ---- tls13 jobs: the operator speaks TLS 1.3 to a tls13 aggregator sidecar ------------------
@pytest.fixture(scope="module")
def tls13_agg(tmp_path_factory: pytest.TempPathFactory, loop: _Loop) -> Iterator[tuple[Any, ...]]:
    """A real tls13 sidecar (X.509 identities issued the way the operator issues them) in
    front of a real status API."""
    from pqfed.operator import identities
    from pqfed.pqc.sidecar.config import ChannelProtocolName

    tmp = tmp_path_factory.mktemp("tls13")
    ca_data = identities.issue_ca("fed-a", "ML-DSA-65", x509_ca=True)
    ca, x509_ca = identities.load_ca(ca_data), identities.load_x509_ca(ca_data)
    agg_data = identities.issue_identity(ca, "aggregator", Role.AGGREGATOR, "ML-DSA-65", 3600,
                                         x509_ca=x509_ca)
    op_data = identities.issue_identity(ca, "operator", Role.OPERATOR, "ML-DSA-65", 3600,
                                        x509_ca=x509_ca)
    for key, name in ((identities.X509_CERT_KEY, "agg.crt"), (identities.X509_KEY_KEY, "agg.key"),
                      (identities.X509_CA_KEY, "ca.crt")):
        (tmp / name).write_text(agg_data[key])
    state = tmp / "state"
    (state / "checkpoints").mkdir(parents=True)
    (state / "status.json").write_text(json.dumps({"job": "fed-a", "currentRound": 1}))
    status_port = _free_port()
    fl_node._serve_status(state, status_port)
    sidecar = Sidecar(SidecarConfig(
        cert=tmp / "agg.crt", key=tmp / "agg.key", ca=tmp / "ca.crt",
        listen=Endpoint("127.0.0.1", 0), upstream=Endpoint("127.0.0.1", _free_port()),
        operator_upstream=Endpoint("127.0.0.1", status_port), admin=None,
        protocol=ChannelProtocolName.TLS13))
    loop.run(sidecar.start())
    _wait_listening(status_port)
    yield sidecar, ca, op_data
    loop.run(sidecar.stop())


def test_operator_reads_a_tls13_aggregator_over_tls13(tls13_agg: tuple[Any, ...]) -> None:
    from pqfed.operator import identities
    from pqfed.operator.aggregator_api import operator_tls_context

    sidecar, ca, op = tls13_agg
    tls = operator_tls_context(op[identities.X509_CERT_KEY], op[identities.X509_KEY_KEY],
                               op[identities.X509_CA_KEY])
    ident = Identity.load(op["tls.crt"], op["tls.key"])
    ep = AggregatorEndpoint("127.0.0.1", sidecar.bound["listen"], ident, TrustAnchor(ca.root),
                            tls=tls)
    assert fetch_status(ep, "fed-a")["currentRound"] == 1
    # What the channel really negotiated, as the sidecar's /metrics exports it.
    negotiated = sidecar.metrics.registry.get_sample_value(
        "pqfed_channels_negotiated_total", {"version": "TLSv1.3", "group": "X25519MLKEM768"})
    assert negotiated and negotiated >= 1


def test_a_pqfed1_peer_cannot_join_a_tls13_job(tls13_agg: tuple[Any, ...]) -> None:
    """The same operator identity over pqfed1 (no TLS context) gets nothing from a tls13
    sidecar: the protocols do not interoperate, and nothing falls back."""
    sidecar, ca, op = tls13_agg
    ep = AggregatorEndpoint("127.0.0.1", sidecar.bound["listen"],
                            Identity.load(op["tls.crt"], op["tls.key"]), TrustAnchor(ca.root))
    with pytest.raises(AggregatorUnreachable):
        fetch_status(ep, "fed-a")


def test_an_operator_of_another_x509_ca_is_refused(tls13_agg: tuple[Any, ...]) -> None:
    from pqfed.operator import identities
    from pqfed.operator.aggregator_api import operator_tls_context

    sidecar, ca, op = tls13_agg
    other_ca = identities.issue_ca("fed-a", "ML-DSA-65", x509_ca=True)
    other = identities.issue_identity(identities.load_ca(other_ca), "operator", Role.OPERATOR,
                                      "ML-DSA-65", 3600,
                                      x509_ca=identities.load_x509_ca(other_ca))
    # Its own certificate from another CA, trusting the real job CA (so the pin holds).
    tls = operator_tls_context(other[identities.X509_CERT_KEY], other[identities.X509_KEY_KEY],
                               op[identities.X509_CA_KEY])
    ep = AggregatorEndpoint("127.0.0.1", sidecar.bound["listen"],
                            Identity.load(op["tls.crt"], op["tls.key"]), TrustAnchor(ca.root),
                            tls=tls)
    with pytest.raises(AggregatorUnreachable):
        fetch_status(ep, "fed-a")
