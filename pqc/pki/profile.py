"""The pqfed X.509 profile: a federation CA and node certificates with ML-DSA-65 keys.

Follows RFC 5280 (certificate and CRL profile), RFC 9881 / draft-ietf-lamps-dilithium-certificates
(ML-DSA in X.509: the algorithm identifier carries no parameters, the key is the raw FIPS 204
public key) and, for the identity, the SPIFFE X.509-SVID profile: the node's identity is one URI
in subjectAltName (`pqfed.pqc.pki.uri`), the subject name is informative.

CA certificate: self-signed, BasicConstraints CA:TRUE pathLen 0 (critical), KeyUsage
keyCertSign + cRLSign (critical), SubjectKeyIdentifier, subjectAltName `pqfed://<fed>/ca/ca`.
Node certificate: BasicConstraints CA:FALSE (critical), KeyUsage digitalSignature (critical),
ExtendedKeyUsage by role (ROLE_USAGES), SubjectKeyIdentifier, AuthorityKeyIdentifier = the CA's
SKI, subjectAltName = exactly one node URI (critical when the subject is empty; ours is not).

`X509TrustAnchor.verify` applies the same checks as `pqfed.pqc.identity.TrustAnchor.verify`
(federation, issuer, role, expected node id, validity, revocation, signature) plus the root's own
validity, a leaf that does not outlive its root and the profile above; each failure raises
CertificateError naming the field.

The writer of the profile (`X509CertificateAuthority`) and its reader (`X509TrustAnchor`) stay
in one module, past 500 lines, because they must agree extension by extension.
"""

from __future__ import annotations

import datetime
import enum
import functools
import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import mldsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, SignatureAlgorithmOID

from pqfed.pqc.errors import CertificateError
from pqfed.pqc.identity import Role
from pqfed.pqc.pki.uri import CA_NODE_ID, NodeURI, check_label

DEFAULT_CA_VALIDITY_S = 365 * 86400
DEFAULT_NODE_VALIDITY_S = 7 * 86400
MAX_NODE_VALIDITY_S = 30 * 86400
DEFAULT_CRL_VALIDITY_S = 86400
BACKDATE_S = 300  # tolerated clock skew between the CA and the nodes
_E = TypeVar("_E", bound=x509.ExtensionType)


class Usage(enum.Enum):
    """The side of a TLS connection a certificate authenticates (RFC 5280 §4.2.1.12)."""

    SERVER = "server"
    CLIENT = "client"


_EKU_OID = {Usage.SERVER: ExtendedKeyUsageOID.SERVER_AUTH,
            Usage.CLIENT: ExtendedKeyUsageOID.CLIENT_AUTH}

# Aggregators accept connections; clients and the operator dial out; an edge aggregator does
# both (a client upstream, an aggregator downstream).
ROLE_USAGES: dict[Role, frozenset[Usage]] = {
    Role.AGGREGATOR: frozenset({Usage.SERVER}),
    Role.CLIENT: frozenset({Usage.CLIENT}),
    Role.EDGE: frozenset({Usage.SERVER, Usage.CLIENT}),
    Role.OPERATOR: frozenset({Usage.CLIENT}),
}

# Extensions this profile writes and reads; any other critical extension is refused.
_KNOWN_EXTENSIONS = frozenset({
    x509.BasicConstraints.oid, x509.KeyUsage.oid, x509.ExtendedKeyUsage.oid,
    x509.SubjectKeyIdentifier.oid, x509.AuthorityKeyIdentifier.oid,
    x509.SubjectAlternativeName.oid,
})


def _utc(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(int(ts), datetime.UTC)


def _now(now: float | None) -> float:
    return time.time() if now is None else now


def subject_name(uri: NodeURI) -> x509.Name:
    """Informative subject: O=<federation>, OU=<role>, CN=<node id> (the CA: CN=<fed> CA)."""
    cn = f"{uri.federation} federation CA" if uri.role is Role.CA else uri.node_id
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, uri.federation),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, uri.role.name.lower()),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


