"""Secret payloads of a job's PQC identities: the federation CA and one node identity per pod.

Kept apart from the pure reconcile logic because key generation is random; kept apart from the
kopf wiring so it is testable without a cluster. The key formats are those of `pqfed ca init`
and `pqfed ca issue` (pqc/cli.py), so a Secret can be inspected with the same tools.
"""

from __future__ import annotations

from collections.abc import Mapping

from pqfed.pqc.identity import CertificateAuthority, Identity, Role


def issue_ca(federation: str, algorithm: str) -> dict[str, str]:
    """A fresh federation CA as Secret data (`ca.crt`, `ca.key`)."""
    ca = CertificateAuthority.generate(federation=federation, algorithm=algorithm)
    return {"ca.crt": ca.root.to_pem(), "ca.key": ca.identity.private_key_pem()}


def load_ca(data: Mapping[str, str]) -> CertificateAuthority:
    """The CA from Secret data (decoded strings)."""
    return CertificateAuthority(Identity.load(data["ca.crt"], data["ca.key"]))


def issue_identity(ca: CertificateAuthority, node_id: str, role: Role,
                   algorithm: str) -> dict[str, str]:
    """A node identity signed by `ca` as Secret data (`tls.crt`, `tls.key`, `ca.crt`), the
    layout `pqfed sidecar` and `pqfed fl` read from /etc/pqfed/identity."""
    ident = ca.new_identity(node_id, role, algorithm=algorithm)
    return {"tls.crt": ident.certificate.to_pem(), "tls.key": ident.private_key_pem(),
            "ca.crt": ca.root.to_pem()}
