"""Secret payloads of a job's PQC identities: the federation CA and one node identity per pod.

Kept apart from the pure reconcile logic because key generation is random; kept apart from the
kopf wiring so it is testable without a cluster. The key formats are those of `pqfed ca init`
and `pqfed ca issue` (pqc/cli.py), so a Secret can be inspected with the same tools.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from pqfed.pqc.errors import DecodeError, RevocationListError
from pqfed.pqc.identity import Certificate, CertificateAuthority, Identity, Role, TrustAnchor
from pqfed.pqc.revocation import RevocationList, RevocationReason, RevokedCertificate
from pqfed.pqc.truststore import CRL_FILE

CRL_KEY = CRL_FILE  # the Secret key is the file name in the mounted identity directory
BACKDATE_S = 300  # CertificateAuthority.issue: not_before = now - 300 by default
PREVIOUS_CERT_KEY = "previous.crt"  # the certificate a renewal replaced (maybe still valid)


def issue_ca(federation: str, algorithm: str) -> dict[str, str]:
    """A fresh federation CA as Secret data (`ca.crt`, `ca.key`)."""
    ca = CertificateAuthority.generate(federation=federation, algorithm=algorithm)
    return {"ca.crt": ca.root.to_pem(), "ca.key": ca.identity.private_key_pem()}


def load_ca(data: Mapping[str, str]) -> CertificateAuthority:
    """The CA from Secret data (decoded strings)."""
    return CertificateAuthority(Identity.load(data["ca.crt"], data["ca.key"]))


def issue_identity(ca: CertificateAuthority, node_id: str, role: Role,
                   algorithm: str, validity_s: int = 86400,
                   previous: Certificate | None = None) -> dict[str, str]:
    """A node identity signed by `ca` as Secret data (`tls.crt`, `tls.key`, `ca.crt`), the
    layout `pqfed sidecar` and `pqfed fl` read from /etc/pqfed/identity. On renewal,
    `previous` is kept as `previous.crt` so that revoking the node revokes both."""
    # issue() backdates not_before by BACKDATE_S (clock skew): add it back, so the certificate
    # is usable `validity_s` from now; never past the CA (issue() refuses that).
    start = int(time.time()) - BACKDATE_S
    validity = min(validity_s + BACKDATE_S, ca.root.not_after - start - 5)
    ident = ca.new_identity(node_id, role, algorithm=algorithm, validity_s=validity)
    data = {"tls.crt": ident.certificate.to_pem(), "tls.key": ident.private_key_pem(),
            "ca.crt": ca.root.to_pem()}
    if previous is not None:
        data[PREVIOUS_CERT_KEY] = previous.to_pem()
    return data


def read_crl(data: Mapping[str, str], root: Certificate) -> RevocationList | None:
    """The list in a CRL Secret, if it is there and `root`'s CA signed it."""
    try:
        return TrustAnchor(root, RevocationList.from_pem(data[CRL_KEY])).crl
    except (KeyError, DecodeError, RevocationListError):
        return None


def next_crl(ca: CertificateAuthority, previous: RevocationList | None,
             revoke: Iterable[tuple[int, RevocationReason]], now: int,
             validity_s: int) -> dict[str, str]:
    """The next revocation list as Secret data: `previous`'s entries plus `revoke`, numbered
    above both `previous` and any list ever published (the number is at least the time in
    seconds, so a lost or tampered Secret cannot make the operator reuse a number a node saw).
    """
    entries = {e.serial: e for e in (previous.revoked if previous else ())}
    for serial, reason in revoke:
        entries.setdefault(serial, RevokedCertificate(serial, now, reason))
    number = max(now, previous.number + 1 if previous else 0)
    crl = ca.sign_crl(number, list(entries.values()), validity_s=validity_s, this_update=now)
    return {CRL_KEY: crl.to_pem()}
