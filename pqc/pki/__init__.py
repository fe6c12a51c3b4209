"""Standard PKI for pqfed: X.509 certificates and CRLs with ML-DSA-65, PKCS#10 enrolment.

Beside the pqfed certificate format (`pqfed.pqc.identity`); the TLS 1.3 channel using these
certificates is `pqfed.pqc.tls13`. docs/pki.md describes the profile and the flow.
"""

from pqfed.pqc.pki.csr import IssuancePolicy, check_request, make_request, sign_request
from pqfed.pqc.pki.profile import (
    ROLE_USAGES,
    NodeCertificate,
    Usage,
    X509CertificateAuthority,
    X509TrustAnchor,
    read_node_uri,
)
from pqfed.pqc.pki.uri import NodeURI

__all__ = [
    "ROLE_USAGES",
    "IssuancePolicy",
    "NodeCertificate",
    "NodeURI",
    "Usage",
    "X509CertificateAuthority",
    "X509TrustAnchor",
    "check_request",
    "make_request",
    "read_node_uri",
    "sign_request",
]
