"""What differs between the sidecar's two wire protocols, behind one small interface.

The proxy (proxy.py) owns everything the protocols share: listeners, the pending-handshake
cap, the splice, the HTTP allow-list, the operator upstream, metrics, revocation enforcement
and the reload loop. A `ChannelProtocol` owns what differs: the file formats of the identity,
CA and revocation list, its trust store, and how a channel is established:

* `Pqfed1Protocol`: pqfed's own channel (`pqfed.pqc.channel`, SIGMA-style, docs/protocol.md)
  with pqfed certificates and revocation lists;
* `Tls13Protocol`: TLS 1.3 (RFC 8446, OpenSSL through `pqfed.pqc.tls13`) with X.509 ML-DSA-65
  certificates and X.509 CRLs (`pqfed.pqc.pki`, docs/pki.md).

Both give a `Channel` (the SecureChannel byte API) whose `peer` names node id, role,
federation and serial.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from pqfed.pqc.backends import Backend, SigPrivateKey, get_backend
from pqfed.pqc.channel import HandshakeStats, SecureChannel, client_channel, server_channel
from pqfed.pqc.errors import CertificateError, PqcError
from pqfed.pqc.handshake import HandshakeConfig
from pqfed.pqc.identity import Certificate, Identity, Role
from pqfed.pqc.pki.profile import (
    NodeCertificate,
    Usage,
    load_certificate_pem,
    load_private_key_pem,
)
from pqfed.pqc.pool import KeySharePool
from pqfed.pqc.sidecar.config import (
    TLS_GROUP_NAMES,
    ChannelProtocolName,
    ConfigError,
    Route,
    SidecarConfig,
)
from pqfed.pqc.sidecar.metrics import SidecarMetrics
from pqfed.pqc.tls13 import (
    CIPHERSUITES,
    TlsChannel,
    TlsConfig,
    TlsContext,
    tls_client_channel,
    tls_server_channel,
)
from pqfed.pqc.truststore import CrlFileStore, TrustStore, X509Trust, X509TrustStore

log = logging.getLogger("pqfed.sidecar")


class Peer(Protocol):
    """The authenticated peer of a channel (a pqfed `Certificate` or an X.509
    `NodeCertificate`)."""

    @property
    def node_id(self) -> str: ...

    @property
    def role(self) -> Role: ...

    @property
    def federation(self) -> str: ...

    @property
    def serial(self) -> int: ...


class Channel(Protocol):
    """An established, mutually authenticated byte channel (`SecureChannel`, `TlsChannel`)."""

    handshake: HandshakeStats
    bytes_sent: int
    bytes_received: int

    @property
    def peer(self) -> Peer: ...

    @property
    def peername(self) -> str: ...

    async def send(self, data: bytes) -> None: ...

    async def recv(self) -> bytes: ...

    async def close(self) -> None: ...

    def abort(self) -> None: ...


@dataclass(frozen=True, slots=True)
class IdentitySummary:
    """This node's identity as the admin API shows it (/identity)."""

    federation: str
    node_id: str
    role: Role
    serial: int
    not_before: int
    not_after: int
    fingerprint: str
    ca_fingerprint: str
    signature_algorithm: str
    groups: tuple[str, ...]
    suites: tuple[str, ...]


# PEM labels tell the two families of files apart (the pqfed format armours with its own).
_PQFED_PEM = b"-----BEGIN PQFED "
_ANY_PEM = b"-----BEGIN "
_FILE_KINDS = {"cert": "certificate", "key": "private key", "ca": "CA certificate",
               "crl": "revocation list"}


