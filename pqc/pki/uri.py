"""The node URI carried in a certificate's subjectAltName: `pqfed://<federation>/<role>/<node_id>`.

Grammar (ABNF, RFC 5234; the URI is also a valid RFC 3986 URI with an authority and a path):

    node-uri   = "pqfed://" federation "/" role "/" node-id
    federation = label
    node-id    = label
    role       = "ca" / "aggregator" / "client" / "edge" / "operator"
    label      = alnum [ *61( lower / DIGIT / "-" / "." ) alnum ]   ; 1-63 characters
    alnum      = lower / DIGIT
    lower      = %x61-7A                                               ; a-z only

No other form is accepted: no upper case (the scheme included), no userinfo, port, query,
fragment, percent-encoding, empty segment or trailing slash. Two certificates name the same
node exactly when their URIs are equal byte for byte. The CA's own URI is
`pqfed://<federation>/ca/ca` (the `ca` role and node id, as in the pqfed certificate format).
Like a SPIFFE ID in an X.509-SVID, the URI is the identity; the subject name is for humans.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pqfed.pqc.errors import CertificateError
from pqfed.pqc.identity import Role

SCHEME = "pqfed"
CA_NODE_ID = "ca"
_LABEL = r"[a-z0-9](?:[a-z0-9.-]{0,61}[a-z0-9])?"
_ROLE = "|".join(r.name.lower() for r in Role)
_URI = re.compile(
    rf"pqfed://(?P<federation>{_LABEL})/(?P<role>{_ROLE})/(?P<node_id>{_LABEL})")
_LABEL_ONLY = re.compile(_LABEL)


def check_label(field: str, value: str) -> str:
    """A federation or node id: 1-63 of a-z, 0-9, '-', '.', starting and ending alphanumeric."""
    if not _LABEL_ONLY.fullmatch(value):
        raise CertificateError(
            field, f"{value!r} must be 1-63 lowercase letters, digits, '-' or '.', starting "
                   "and ending with a letter or digit (a DNS label, like Kubernetes names)")
    return value


@dataclass(frozen=True, slots=True)
class NodeURI:
    """A parsed node URI; `str()` gives back the exact text that was parsed."""

    federation: str
    role: Role
    node_id: str

    def __post_init__(self) -> None:
        check_label("federation", self.federation)
        check_label("node_id", self.node_id)
        if (self.role is Role.CA) != (self.node_id == CA_NODE_ID):
            raise CertificateError(
                "node_id", "the node id 'ca' is reserved for the CA role and the CA role "
                           "must use the node id 'ca'")

    def __str__(self) -> str:
        return f"{SCHEME}://{self.federation}/{self.role.name.lower()}/{self.node_id}"

    @classmethod
    def parse(cls, text: str, field: str = "subject_alt_name") -> NodeURI:
        """Parses `text` strictly (module docstring); raises CertificateError(field)."""
        m = _URI.fullmatch(text)
        if m is None:
            raise CertificateError(
                field, f"{text!r} is not a node URI pqfed://<federation>/<role>/<node_id> "
                       "(lowercase labels of 1-63 characters; roles: "
                       f"{_ROLE.replace('|', ', ')}; nothing else)")
        return cls(m["federation"], Role[m["role"].upper()], m["node_id"])
