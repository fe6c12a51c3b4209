"""One federation CA per sidecar protocol, so the sidecar tests run over both: pqfed1 with the
pqfed format, tls13 with X.509 (pqc/pki). Each writes its files in the format its protocol
reads and answers in that protocol's field names."""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import mldsa
from cryptography.hazmat.primitives.serialization import Encoding

from pqfed.pqc.backends import get_backend
from pqfed.pqc.channel import connect
from pqfed.pqc.handshake import Group, HandshakeConfig
from pqfed.pqc.identity import Certificate, CertificateAuthority, Identity, Role, TrustAnchor
from pqfed.pqc.pki import NodeURI, Usage, X509CertificateAuthority, X509TrustAnchor
from pqfed.pqc.pki.profile import (
    certificate_pem,
    load_certificate_pem,
    load_private_key_pem,
    private_key_pem,
)
from pqfed.pqc.revocation import RevocationReason, RevokedCertificate
from pqfed.pqc.sidecar.config import ChannelProtocolName
from pqfed.pqc.sidecar.protocols import Channel
from pqfed.pqc.tls13 import TlsConfig, TlsContext, set_groups, tls_connect


@dataclass(frozen=True)
class Node:
    node_id: str
    serial: int
    cert_pem: bytes
    key_pem: bytes

    def save(self, cert: Path, key: Path) -> None:
        cert.write_bytes(self.cert_pem)
        key.write_bytes(self.key_pem)


class Pki(abc.ABC):
    protocol: ChannelProtocolName

    def __init__(self, federation: str) -> None:
        self.federation = federation

    @abc.abstractmethod
    def node(self, node_id: str, role: Role, *, expired: bool = False) -> Node: ...

    @abc.abstractmethod
    def ca_pem(self) -> bytes: ...

    @abc.abstractmethod
    def crl(self, number: int, serials: tuple[int, ...] = (), *, issued: int | None = None,
            validity_s: int = 86400) -> bytes:
        """A revocation list of this CA (PEM)."""

    @abc.abstractmethod
    def other(self) -> Pki:
        """Another CA with the same federation name (a different key)."""

    def handshake_field(self, side: str, name: str) -> str:
        """The metric label of a handshake refused for certificate field `name`, as seen by
        `side` ("server" judging the client, "client" judging the server)."""
        if self.protocol is ChannelProtocolName.PQFED1:
            flight = "client_flight" if side == "server" else "server_flight"
            return f"{flight}.certificate.{name}"
        return f"certificate.{name}"


class Pqfed1Pki(Pki):
    protocol = ChannelProtocolName.PQFED1

    def __init__(self, federation: str) -> None:
        super().__init__(federation)
        self.ca = CertificateAuthority.generate(federation)

    def node(self, node_id: str, role: Role, *, expired: bool = False) -> Node:
        if expired:
            key = get_backend().sig_generate("ML-DSA-65")
            cert = self.ca.issue(node_id, role, key.public_bytes(), validity_s=600,
                                 not_before=int(time.time()) - 3600)
            ident = Identity(cert, key)
        else:
            ident = self.ca.new_identity(node_id, role)
        return Node(node_id, ident.certificate.serial, ident.certificate.to_pem().encode(),
                    ident.private_key_pem().encode())

    def ca_pem(self) -> bytes:
        return self.ca.root.to_pem().encode()

    def crl(self, number: int, serials: tuple[int, ...] = (), *, issued: int | None = None,
            validity_s: int = 86400) -> bytes:
        t = int(time.time()) if issued is None else issued
        entries = [RevokedCertificate(s, t, RevocationReason.KEY_COMPROMISE) for s in serials]
        return self.ca.sign_crl(number, entries, this_update=t,
                                validity_s=validity_s).to_pem().encode()

    def other(self) -> Pki:
        return Pqfed1Pki(self.federation)


class X509Pki(Pki):
    protocol = ChannelProtocolName.TLS13

    def __init__(self, federation: str) -> None:
        super().__init__(federation)
        self.ca = X509CertificateAuthority.generate(federation)

    def node(self, node_id: str, role: Role, *, expired: bool = False) -> Node:
        key = mldsa.MLDSA65PrivateKey.generate()
        uri = NodeURI(self.federation, role, node_id)
        if expired:
            cert = self.ca.issue(uri, key.public_key(), validity_s=600,
                                 not_before=time.time() - 3600)
        else:
            cert = self.ca.issue(uri, key.public_key())
        return Node(node_id, cert.serial_number, certificate_pem(cert), private_key_pem(key))

    def ca_pem(self) -> bytes:
        return certificate_pem(self.ca.certificate)

    def crl(self, number: int, serials: tuple[int, ...] = (), *, issued: int | None = None,
            validity_s: int = 86400) -> bytes:
        crl = self.ca.revocation_list(serials, number, validity_s=validity_s, now=issued)
        return crl.public_bytes(Encoding.PEM)

    def other(self) -> Pki:
        return X509Pki(self.federation)


def make_pki(protocol: str, federation: str = "fed-test") -> Pki:
    return Pqfed1Pki(federation) if protocol == "pqfed1" else X509Pki(federation)


async def dial(pki: Pki, port: int, node: Node, *, trust: Pki | None = None,
               classical: bool = False) -> Channel:
    """A bare client (no sidecar, so no check of its own certificate) trusting `trust`'s CA
    (default `pki`'s): for peers a client sidecar would never be. `classical` offers X25519
    only."""
    trusted = (trust or pki).ca_pem()
    if pki.protocol is ChannelProtocolName.PQFED1:
        groups = (Group.X25519,) if classical else (Group.X25519_MLKEM768,)
        cfg = HandshakeConfig(Identity.load(node.cert_pem.decode(), node.key_pem.decode()),
                              TrustAnchor(Certificate.from_pem(trusted.decode())),
                              groups=groups, peer_roles=(Role.AGGREGATOR,))
        return await connect("127.0.0.1", port, cfg)
    ctx = TlsContext(TlsConfig(load_certificate_pem(node.cert_pem),
                               load_private_key_pem(node.key_pem),
                               X509TrustAnchor(load_certificate_pem(trusted)),
                               peer_roles=(Role.AGGREGATOR,)), Usage.CLIENT)
    if classical:  # what a foreign stack without ML-KEM offers
        set_groups(ctx.ssl, ("X25519",))
    return await tls_connect("127.0.0.1", port, ctx)