def read_node_uri(cert: x509.Certificate | x509.CertificateSigningRequest,
                  field_name: str = "subject_alt_name") -> NodeURI:
    """The one node URI of a certificate or CSR; any other subjectAltName entry is refused."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CertificateError(field_name, "no subjectAltName; a node URI "
                                           "pqfed://<federation>/<role>/<node_id> is required"
                               ) from None
    names = list(san)
    if len(names) != 1 or not isinstance(names[0], x509.UniformResourceIdentifier):
        raise CertificateError(
            field_name, f"must hold exactly one URI (the node URI), found {len(names)} "
                        f"entr{'y' if len(names) == 1 else 'ies'}: "
                        + ", ".join(type(n).__name__ for n in names))
    return NodeURI.parse(names[0].value, field_name)


def check_ml_dsa_65_key(key: object, field_name: str = "public_key") -> mldsa.MLDSA65PublicKey:
    if not isinstance(key, mldsa.MLDSA65PublicKey):
        raise CertificateError(
            field_name, f"{type(key).__name__} is not an ML-DSA-65 public key; pqfed "
                        "certificates and requests use ML-DSA-65 keys only")
    return key


def _check_sig_alg(oid: x509.ObjectIdentifier, field_name: str) -> None:
    if oid != SignatureAlgorithmOID.ML_DSA_65:
        raise CertificateError(field_name, f"{oid.dotted_string} is not ML-DSA-65 "
                                           f"({SignatureAlgorithmOID.ML_DSA_65.dotted_string})")


def _check_critical_known(exts: x509.Extensions, field_name: str) -> None:
    for ext in exts:
        if ext.critical and ext.oid not in _KNOWN_EXTENSIONS:
            raise CertificateError(field_name, f"unknown critical extension "
                                               f"{ext.oid.dotted_string}")


def _ext(cert: x509.Certificate, kind: type[_E], field_name: str, *,
         critical: bool | None = None) -> _E:
    try:
        ext = cert.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        raise CertificateError(field_name, f"{kind.__name__} extension is missing") from None
    if critical is not None and ext.critical != critical:
        raise CertificateError(field_name, f"{kind.__name__} must be "
                                           f"{'critical' if critical else 'non-critical'}")
    return ext.value


def _signed_by(cert: x509.Certificate, issuer_key: mldsa.MLDSA65PublicKey) -> bool:
    return _ml_dsa_signed(issuer_key.public_bytes_raw(), cert.tbs_certificate_bytes,
                          cert.signature)


@functools.lru_cache(maxsize=4096)
def _ml_dsa_signed(public_key: bytes, tbs: bytes, signature: bytes) -> bool:
    """Whether the CA signed `tbs`. Cached as in `pqfed.pqc.identity`: the answer for given
    bytes never changes and a node sees the same peer certificates in every handshake;
    validity, revocation and role are checked on every use, outside the cache."""
    try:
        mldsa.MLDSA65PublicKey.from_public_bytes(public_key).verify(signature, tbs)
    except InvalidSignature:
        return False
    return True


def _key_usage(cert: x509.Certificate, prefix: str) -> x509.KeyUsage:
    return _ext(cert, x509.KeyUsage, f"{prefix}key_usage", critical=True)


@dataclass(frozen=True, slots=True)
class NodeCertificate:
    """A node certificate that passed `X509TrustAnchor.verify`: who it names and until when."""

    uri: NodeURI
    serial: int
    not_before: int
    not_after: int
    certificate: x509.Certificate = field(repr=False, compare=False)

    @property
    def federation(self) -> str:
        return self.uri.federation

    @property
    def role(self) -> Role:
        return self.uri.role

    @property
    def node_id(self) -> str:
        return self.uri.node_id

    @property
    def fingerprint(self) -> str:
        """SHA-256 over the DER encoding (what `openssl x509 -fingerprint -sha256` prints)."""
        return hashlib.sha256(self.certificate.public_bytes(serialization.Encoding.DER)
                              ).hexdigest()


def check_ca_certificate(root: x509.Certificate) -> NodeURI:
    """The CA profile (module docstring); raises CertificateError('root.<field>')."""
    if root.version is not x509.Version.v3:
        raise CertificateError("root.version", "must be an X.509 v3 certificate")
    uri = read_node_uri(root, "root.subject_alt_name")
    if uri.role is not Role.CA:
        raise CertificateError("root.subject_alt_name", f"{uri} does not name a CA "
                                                        "(pqfed://<federation>/ca/ca)")
    pub = check_ml_dsa_65_key(root.public_key(), "root.public_key")
    _check_sig_alg(root.signature_algorithm_oid, "root.signature_algorithm")
    if root.issuer != root.subject:
        raise CertificateError("root.issuer", "a federation CA is self-signed "
                                              "(issuer must equal subject)")
    bc = _ext(root, x509.BasicConstraints, "root.basic_constraints", critical=True)
    if not bc.ca or bc.path_length != 0:
        raise CertificateError("root.basic_constraints", "must be CA:TRUE, pathlen:0 "
                                                         "(node certificates only, no sub-CAs)")
    ku = _key_usage(root, "root.")
    if not (ku.key_cert_sign and ku.crl_sign) or ku.digital_signature:
        raise CertificateError("root.key_usage", "must be keyCertSign and cRLSign only")
    ski = _ext(root, x509.SubjectKeyIdentifier, "root.subject_key_identifier", critical=False)
    if ski.digest != x509.SubjectKeyIdentifier.from_public_key(pub).digest:
        raise CertificateError("root.subject_key_identifier",
                               "does not match the public key (RFC 5280 §4.2.1.2 method 1)")
    _check_critical_known(root.extensions, "root.extensions")
    if not _signed_by(root, pub):
        raise CertificateError("root.signature", "the CA's self-signature does not verify")
    return uri


@dataclass(frozen=True, slots=True)
class X509TrustAnchor:
    """What a node trusts: its federation's X.509 CA root, plus the serials of the newest CRL."""

    root: x509.Certificate
    revoked: frozenset[int] = frozenset()
    crl_number: int | None = None  # of the CRL `revoked` came from; never goes down
    crl_fingerprint: str | None = None
    # Derived from `root` once (every handshake reads them).
    root_uri: NodeURI = field(init=False, repr=False, compare=False)
    root_key: mldsa.MLDSA65PublicKey = field(init=False, repr=False, compare=False)
    root_key_id: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "root_uri", check_ca_certificate(self.root))
        key = check_ml_dsa_65_key(self.root.public_key(), "root.public_key")
        object.__setattr__(self, "root_key", key)
        object.__setattr__(self, "root_key_id",
                           x509.SubjectKeyIdentifier.from_public_key(key).digest)

    @property
    def federation(self) -> str:
        return self.root_uri.federation

    @classmethod
    def from_pem(cls, pem: bytes | str) -> X509TrustAnchor:
        return cls(load_certificate_pem(pem, "root"))

    def verify(
        self,
        cert: x509.Certificate,
        *,
        now: float | None = None,
        roles: tuple[Role, ...] | None = None,
        node_id: str | None = None,
        usage: Usage | None = None,
    ) -> NodeCertificate:
        """Checks `cert` was issued by this CA for this federation and is usable now (for
        `usage`, by one of `roles`, as `node_id` when given). Raises CertificateError naming
        the failing field; returns the parsed identity."""
        t = _now(now)
        uri = read_node_uri(cert)
        root_uri = self.root_uri
        if uri.federation != root_uri.federation:
            raise CertificateError(
                "federation", f"{uri.federation!r} is not {root_uri.federation!r}")
        if cert.issuer != self.root.subject:
            raise CertificateError("issuer", "not issued by this federation's CA "
                                             f"(issuer {cert.issuer.rfc4514_string()})")
        if uri.role is Role.CA:
            raise CertificateError("role", "a CA certificate cannot identify a node")
        if roles is not None and uri.role not in roles:
            allowed = ", ".join(r.name.lower() for r in roles)
            raise CertificateError("role", f"{uri.role.name.lower()} is not one of: {allowed}")
        if node_id is not None and uri.node_id != node_id:
            raise CertificateError("node_id", f"{uri.node_id!r} is not the expected {node_id!r}")
        aki = _ext(cert, x509.AuthorityKeyIdentifier, "authority_key_identifier",
                   critical=False)
        if aki.key_identifier != self.root_key_id:
            raise CertificateError("issuer", "authority key identifier is not this CA's key")
        # The root's end first: a leaf is capped at it, and "rotate the CA" is the fix.
        if t >= self.root.not_valid_after_utc.timestamp():
            raise CertificateError("root.not_after", "the federation CA expired; rotate it")
        not_before = int(cert.not_valid_before_utc.timestamp())
        not_after = int(cert.not_valid_after_utc.timestamp())
        if t < not_before:
            raise CertificateError("not_before", "certificate is not valid yet (check clocks)")
        if t >= not_after:
            raise CertificateError("not_after", "certificate expired; issue a new one")
        if t < self.root.not_valid_before_utc.timestamp():
            raise CertificateError("root.not_before", "the CA is not valid yet (check clocks)")
        if cert.not_valid_after_utc > self.root.not_valid_after_utc:
            raise CertificateError("not_after", "certificate outlives its CA "
                                                "(RFC 5280 path validity); reissue it")
        if cert.serial_number in self.revoked:
            raise CertificateError("serial", f"serial {cert.serial_number:#x} is revoked "
                                             f"(CRL number {self.crl_number})")
        self._check_node_profile(cert, uri.role, usage)
        if not _signed_by(cert, self.root_key):
            raise CertificateError("signature", "CA signature does not verify")
        return NodeCertificate(uri, cert.serial_number, not_before, not_after, cert)

    @staticmethod
    def _check_node_profile(cert: x509.Certificate, role: Role, usage: Usage | None) -> None:
        if cert.version is not x509.Version.v3:
            raise CertificateError("version", "must be an X.509 v3 certificate")
        check_ml_dsa_65_key(cert.public_key())
        _check_sig_alg(cert.signature_algorithm_oid, "signature_algorithm")
        bc = _ext(cert, x509.BasicConstraints, "basic_constraints", critical=True)
        if bc.ca:
            raise CertificateError("basic_constraints", "a node certificate must be CA:FALSE")
        ku = _key_usage(cert, "")
        if not ku.digital_signature or ku.key_cert_sign or ku.crl_sign:
            raise CertificateError("key_usage", "must be digitalSignature (no certificate or "
                                                "CRL signing)")
        eku = _ext(cert, x509.ExtendedKeyUsage, "extended_key_usage")
        want = {_EKU_OID[u] for u in ROLE_USAGES[role]}
        if set(eku) != want:
            names = ", ".join(sorted(u.value for u in ROLE_USAGES[role]))
            raise CertificateError("extended_key_usage", f"a {role.name.lower()} certificate "
                                                         f"must allow exactly: {names}")
        if usage is not None and usage not in ROLE_USAGES[role]:
            raise CertificateError("extended_key_usage", f"a {role.name.lower()} certificate "
                                                         f"cannot authenticate a TLS {usage.value}")
        _check_critical_known(cert.extensions, "extensions")

    def with_crl(self, crl: x509.CertificateRevocationList, *,
                 now: float | None = None) -> X509TrustAnchor:
        """Checks `crl` (RFC 5280 §5: issuer, signature, CRL number, freshness) and returns
        the anchor with its revoked serials. A CRL number below the one held is a rollback
        and is refused, as is a different CRL under the same number."""
        t = _now(now)
        _check_sig_alg(crl.signature_algorithm_oid, "crl.signature_algorithm")
        if crl.issuer != self.root.subject:
            raise CertificateError("crl.issuer", "not issued by this federation's CA")
        if not crl.is_signature_valid(self.root_key):
            raise CertificateError("crl.signature", "CA signature does not verify")
        for ext in crl.extensions:
            if ext.critical:
                raise CertificateError("crl.extensions", "unknown critical extension "
                                                         f"{ext.oid.dotted_string}")
        try:
            number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        except x509.ExtensionNotFound:
            raise CertificateError("crl.crl_number", "missing (RFC 5280 §5.2.3)") from None
        fingerprint = hashlib.sha256(crl.public_bytes(serialization.Encoding.DER)).hexdigest()
        if self.crl_number is not None:
            if number < self.crl_number:
                raise CertificateError("crl.crl_number", f"{number} is older than the CRL "
                                                         f"held ({self.crl_number}): rollback")
            if number == self.crl_number and fingerprint != self.crl_fingerprint:
                raise CertificateError("crl.crl_number", f"a different CRL with the number "
                                                         f"{number} is already held")
        if crl.last_update_utc.timestamp() > t + BACKDATE_S:
            raise CertificateError("crl.last_update", "issued in the future (check clocks)")
        if crl.next_update_utc is None or t >= crl.next_update_utc.timestamp():
            raise CertificateError("crl.next_update", "CRL is stale; fetch the CA's newest")
        serials = frozenset(r.serial_number for r in crl)
        return X509TrustAnchor(self.root, serials, number, fingerprint)


