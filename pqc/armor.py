"""PEM-style armor (RFC 7468 textual encoding) for pqfed certificates and keys."""

from __future__ import annotations

import base64
import binascii

from pqfed.pqc.errors import DecodeError


def armor(label: str, data: bytes) -> str:
    body = base64.b64encode(data).decode("ascii")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----", ""])


def unarmor(label: str, text: str) -> bytes:
    begin, end = f"-----BEGIN {label}-----", f"-----END {label}-----"
    stripped = text.strip()
    if not stripped.startswith(begin) or not stripped.endswith(end):
        raise DecodeError(label, f"expected text between '{begin}' and '{end}'")
    body = "".join(stripped[len(begin) : -len(end)].split())
    if not body.isascii():  # b64decode would raise a bare ValueError for these
        raise DecodeError(label, "invalid base64: a character outside ASCII")
    try:
        return base64.b64decode(body, validate=True)
    except binascii.Error as exc:
        raise DecodeError(label, f"invalid base64: {exc}") from exc
