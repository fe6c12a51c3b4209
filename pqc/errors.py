"""Typed errors of pqfed.pqc.

Every error names what it concerns (a field, a peer, a backend) so that a log line or a CLI
message tells the operator what went wrong and, where it can, how to fix it.
"""

from __future__ import annotations


class PqcError(Exception):
    """Base class of every error raised by pqfed.pqc."""


class BackendUnavailable(PqcError):
    """A selected cryptographic backend cannot be used on this host."""

    def __init__(self, backend: str, reason: str) -> None:
        super().__init__(f"crypto backend {backend!r} is unavailable: {reason}")
        self.backend = backend
        self.reason = reason


class UnsupportedAlgorithm(PqcError):
    """An algorithm name that no backend (or not this backend) implements."""

    def __init__(self, algorithm: str, supported: tuple[str, ...]) -> None:
        super().__init__(
            f"unsupported algorithm {algorithm!r}; choose one of: {', '.join(supported)}"
        )
        self.algorithm = algorithm


class InvalidSignature(PqcError):
    """A signature did not verify under the given public key."""


class DecodeError(PqcError):
    """A wire structure is malformed; `field` names the first offending field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"malformed {field}: {reason}")
        self.field = field
        self.reason = reason


class CertificateError(PqcError):
    """A node certificate is malformed, expired, not yet valid or not issued by our CA."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"certificate rejected ({field}): {reason}")
        self.field = field
        self.reason = reason


class HandshakeError(PqcError):
    """The handshake failed; the channel must be closed. `field` names the failing step/field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"handshake failed at {field}: {reason}")
        self.field = field
        self.reason = reason


class RecordError(PqcError):
    """A protected record was rejected (tampered, replayed, reordered, truncated or oversized)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"record rejected ({field}): {reason}")
        self.field = field
        self.reason = reason


class ChannelClosed(PqcError):
    """The peer closed the channel with an authenticated close (not an error of the peer)."""


class UpdateRejected(PqcError):
    """A signed model update failed verification and must not be used."""

    def __init__(self, node_id: str, reason: str) -> None:
        super().__init__(f"update from {node_id!r} rejected: {reason}")
        self.node_id = node_id
        self.reason = reason


class AuditLogError(PqcError):
    """The audit log's hash chain or a signature in it does not verify."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"audit log line {line}: {reason}")
        self.line = line
        self.reason = reason


class RevocationListError(PqcError):
    """A certificate revocation list is malformed, not signed by our CA, stale or older than
    one already seen (rollback)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"revocation list rejected ({field}): {reason}")
        self.field = field
        self.reason = reason