def load_certificate_pem(pem: bytes | str, field_name: str = "certificate") -> x509.Certificate:
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise CertificateError(field_name, f"not a PEM X.509 certificate: {exc}") from None


def certificate_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def private_key_pem(key: mldsa.MLDSA65PrivateKey) -> bytes:
    """PKCS#8 (RFC 5208), unencrypted: protect the file (0600, a Kubernetes Secret)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_private_key_pem(pem: bytes, field_name: str = "private_key") -> mldsa.MLDSA65PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(field_name, f"not an unencrypted PKCS#8 PEM key: {exc}") from None
    if not isinstance(key, mldsa.MLDSA65PrivateKey):
        raise CertificateError(field_name, f"{type(key).__name__} is not an ML-DSA-65 key")
    return key


def write_private_key(path: Path, key: mldsa.MLDSA65PrivateKey) -> None:
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_bytes(private_key_pem(key))


@dataclass(frozen=True, slots=True)
class X509CertificateAuthority:
    """The federation's X.509 CA: its certificate and ML-DSA-65 key (kept by the CA admin)."""

    certificate: x509.Certificate
    key: mldsa.MLDSA65PrivateKey = field(repr=False)

    def __post_init__(self) -> None:
        check_ca_certificate(self.certificate)
        if self.key.public_key() != self.certificate.public_key():
            raise CertificateError("private_key", "does not match the CA certificate")

    @property
    def trust(self) -> X509TrustAnchor:
        return X509TrustAnchor(self.certificate)

    @property
    def federation(self) -> str:
        return read_node_uri(self.certificate).federation

    @classmethod
    def generate(cls, federation: str, *, validity_s: int = DEFAULT_CA_VALIDITY_S,
                 now: float | None = None) -> X509CertificateAuthority:
        check_label("federation", federation)
        key = mldsa.MLDSA65PrivateKey.generate()
        uri = NodeURI(federation, Role.CA, CA_NODE_ID)
        name = subject_name(uri)
        start = int(_now(now)) - BACKDATE_S
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_utc(start)).not_valid_after(_utc(start + validity_s))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(str(uri))]), critical=False)
            .sign(key, None)  # ML-DSA signs the message itself: no separate hash
        )
        return cls(cert, key)

    def issue(self, uri: NodeURI, public_key: object, *,
              validity_s: int = DEFAULT_NODE_VALIDITY_S,
              not_before: float | None = None) -> x509.Certificate:
        """A node certificate for `uri` over `public_key` (ML-DSA-65), capped at the CA's end."""
        if uri.federation != self.federation:
            raise CertificateError("federation", f"{uri.federation!r} is not this CA's "
                                                 f"{self.federation!r}")
        if uri.role is Role.CA:
            raise CertificateError("role", "node certificates cannot have the CA role")
        if not 0 < validity_s <= MAX_NODE_VALIDITY_S:
            raise CertificateError("validity", f"{validity_s} s is not in 1..."
                                               f"{MAX_NODE_VALIDITY_S} s (30 days)")
        pub = check_ml_dsa_65_key(public_key)
        start = int(_now(None)) - BACKDATE_S if not_before is None else int(not_before)
        end = min(start + validity_s, int(self.certificate.not_valid_after_utc.timestamp()))
        ca_ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        usages = ROLE_USAGES[uri.role]
        return (
            x509.CertificateBuilder()
            .subject_name(subject_name(uri)).issuer_name(self.certificate.subject)
            .public_key(pub).serial_number(x509.random_serial_number())
            .not_valid_before(_utc(start)).not_valid_after(_utc(end))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [_EKU_OID[u] for u in (Usage.SERVER, Usage.CLIENT) if u in usages]),
                critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_ski), critical=False)
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(str(uri))]), critical=False)
            .sign(self.key, None)
        )

    def revocation_list(self, serials: Iterable[int], number: int, *,
                        validity_s: int = DEFAULT_CRL_VALIDITY_S,
                        now: float | None = None) -> x509.CertificateRevocationList:
        """An X.509 v2 CRL (RFC 5280 §5) signed with ML-DSA-65; `number` must grow with
        every CRL the CA publishes (nodes refuse a lower one)."""
        if number < 0:
            raise CertificateError("crl.crl_number", "must be a non-negative integer")
        t = int(_now(now))
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(_utc(t)).next_update(_utc(t + validity_s))
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
        )
        for serial in sorted(set(serials)):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(_utc(t)).build())
        return builder.sign(self.key, None)

    def new_node(self, uri: NodeURI, *, validity_s: int = DEFAULT_NODE_VALIDITY_S
                 ) -> tuple[x509.Certificate, mldsa.MLDSA65PrivateKey]:
        """Key and certificate made here (tests, local demos); sites use the CSR flow."""
        key = mldsa.MLDSA65PrivateKey.generate()
        return self.issue(uri, key.public_key(), validity_s=validity_s), key

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "ca.crt").write_bytes(certificate_pem(self.certificate))
        write_private_key(directory / "ca.key", self.key)

    @classmethod
    def load(cls, directory: Path) -> X509CertificateAuthority:
        cert = load_certificate_pem((directory / "ca.crt").read_bytes(), "root")
        return cls(cert, load_private_key_pem((directory / "ca.key").read_bytes()))
