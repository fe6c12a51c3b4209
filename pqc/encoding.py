"""Strict length-prefixed encoding for every pqfed wire structure.

Integers are big-endian (network order, as in TLS's presentation language, RFC 8446 §3).
Variable-length fields carry an explicit length prefix and a per-field maximum; a reader
refuses short input, over-long fields and trailing bytes, naming the field it was reading.
"""

from __future__ import annotations

import struct

from pqfed.pqc.errors import DecodeError


class Writer:
    """Builds a byte string field by field."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, value: int) -> Writer:
        self._parts.append(struct.pack(">B", value))
        return self

    def u16(self, value: int) -> Writer:
        self._parts.append(struct.pack(">H", value))
        return self

    def u32(self, value: int) -> Writer:
        self._parts.append(struct.pack(">I", value))
        return self

    def u64(self, value: int) -> Writer:
        self._parts.append(struct.pack(">Q", value))
        return self

    def raw(self, value: bytes) -> Writer:
        self._parts.append(bytes(value))
        return self

    def vec8(self, value: bytes) -> Writer:
        if len(value) > 0xFF:
            raise ValueError(f"field too long for a 1-byte length: {len(value)}")
        return self.u8(len(value)).raw(value)

    def vec16(self, value: bytes) -> Writer:
        if len(value) > 0xFFFF:
            raise ValueError(f"field too long for a 2-byte length: {len(value)}")
        return self.u16(len(value)).raw(value)

    def vec32(self, value: bytes) -> Writer:
        if len(value) > 0xFFFFFFFF:
            raise ValueError(f"field too long for a 4-byte length: {len(value)}")
        return self.u32(len(value)).raw(value)

    def text(self, value: str) -> Writer:
        return self.vec8(value.encode("utf-8"))

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


class Reader:
    """Parses a byte string field by field; every read names its field for error messages."""

    __slots__ = ("_data", "_pos", "_structure")

    def __init__(self, data: bytes, structure: str) -> None:
        self._data = memoryview(bytes(data))
        self._pos = 0
        self._structure = structure

    def _take(self, n: int, field: str) -> bytes:
        if n < 0 or self._pos + n > len(self._data):
            raise _decode_error(
                self._structure,
                field,
                f"needs {n} bytes, {len(self._data) - self._pos} left (truncated)",
            )
        out = bytes(self._data[self._pos : self._pos + n])
        self._pos += n
        return out

    def u8(self, field: str) -> int:
        return int(self._take(1, field)[0])

    def u16(self, field: str) -> int:
        return int(struct.unpack(">H", self._take(2, field))[0])

    def u32(self, field: str) -> int:
        return int(struct.unpack(">I", self._take(4, field))[0])

    def u64(self, field: str) -> int:
        return int(struct.unpack(">Q", self._take(8, field))[0])

    def raw(self, n: int, field: str) -> bytes:
        return self._take(n, field)

    def _check_len(self, n: int, field: str, min_len: int, max_len: int) -> None:
        if not min_len <= n <= max_len:
            raise _decode_error(
                self._structure, field, f"length {n} outside [{min_len}, {max_len}]"
            )

    def vec8(self, field: str, min_len: int = 0, max_len: int = 0xFF) -> bytes:
        n = self.u8(f"{field}.length")
        self._check_len(n, field, min_len, max_len)
        return self._take(n, field)

    def vec16(self, field: str, min_len: int = 0, max_len: int = 0xFFFF) -> bytes:
        n = self.u16(f"{field}.length")
        self._check_len(n, field, min_len, max_len)
        return self._take(n, field)

    def vec32(self, field: str, min_len: int = 0, max_len: int = 0xFFFFFFFF) -> bytes:
        n = self.u32(f"{field}.length")
        self._check_len(n, field, min_len, max_len)
        return self._take(n, field)

    def text(self, field: str, min_len: int = 1, max_len: int = 0xFF) -> str:
        raw = self.vec8(field, min_len, max_len)
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _decode_error(self._structure, field, "not valid UTF-8") from exc
        if not value.isprintable():
            raise _decode_error(self._structure, field, "contains control characters")
        return value

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def finish(self) -> None:
        """Refuses trailing bytes: a structure is exactly as long as its fields."""
        if self.remaining:
            raise _decode_error(self._structure, "end", f"{self.remaining} trailing bytes")


def _decode_error(structure: str, field: str, reason: str) -> DecodeError:
    return DecodeError(f"{structure}.{field}", reason)
