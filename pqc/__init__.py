"""pqfed's post-quantum cryptography: the public API other packages and users build on.

    from pqfed.pqc import CertificateAuthority, Role, HandshakeConfig, connect

* identities and the CA: `CertificateAuthority`, `Identity`, `Certificate`, `TrustAnchor`,
  `Role`, `check_name`;
* revocation: `RevocationList`, `RevokedCertificate`, `RevocationReason`, and `TrustStore`
  (the CA with its revocation list, re-read when the file changes);
* the pqfed1 channel: `HandshakeConfig`, `Group`, `Suite`, `connect`, `client_channel`,
  `server_channel`, `SecureChannel`, `Session`, `HandshakeStats`, `KeySharePool`,
  `default_suites` (this host's AEAD preference, for `HandshakeConfig.suites`);
* signed model updates and models: `sign_update`, `verify_update`, `SignedUpdate`,
  `UpdateManifest`, `sign_model`, `verify_model`, `SignedModel`, `ModelManifest`,
  `ModelRejected`, `EPOCH_LEN`;
* the signed audit log: `AuditLog`, `verify_audit_log`;
* errors: `PqcError` and its subclasses, each naming the field at fault.

X.509 identities and the TLS 1.3 channel are `pqfed.pqc.pki` and `pqfed.pqc.tls13`; the
sidecar is `pqfed.pqc.sidecar`. Names load on first use (PEP 562 `__getattr__`), so importing
this package costs nothing until a name is used: the sidecar image starts without the signing
or audit modules, and the CLI's `--help` without any cryptography.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pqfed.pqc.audit import AuditLog, verify_audit_log
    from pqfed.pqc.channel import (
        HandshakeStats,
        SecureChannel,
        client_channel,
        connect,
        server_channel,
    )
    from pqfed.pqc.errors import (
        AuditLogError,
        CertificateError,
        ChannelClosed,
        DecodeError,
        HandshakeError,
        InvalidSignature,
        PqcError,
        RecordError,
        RevocationListError,
        UpdateRejected,
    )
    from pqfed.pqc.handshake import Group, HandshakeConfig, Session, Suite
    from pqfed.pqc.identity import (
        Certificate,
        CertificateAuthority,
        Identity,
        Role,
        TrustAnchor,
        check_name,
    )
    from pqfed.pqc.pool import KeySharePool, default_suites
    from pqfed.pqc.revocation import RevocationList, RevocationReason, RevokedCertificate
    from pqfed.pqc.signing import (
        EPOCH_LEN,
        ModelManifest,
        ModelRejected,
        SignedModel,
        SignedUpdate,
        UpdateManifest,
        sign_model,
        sign_update,
        verify_model,
        verify_update,
    )
    from pqfed.pqc.truststore import TrustStore

_EXPORTS: dict[str, tuple[str, ...]] = {
    "audit": ("AuditLog", "verify_audit_log"),
    "channel": ("HandshakeStats", "SecureChannel", "client_channel", "connect",
                "server_channel"),
    "errors": ("AuditLogError", "CertificateError", "ChannelClosed", "DecodeError",
               "HandshakeError", "InvalidSignature", "PqcError", "RecordError",
               "RevocationListError", "UpdateRejected"),
    "handshake": ("Group", "HandshakeConfig", "Session", "Suite"),
    "identity": ("Certificate", "CertificateAuthority", "Identity", "Role", "TrustAnchor",
                 "check_name"),
    "pool": ("KeySharePool", "default_suites"),
    "revocation": ("RevocationList", "RevocationReason", "RevokedCertificate"),
    "signing": ("EPOCH_LEN", "ModelManifest", "ModelRejected", "SignedModel", "SignedUpdate",
                "UpdateManifest", "sign_model", "sign_update", "verify_model", "verify_update"),
    "truststore": ("TrustStore",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "EPOCH_LEN",
    "AuditLog",
    "AuditLogError",
    "Certificate",
    "CertificateAuthority",
    "CertificateError",
    "ChannelClosed",
    "DecodeError",
    "Group",
    "HandshakeConfig",
    "HandshakeError",
    "HandshakeStats",
    "Identity",
    "InvalidSignature",
    "KeySharePool",
    "ModelManifest",
    "ModelRejected",
    "PqcError",
    "RecordError",
    "RevocationList",
    "RevocationListError",
    "RevocationReason",
    "RevokedCertificate",
    "Role",
    "SecureChannel",
    "Session",
    "SignedModel",
    "SignedUpdate",
    "Suite",
    "TrustAnchor",
    "TrustStore",
    "UpdateManifest",
    "UpdateRejected",
    "check_name",
    "client_channel",
    "connect",
    "default_suites",
    "server_channel",
    "sign_model",
    "sign_update",
    "verify_audit_log",
    "verify_model",
    "verify_update",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'pqfed.pqc' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"pqfed.pqc.{module}"), name)
    globals()[name] = value  # the next lookup skips __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
