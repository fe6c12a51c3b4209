"""An HTTP/1.1 request allow-list for the sidecar's inbound direction.

The aggregator's SuperLink serves its Fleet, Control and ServerApp APIs on one port. The
sidecar authenticates *who* connects; this filter limits *what* they may ask: only requests
whose path starts with an allowed prefix (the Fleet API) pass, so an enrolled client cannot
reach the Control API (start/stop runs) through its channel.

Framing follows RFC 9112 (§6 message body length, §7.1 chunked coding), and the filter
refuses the ambiguous cases that enable request smuggling (RFC 9112 §6.3, §11.2): both
Content-Length and Transfer-Encoding, conflicting Content-Length values, obsolete line
folding, transfer codings other than a single "chunked", and dot segments or encoded dots
in the path that a server might normalise past the prefix check.

Upstream parsers disagree on bare CR, bare LF and other control bytes (an h11 upstream took a
bare LF inside a header value as a line end). So no CR, LF, NUL or other control byte may
appear inside any line of the head, a chunk-size line or a trailer (RFC 9110 §5.5 field values:
VCHAR, obs-text, SP, HTAB), the head and trailer sections have hard size limits, and what is
forwarded is re-serialised from what was parsed (request line, `name: value` lines, bare
chunk sizes without extensions, trailers dropped), never the peer's bytes as they came.

With `peer` set, every forwarded request carries `X-Pqfed-Peer: <node id of the certificate
that authenticated the channel>` and any such header the peer sent itself is dropped, so the
upstream can bind what it hands out (Flower node ids) to certificates
(services/flower/patches.py, PeerBinding).
"""

from __future__ import annotations

import re

from pqfed.pqc.errors import PqcError

# The HTTP/1.1 implementation of every uvicorn server behind this filter (the SuperLink's
# Fleet API, the aggregator's status API) and of the sidecar's own listeners. uvicorn's default
# ("auto") takes httptools when it is importable and h11 otherwise, and the two parse edge
# cases differently (h11 ends a header line at a bare LF), so the implementation the filter's
# tests ran against is pinned explicitly instead of depending on what is installed.
UPSTREAM_HTTP_IMPLEMENTATION = "httptools"

