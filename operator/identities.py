"""Secret payloads of a job's PQC identities: the federation CA and one node identity per pod.

Kept apart from the pure reconcile logic because key generation is random; kept apart from the
kopf wiring so it is testable without a cluster. The key formats are those of `pqfed ca init`
and `pqfed ca issue` (pqc/cli.py), so a Secret can be inspected with the same tools.

A job whose `channel.protocol` is tls13 gets, beside them, the X.509 twins of the same
objects (`pqfed ca x509-init|sign|x509-crl`, profile in docs/pki.md): an X.509 ML-DSA-65 CA,
one X.509 node certificate per identity (its own key; same node id, role and lifetime) and an
X.509 CRL numbered like the pqfed list. The sidecars authenticate the TLS 1.3 channel with the
X.509 ones; the Flower apps keep signing updates with the pqfed ones. Renewal and revocation
always handle both, so a node revoked or renewed in one form is so in the other.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from pqfed.pqc import (
    Certificate,
    CertificateAuthority,
    CertificateError,
    DecodeError,
    Identity,
    RevocationList,
    RevocationListError,
    RevocationReason,
    RevokedCertificate,
    Role,
    TrustAnchor,
)
from pqfed.pqc.pki import NodeURI, X509CertificateAuthority, X509TrustAnchor
from pqfed.pqc.pki.profile import (
    MAX_NODE_VALIDITY_S,
    certificate_pem,
    load_certificate_pem,
    load_private_key_pem,
    private_key_pem,
)
from pqfed.pqc.truststore import CRL_FILE, load_x509_crl

CRL_KEY = CRL_FILE  # the Secret key is the file name in the mounted identity directory
# The X.509 twins (tls13 jobs), in the same Secrets. The pods see them in the subdirectory
# `x509/` of their identity directory, as tls.crt, tls.key, ca.crt and crl.pem: the layout of
# `pqfed ca csr --out DIR` plus the CA's files, which `pqfed sidecar --protocol tls13` reads.
X509_CERT_KEY = "x509.crt"
X509_KEY_KEY = "x509.key"
X509_CA_KEY = "x509-ca.crt"
X509_CA_PRIVATE_KEY = "x509-ca.key"
X509_CRL_KEY = "x509-crl.pem"
X509_PREVIOUS_CERT_KEY = "x509-previous.crt"
BACKDATE_S = 300  # CertificateAuthority.issue: not_before = now - 300 by default
PREVIOUS_CERT_KEY = "previous.crt"  # the certificate a renewal replaced (maybe still valid)


def issue_ca(federation: str, algorithm: str, *, x509_ca: bool = False) -> dict[str, str]:
    """A fresh federation CA as Secret data (`ca.crt`, `ca.key`); with `x509_ca`, also an
    X.509 ML-DSA-65 CA for the same federation (`x509-ca.crt`, `x509-ca.key`)."""
    ca = CertificateAuthority.generate(federation=federation, algorithm=algorithm)
    data = {"ca.crt": ca.root.to_pem(), "ca.key": ca.identity.private_key_pem()}
    if x509_ca:
        # No longer than the pqfed CA: both end together and renewals never outlive either.
        root = X509CertificateAuthority.generate(
            federation, validity_s=ca.root.not_after - ca.root.not_before)
        data[X509_CA_KEY] = certificate_pem(root.certificate).decode()
        data[X509_CA_PRIVATE_KEY] = private_key_pem(root.key).decode()
    return data


def load_ca(data: Mapping[str, str]) -> CertificateAuthority:
    """The CA from Secret data (decoded strings)."""
    return CertificateAuthority(Identity.load(data["ca.crt"], data["ca.key"]))


def load_x509_ca(data: Mapping[str, str]) -> X509CertificateAuthority | None:
    """The X.509 CA from the CA Secret's data, or None for a pqfed1-only job."""
    if X509_CA_KEY not in data:
        return None
    return X509CertificateAuthority(load_certificate_pem(data[X509_CA_KEY], "root"),
                                    load_private_key_pem(data[X509_CA_PRIVATE_KEY].encode()))