def _read(path: Path, field_name: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(field_name, f"cannot read {path}: {exc}") from None


def check_file_format(data: bytes, path: Path, field_name: str,
                      protocol: ChannelProtocolName) -> None:
    """Refuses a file of the other protocol's family, saying which one it is and the fix."""
    kind = _FILE_KINDS[field_name]
    if protocol is ChannelProtocolName.TLS13 and _PQFED_PEM in data:
        raise ConfigError(field_name, f"{path} holds a pqfed-format {kind} (protocol pqfed1); "
                          "protocol tls13 needs X.509 PEM (`pqfed ca x509-init`, `pqfed ca "
                          "csr` + `pqfed ca sign`, `pqfed ca x509-crl`), or run the sidecar "
                          "with --protocol pqfed1")
    if (protocol is ChannelProtocolName.PQFED1 and _ANY_PEM in data
            and _PQFED_PEM not in data):
        raise ConfigError(field_name, f"{path} holds an X.509/PKCS#8 {kind} (protocol "
                          "tls13); protocol pqfed1 needs the pqfed format (`pqfed ca init`, "
                          "`pqfed ca issue`, `pqfed ca crl`), or run the sidecar with "
                          "--protocol tls13")


class ChannelProtocol(abc.ABC):
    """One wire protocol's identity, trust store and handshakes, for one sidecar.

    Owned by the sidecar's event loop; `reload` is called by its watcher."""

    name: ClassVar[ChannelProtocolName]
    store: CrlFileStore[Any]

    def __init__(self, config: SidecarConfig, metrics: SidecarMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self._identity_files = (b"", b"")

    # --- what the proxy asks ----------------------------------------------------------------
    @property
    @abc.abstractmethod
    def identity(self) -> IdentitySummary:
        """This node's identity in use."""

    @abc.abstractmethod
    async def server(self, reader: Any, writer: Any) -> Channel:
        """The responder's handshake on an accepted connection, for a peer of one of
        `config.inbound_peer_roles`; raises PqcError on refusal."""

    @abc.abstractmethod
    async def client(self, reader: Any, writer: Any, route: Route) -> Channel:
        """The initiator's handshake towards `route.peer`; raises PqcError on refusal."""

    @abc.abstractmethod
    def verify(self, peer: Peer) -> None:
        """Judges an established channel's peer against the trust in force now (a newer
        revocation list, a stale one); raises CertificateError naming the field."""

    def reload(self) -> bool:
        """Re-reads the revocation list and this node's certificate and key; True if a newer
        list is now in force (the proxy then re-judges every channel)."""
        changed = self.store.reload()
        if changed:
            self._trust_changed()
        elif self.store.last_error is not None:
            self.metrics.failures.labels("revocation_list",
                                         getattr(self.store.last_error, "field", "file")).inc()
            self.store.last_error = None
        self._reload_identity()
        return changed

    @property
    def crl_number(self) -> int | None:
        return self.store.crl_number

    def close(self) -> None:
        """Releases worker threads; channels already up are the proxy's."""
        return None

    def negotiated(self, channel: Channel) -> tuple[str, str]:
        """(protocol version, key-exchange group) that `channel` actually negotiated."""
        if isinstance(channel, TlsChannel):
            return channel.version, channel.group
        if isinstance(channel, SecureChannel):
            return self.name.value, channel.session.group.name
        return self.name.value, "unknown"

    # --- what a protocol provides -----------------------------------------------------------
    @abc.abstractmethod
    def _use_identity(self, cert_pem: bytes, key_pem: bytes) -> str:
        """Loads, checks against the trust in force and puts in use a certificate and key;
        returns a description for the log. Raises PqcError (or ConfigError) to keep the old."""

    def _trust_changed(self) -> None:
        """A newer revocation list is in force (contexts built from the old anchor update)."""
        return None

    def _load_identity(self) -> None:
        files = (_read(self.config.cert, "cert"), _read(self.config.key, "key"))
        for data, path, name in ((files[0], self.config.cert, "cert"),
                                 (files[1], self.config.key, "key")):
            check_file_format(data, path, name, self.name)
        self._use_identity(*files)
        self._identity_files = files

    def _reload_identity(self) -> None:
        c = self.config
        try:
            files = (c.cert.read_bytes(), c.key.read_bytes())
        except OSError:
            return  # mid-swap or gone: keep the identity in use
        if files == self._identity_files:
            return
        self._identity_files = files  # these bytes are judged once
        try:
            described = self._use_identity(*files)
        except (PqcError, ConfigError, UnicodeDecodeError) as exc:
            # Kept: the identity in use. A certificate written before its key does not match
            # for a moment; the next change of either file is judged again (a Kubernetes
            # Secret volume swaps both at once).
            log.warning("new identity in %s not used: %s", c.cert, exc)
            self.metrics.failures.labels("identity_reload",
                                         getattr(exc, "field", "identity")).inc()
            return
        log.info("identity renewed: %s", described)


# --- pqfed1 ----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _TimedKey:
    """Observes ML-DSA signing latency (the long-tailed operation) into the metrics."""

    inner: SigPrivateKey
    metrics: SidecarMetrics

    @property
    def algorithm(self) -> str:
        return self.inner.algorithm

    def public_bytes(self) -> bytes:
        return self.inner.public_bytes()

    def private_bytes(self) -> bytes:
        return self.inner.private_bytes()

    def sign(self, message: bytes, context: bytes = b"") -> bytes:
        start = time.perf_counter()
        try:
            return self.inner.sign(message, context)
        finally:
            self.metrics.sign_seconds.observe(time.perf_counter() - start)


class _TimedBackend:
    def __init__(self, inner: Backend, metrics: SidecarMetrics) -> None:
        self._inner = inner
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def sig_verify(self, algorithm: str, public_key: bytes, message: bytes, signature: bytes,
                   context: bytes = b"") -> None:
        start = time.perf_counter()
        try:
            self._inner.sig_verify(algorithm, public_key, message, signature, context)
        finally:
            self._metrics.verify_seconds.observe(time.perf_counter() - start)


class Pqfed1Protocol(ChannelProtocol):
    """pqfed's own channel: handshake crypto on a thread pool, key shares pre-generated."""

    name = ChannelProtocolName.PQFED1
    store: TrustStore
    node: Identity

    def __init__(self, config: SidecarConfig, metrics: SidecarMetrics) -> None:
        super().__init__(config, metrics)
        for path, name in ((config.ca, "ca"), (config.crl, "crl")):
            if path is not None and path.exists():
                check_file_format(_read(path, name), path, name, self.name)
        self.store = TrustStore(config.ca, config.crl, min_interval_s=float("inf"))
        self._load_identity()  # refuses to start with a foreign/expired certificate
        self._executor = ThreadPoolExecutor(config.crypto_threads, "pqfed-handshake")
        self._key_shares = KeySharePool()

    def _use_identity(self, cert_pem: bytes, key_pem: bytes) -> str:
        new = Identity.load(cert_pem.decode(), key_pem.decode())
        self.store.current.verify(new.certificate)
        self.node = Identity(new.certificate, _TimedKey(new.key, self.metrics))
        cert = new.certificate
        return f"serial {cert.serial} valid until {cert.not_after}"

    @property
    def identity(self) -> IdentitySummary:
        cert = self.node.certificate
        return IdentitySummary(
            cert.federation, cert.node_id, cert.role, cert.serial, cert.not_before,
            cert.not_after, cert.fingerprint, self.store.root.fingerprint, cert.sig_algorithm,
            tuple(g.name for g in self.config.groups), tuple(s.name for s in self.config.suites))

    def _handshake_config(self) -> HandshakeConfig:
        c = self.config
        return HandshakeConfig(self.node, self.store.current, suites=c.suites, groups=c.groups,
                               timeout_s=c.handshake_timeout_s,
                               backend=_TimedBackend(get_backend(), self.metrics))

    async def server(self, reader: Any, writer: Any) -> Channel:
        cfg = replace(self._handshake_config(), peer_roles=self.config.inbound_peer_roles)
        return await server_channel(reader, writer, cfg, self._executor)

    async def client(self, reader: Any, writer: Any, route: Route) -> Channel:
        cfg = replace(self._handshake_config(), peer_roles=route.peer_roles,
                      peer_node_id=route.peer_node_id, key_shares=self._key_shares)
        return await client_channel(reader, writer, cfg, self._executor)

    def verify(self, peer: Peer) -> None:
        if not isinstance(peer, Certificate):
            raise CertificateError("certificate", f"{type(peer).__name__} is not a pqfed "
                                                  "certificate")
        self.store.current.verify(peer)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# --- TLS 1.3 ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _TimedTrust:
    """The trust in force, observing our policy check of the peer's leaf (with its ML-DSA-65
    signature check, cached per certificate) into the verify histogram. OpenSSL's own chain
    verification and its CertificateVerify signing run inside the handshake, unobserved."""

    inner: X509Trust
    metrics: SidecarMetrics

    @property
    def root(self) -> x509.Certificate:
        return self.inner.root

    def verify(self, cert: x509.Certificate, *, now: float | None = None,
               roles: tuple[Role, ...] | None = None, node_id: str | None = None,
               usage: Usage | None = None) -> NodeCertificate:
        start = time.perf_counter()
        try:
            return self.inner.verify(cert, now=now, roles=roles, node_id=node_id, usage=usage)
        finally:
            self.metrics.verify_seconds.observe(time.perf_counter() - start)


class Tls13Protocol(ChannelProtocol):
    """TLS 1.3: one OpenSSL context for inbound connections and one per route, rebuilt when
    the identity is renewed; a newer CRL is handed to every context (each handshake reads
    it). Handshake steps run on a thread pool, as pqfed1's do (OpenSSL releases the GIL)."""

    name = ChannelProtocolName.TLS13
    store: X509TrustStore
    node: NodeCertificate

    def __init__(self, config: SidecarConfig, metrics: SidecarMetrics) -> None:
        super().__init__(config, metrics)
        for path, name in ((config.ca, "ca"), (config.crl, "crl")):
            if path is not None and path.exists():
                check_file_format(_read(path, name), path, name, self.name)
        try:
            self.store = X509TrustStore(config.ca, config.crl, min_interval_s=float("inf"))
        except CertificateError as exc:
            raise ConfigError("ca", f"{config.ca}: {exc}") from None
        self._groups = tuple(TLS_GROUP_NAMES[g] for g in config.groups)
        self._load_identity()
        self._executor = ThreadPoolExecutor(config.crypto_threads, "pqfed-handshake")

    def _trust(self) -> _TimedTrust:
        return _TimedTrust(self.store.current, self.metrics)

    def _use_identity(self, cert_pem: bytes, key_pem: bytes) -> str:
        cert = load_certificate_pem(cert_pem, "cert")
        key = load_private_key_pem(key_pem, "key")
        node = self.store.current.verify(cert)
        c = self.config
        trust = self._trust()
        on_sign = self.metrics.sign_seconds.observe
        server = None
        if c.listen is not None:
            server = TlsContext(TlsConfig(
                cert, key, trust, peer_roles=c.inbound_peer_roles,
                groups=self._groups, timeout_s=c.handshake_timeout_s), Usage.SERVER, on_sign)
        clients = tuple(
            TlsContext(TlsConfig(cert, key, trust, peer_roles=route.peer_roles,
                                 peer_node_id=route.peer_node_id, groups=self._groups,
                                 timeout_s=c.handshake_timeout_s), Usage.CLIENT, on_sign)
            for route in c.routes)
        self.node, self._server, self._clients = node, server, clients
        return f"serial {node.serial:#x} valid until {node.not_after}"

    def _trust_changed(self) -> None:
        trust = self._trust()
        for ctx in (self._server, *self._clients):
            if ctx is not None:
                ctx.trust = trust

    @property
    def identity(self) -> IdentitySummary:
        node = self.node
        return IdentitySummary(
            node.federation, node.node_id, node.role, node.serial, node.not_before,
            node.not_after, node.fingerprint,
            hashlib.sha256(self.store.root.public_bytes(Encoding.DER)).hexdigest(),
            "ML-DSA-65", self._groups, tuple(CIPHERSUITES.split(":")))

    async def server(self, reader: Any, writer: Any) -> Channel:
        if self._server is None:
            raise ConfigError("listen", "no inbound listener configured")
        return await tls_server_channel(reader, writer, self._server, executor=self._executor)

    async def client(self, reader: Any, writer: Any, route: Route) -> Channel:
        ctx = self._clients[self.config.routes.index(route)]
        return await tls_client_channel(reader, writer, ctx, executor=self._executor)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def verify(self, peer: Peer) -> None:
        if not isinstance(peer, NodeCertificate):
            raise CertificateError("certificate", f"{type(peer).__name__} is not an X.509 "
                                                  "node certificate")
        self.store.current.verify(peer.certificate)


def make_protocol(config: SidecarConfig, metrics: SidecarMetrics) -> ChannelProtocol:
    kinds: dict[ChannelProtocolName, type[ChannelProtocol]] = {
        ChannelProtocolName.PQFED1: Pqfed1Protocol, ChannelProtocolName.TLS13: Tls13Protocol}
    return kinds[config.protocol](config, metrics)