MAX_HEAD = 64 * 1024
PEER_HEADER = b"X-Pqfed-Peer"  # set by the sidecar only: the channel's certified node id
MAX_CHUNK_LINE = 1024
MAX_TRAILER = 8 * 1024
_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Field value bytes: HTAB, SP, VCHAR, obs-text. Everything else (CR, LF, NUL, DEL, C0) is out.
_FIELD_VALUE = re.compile(rb"^[\t\x20-\x7e\x80-\xff]*$")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@/%-]*(\?[A-Za-z0-9._~!$&'()*+,;=:@/?%-]*)?$")


class RequestRejected(PqcError):
    """An HTTP request on a secure channel violated the sidecar's allow-list."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"HTTP request rejected ({field}): {reason}")
        self.field = field
        self.reason = reason


class HttpRequestFilter:
    """Feed the client->server byte stream; get back the bytes that may be forwarded."""

    def __init__(self, allowed_prefixes: tuple[str, ...],
                 methods: tuple[str, ...] = ("GET", "POST"), peer: str | None = None) -> None:
        if not allowed_prefixes or not all(p.startswith("/") for p in allowed_prefixes):
            raise ValueError("allowed prefixes must be non-empty absolute paths")
        self._peer: list[tuple[bytes, bytes]] = []
        if peer is not None:
            value = peer.encode("ascii", "replace")
            if not value or not _FIELD_VALUE.fullmatch(value):
                raise ValueError(f"peer {peer!r} is not a valid header value")
            self._peer = [(PEER_HEADER, value)]
        self.prefixes = allowed_prefixes
        self.methods = methods
        self._buf = bytearray()
        self._state = "head"
        self._remaining = 0  # body bytes (length mode) or chunk bytes (chunked mode)
        self._trailer = 0  # bytes of the current trailer section
        self.requests = 0

    def feed(self, data: bytes | memoryview) -> bytes:
        self._buf += data
        out = bytearray()
        while self._buf:
            if self._state == "head":
                end = self._buf.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
                if end < 0 or end + 4 > MAX_HEAD:
                    if len(self._buf) > MAX_HEAD or end >= 0:
                        raise RequestRejected("head", f"request head over {MAX_HEAD} bytes")
                    break
                head = bytes(self._buf[: end + 4])
                del self._buf[: end + 4]
                out += self._check_head(head)
            elif self._state == "length":
                n = min(self._remaining, len(self._buf))
                out += self._buf[:n]
                del self._buf[:n]
                self._remaining -= n
                if self._remaining == 0:
                    self._state = "head"
            elif self._state == "chunk-size":
                end = self._buf.find(b"\r\n", 0, MAX_CHUNK_LINE)
                if end < 0:
                    if len(self._buf) >= MAX_CHUNK_LINE:
                        raise RequestRejected("chunk", "chunk-size line too long")
                    break
                line = bytes(self._buf[:end])
                del self._buf[: end + 2]
                size_text, _, extension = line.partition(b";")
                if not re.fullmatch(rb"[0-9A-Fa-f]{1,8}", size_text.strip(b" \t")):
                    raise RequestRejected("chunk", f"invalid chunk size {size_text[:16]!r}")
                if not _FIELD_VALUE.fullmatch(extension):
                    raise RequestRejected("chunk", "control byte in a chunk extension")
                self._remaining = int(size_text.strip(b" \t"), 16)
                out += b"%X\r\n" % self._remaining  # extensions are not forwarded
                self._state = "chunk-data" if self._remaining else "trailer"
                self._trailer = 0
            elif self._state == "chunk-data":
                n = min(self._remaining, len(self._buf))
                out += self._buf[:n]
                del self._buf[:n]
                self._remaining -= n
                if self._remaining == 0:
                    self._state = "chunk-crlf"
            elif self._state == "chunk-crlf":
                if len(self._buf) < 2:
                    break
                if self._buf[:2] != b"\r\n":
                    raise RequestRejected("chunk", "chunk data not followed by CRLF")
                out += b"\r\n"
                del self._buf[:2]
                self._state = "chunk-size"
            elif self._state == "trailer":
                end = self._buf.find(b"\r\n", 0, MAX_TRAILER)
                if end < 0 or self._trailer + end > MAX_TRAILER:
                    if len(self._buf) >= MAX_TRAILER or self._trailer + end > MAX_TRAILER:
                        raise RequestRejected("trailer", f"trailer section over {MAX_TRAILER} "
                                              "bytes")
                    break
                line = bytes(self._buf[:end])
                del self._buf[: end + 2]
                self._trailer += end + 2
                if not line:  # end of the message; trailer fields are checked, not forwarded
                    out += b"\r\n"
                    self._state = "head"
                    continue
                _field(line, "trailer")
        return bytes(out)

    def _check_head(self, head: bytes) -> bytes:
        """Checks a request head; returns it re-serialised from what was parsed."""
        lines = head[:-4].split(b"\r\n")
        if _CONTROL.search(lines[0]):
            raise RequestRejected("request-line", "control byte (bare CR/LF, NUL, ...)")
        try:
            method, target, version = lines[0].decode("ascii").split(" ")
        except (UnicodeDecodeError, ValueError):
            raise RequestRejected("request-line", "not 'METHOD TARGET HTTP/1.1'") from None
        if version != "HTTP/1.1":
            raise RequestRejected("version", f"{version!r} (only HTTP/1.1)")
        if method not in self.methods:
            raise RequestRejected("method", f"{method!r} not allowed")
        path = target.split("?", 1)[0]
        lowered = target.lower()
        if (not _SAFE_PATH.fullmatch(target) or "/./" in path or "/../" in path
                or path.endswith(("/.", "/..")) or "//" in path or "%2e" in lowered
                or "%2f" in lowered or "%5c" in lowered):
            raise RequestRejected("path", f"{target[:80]!r} is not a plain absolute path")
        if not path.startswith(self.prefixes):
            raise RequestRejected("path", f"{path[:80]!r} outside {', '.join(self.prefixes)}")
        lengths: set[bytes] = set()
        chunked = False
        fields: list[tuple[bytes, bytes]] = []
        for raw in lines[1:]:
            if raw[:1] in (b" ", b"\t"):
                raise RequestRejected("header", "obsolete line folding")
            name, val = _field(raw, "header")
            key = name.lower()
            if key == PEER_HEADER.lower():
                continue  # only the sidecar says who the peer is
            fields.append((name, val))
            if key == b"content-length":
                if not val.isdigit():
                    raise RequestRejected("content-length", f"{val[:20]!r} is not a number")
                lengths.add(val.lstrip(b"0") or b"0")
            elif key == b"transfer-encoding":
                if val.lower() != b"chunked" or chunked:
                    raise RequestRejected("transfer-encoding", f"{val[:40]!r} not supported")
                chunked = True
            elif key == b"upgrade" or (key == b"connection" and b"upgrade" in val.lower()):
                raise RequestRejected("upgrade", "protocol upgrades are not allowed")
        if len(lengths) > 1:
            raise RequestRejected("content-length", "conflicting Content-Length headers")
        if lengths and chunked:
            raise RequestRejected("transfer-encoding",
                                  "both Content-Length and Transfer-Encoding (smuggling)")
        self.requests += 1
        if chunked:
            self._state = "chunk-size"
        elif lengths and (n := int(lengths.pop())) > 0:
            self._state, self._remaining = "length", n
        return (b"%s %s HTTP/1.1\r\n" % (method.encode(), target.encode())
                + b"".join(b"%s: %s\r\n" % f for f in [*fields, *self._peer]) + b"\r\n")


def _field(raw: bytes, where: str) -> tuple[bytes, bytes]:
    """`name: value` of one header or trailer line, refusing what parsers disagree on."""
    if _CONTROL.search(raw):
        raise RequestRejected(where, f"control byte (bare CR/LF, NUL, ...) in {raw[:40]!r}")
    name, sep, value = raw.partition(b":")
    if not sep or not _TOKEN.fullmatch(name):
        raise RequestRejected(where, f"malformed {where} line {raw[:40]!r}")
    value = value.strip(b" \t")
    if not _FIELD_VALUE.fullmatch(value):
        raise RequestRejected(where, f"invalid bytes in the value of {name[:40]!r}")
    return name, value


FORBIDDEN = (b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nConnection: close\r\n"
             b"Content-Length: %d\r\n\r\n%s")


def forbidden_response(reason: str) -> bytes:
    body = f"pqfed sidecar: {reason}\n".encode()
    return FORBIDDEN % (len(body), body)