def issue_identity(ca: CertificateAuthority, node_id: str, role: Role,
                   algorithm: str, validity_s: int = 86400,
                   previous: Certificate | None = None, *,
                   x509_ca: X509CertificateAuthority | None = None,
                   x509_previous: x509.Certificate | None = None) -> dict[str, str]:
    """A node identity signed by `ca` as Secret data (`tls.crt`, `tls.key`, `ca.crt`), the
    layout `pqfed sidecar` and `pqfed fl` read from /etc/pqfed/identity. On renewal,
    `previous` is kept as `previous.crt` so that revoking the node revokes both. With
    `x509_ca`, also the node's X.509 certificate and key (own key, same lifetime) and the
    X.509 CA certificate, `x509_previous` kept likewise."""
    # issue() backdates not_before by BACKDATE_S (clock skew): add it back, so the certificate
    # is usable `validity_s` from now; never past the CA (issue() refuses that).
    start = int(time.time()) - BACKDATE_S
    validity = min(validity_s + BACKDATE_S, ca.root.not_after - start - 5)
    ident = ca.new_identity(node_id, role, algorithm=algorithm, validity_s=validity)
    data = {"tls.crt": ident.certificate.to_pem(), "tls.key": ident.private_key_pem(),
            "ca.crt": ca.root.to_pem()}
    if previous is not None:
        data[PREVIOUS_CERT_KEY] = previous.to_pem()
    if x509_ca is not None:
        uri = NodeURI(x509_ca.federation, role, node_id)
        cert, key = x509_ca.new_node(
            uri, validity_s=min(validity_s + BACKDATE_S, MAX_NODE_VALIDITY_S))
        data[X509_CERT_KEY] = certificate_pem(cert).decode()
        data[X509_KEY_KEY] = private_key_pem(key).decode()
        data[X509_CA_KEY] = certificate_pem(x509_ca.certificate).decode()
        if x509_previous is not None:
            data[X509_PREVIOUS_CERT_KEY] = certificate_pem(x509_previous).decode()
    return data


def x509_serials(data: Mapping[str, str]) -> tuple[int, ...]:
    """The X.509 serials an identity Secret holds (current, then the one it renewed)."""
    out = []
    for key in (X509_CERT_KEY, X509_PREVIOUS_CERT_KEY):
        if key in data:
            try:
                out.append(load_certificate_pem(data[key], key).serial_number)
            except CertificateError:
                continue
    return tuple(out)


def read_x509_crl(data: Mapping[str, str], root: x509.Certificate) -> frozenset[int] | None:
    """The serials of the X.509 CRL in a CRL Secret, if it is there and `root`'s CA signed
    it (checked as of its own issue time, as the sidecars admit it)."""
    try:
        crl = load_x509_crl(data[X509_CRL_KEY].encode())
        anchor = X509TrustAnchor(root).with_crl(crl, now=crl.last_update_utc.timestamp())
    except (KeyError, CertificateError, ValueError):
        return None
    return frozenset(anchor.revoked)


def read_crl(data: Mapping[str, str], root: Certificate) -> RevocationList | None:
    """The list in a CRL Secret, if it is there and `root`'s CA signed it."""
    try:
        return TrustAnchor(root, RevocationList.from_pem(data[CRL_KEY])).crl
    except (KeyError, DecodeError, RevocationListError):
        return None


def next_crl(ca: CertificateAuthority, previous: RevocationList | None,
             revoke: Iterable[tuple[int, RevocationReason]], now: int,
             validity_s: int, *, x509_ca: X509CertificateAuthority | None = None,
             x509_previous: Iterable[int] = (), x509_revoke: Iterable[int] = ()
             ) -> dict[str, str]:
    """The next revocation list as Secret data: `previous`'s entries plus `revoke`, numbered
    above both `previous` and any list ever published (the number is at least the time in
    seconds, so a lost or tampered Secret cannot make the operator reuse a number a node saw).
    With `x509_ca`, also the X.509 CRL (RFC 5280) with the same number: `x509_previous`'s
    serials plus `x509_revoke`.
    """
    entries = {e.serial: e for e in (previous.revoked if previous else ())}
    for serial, reason in revoke:
        entries.setdefault(serial, RevokedCertificate(serial, now, reason))
    number = max(now, previous.number + 1 if previous else 0)
    crl = ca.sign_crl(number, list(entries.values()), validity_s=validity_s, this_update=now)
    data = {CRL_KEY: crl.to_pem()}
    if x509_ca is not None:
        serials = {*x509_previous, *x509_revoke}
        x509_crl = x509_ca.revocation_list(serials, number, validity_s=validity_s, now=now)
        data[X509_CRL_KEY] = x509_crl.public_bytes(Encoding.PEM).decode()
    return data
