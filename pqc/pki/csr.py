"""Site-held keys: a node makes its ML-DSA-65 key and a PKCS#10 request; the CA signs it.

The flow follows RFC 2986 (PKCS#10) and the usual enrolment practice (cert-manager's
CertificateRequest, RFC 7030 EST): the private key is generated where it will be used and never
leaves it; the request's self-signature is the proof of possession of that key; the CA admin
checks the requested identity against a policy and builds the certificate from its own profile
(`pqfed.pqc.pki.profile`), copying nothing from the request but the checked node URI and the
public key.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import mldsa

from pqfed.pqc.errors import CertificateError
from pqfed.pqc.identity import Role
from pqfed.pqc.pki.profile import (
    DEFAULT_NODE_VALIDITY_S,
    MAX_NODE_VALIDITY_S,
    X509CertificateAuthority,
    check_ml_dsa_65_key,
    read_node_uri,
    subject_name,
)
from pqfed.pqc.pki.uri import NodeURI

# What a request may ask for; everything else (CA:TRUE, key usages, other names) is the CA's
# decision, so a request carrying it is refused rather than silently ignored.
_REQUESTABLE = frozenset({x509.SubjectAlternativeName.oid, x509.BasicConstraints.oid})
NODE_ROLES = (Role.AGGREGATOR, Role.CLIENT, Role.EDGE, Role.OPERATOR)


def make_request(uri: NodeURI) -> tuple[mldsa.MLDSA65PrivateKey, x509.CertificateSigningRequest]:
    """A fresh ML-DSA-65 key and a PKCS#10 request for `uri`, signed with that key."""
    if uri.role is Role.CA:
        raise CertificateError("role", "a node cannot request the CA role")
    key = mldsa.MLDSA65PrivateKey.generate()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject_name(uri))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(uri))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, None)
    )
    return key, csr


def load_request_pem(pem: bytes) -> x509.CertificateSigningRequest:
    try:
        return x509.load_pem_x509_csr(pem)
    except ValueError as exc:
        raise CertificateError("csr", f"not a PEM PKCS#10 request: {exc}") from None


def request_pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True, slots=True)
class IssuancePolicy:
    """What the CA admin allows for one request."""

    roles: tuple[Role, ...] = NODE_ROLES
    node_id: str | None = None  # the node id the admin expects (None: any valid label)
    validity_s: int = DEFAULT_NODE_VALIDITY_S

    def __post_init__(self) -> None:
        if not self.roles or Role.CA in self.roles:
            raise CertificateError("policy.roles", "give one or more node roles (never ca)")
        if not 0 < self.validity_s <= MAX_NODE_VALIDITY_S:
            raise CertificateError("policy.validity", f"{self.validity_s} s is not in "
                                                      f"1...{MAX_NODE_VALIDITY_S} s")


def check_request(csr: x509.CertificateSigningRequest, federation: str,
                  policy: IssuancePolicy) -> NodeURI:
    """Checks a request against the policy; raises CertificateError naming the field."""
    if not csr.is_signature_valid:
        raise CertificateError("signature", "the request's signature does not verify: no "
                                            "proof of possession of the private key")
    check_ml_dsa_65_key(csr.public_key())
    for ext in csr.extensions:
        if ext.oid not in _REQUESTABLE:
            raise CertificateError("extensions", f"{ext.oid.dotted_string} cannot be "
                                                 "requested; the CA sets it")
    try:
        bc = csr.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is not None and bc.ca:
        raise CertificateError("basic_constraints", "a node cannot request CA:TRUE")
    uri = read_node_uri(csr)
    if uri.federation != federation:
        raise CertificateError("federation", f"{uri.federation!r} is not this CA's "
                                             f"{federation!r}")
    if uri.role not in policy.roles:
        allowed = ", ".join(r.name.lower() for r in policy.roles)
        raise CertificateError("role", f"{uri.role.name.lower()} is not allowed here "
                                       f"(allowed: {allowed})")
    if policy.node_id is not None and uri.node_id != policy.node_id:
        raise CertificateError("node_id", f"{uri.node_id!r} is not the expected "
                                          f"{policy.node_id!r}")
    return uri


def sign_request(ca: X509CertificateAuthority, csr: x509.CertificateSigningRequest,
                 policy: IssuancePolicy) -> x509.Certificate:
    """Issues the node certificate for an accepted request (the CA's profile, not the
    request's extensions)."""
    uri = check_request(csr, ca.federation, policy)
    return ca.issue(uri, csr.public_key(), validity_s=policy.validity_s)
