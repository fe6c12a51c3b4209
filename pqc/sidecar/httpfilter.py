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
"""

from __future__ import annotations

import re

from pqfed.pqc.errors import PqcError

MAX_HEAD = 64 * 1024
_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
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
                 methods: tuple[str, ...] = ("GET", "POST")) -> None:
        if not allowed_prefixes or not all(p.startswith("/") for p in allowed_prefixes):
            raise ValueError("allowed prefixes must be non-empty absolute paths")
        self.prefixes = allowed_prefixes
        self.methods = methods
        self._buf = bytearray()
        self._state = "head"
        self._remaining = 0  # body bytes (length mode) or chunk bytes (chunked mode)
        self.requests = 0

    def feed(self, data: bytes) -> bytes:
        self._buf += data
        out = bytearray()
        while self._buf:
            if self._state == "head":
                end = self._buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buf) > MAX_HEAD:
                        raise RequestRejected("head", f"request head over {MAX_HEAD} bytes")
                    break
                head = bytes(self._buf[: end + 4])
                del self._buf[: end + 4]
                self._check_head(head)
                out += head
            elif self._state == "length":
                n = min(self._remaining, len(self._buf))
                out += self._buf[:n]
                del self._buf[:n]
                self._remaining -= n
                if self._remaining == 0:
                    self._state = "head"
            elif self._state == "chunk-size":
                end = self._buf.find(b"\r\n")
                if end < 0:
                    if len(self._buf) > 1024:
                        raise RequestRejected("chunk", "chunk-size line too long")
                    break
                line = bytes(self._buf[: end + 2])
                del self._buf[: end + 2]
                size_text = line[:-2].split(b";", 1)[0].strip()
                if not re.fullmatch(rb"[0-9A-Fa-f]{1,8}", size_text):
                    raise RequestRejected("chunk", f"invalid chunk size {size_text[:16]!r}")
                out += line
                self._remaining = int(size_text, 16)
                self._state = "chunk-data" if self._remaining else "trailer"
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
                end = self._buf.find(b"\r\n")
                if end < 0:
                    break
                line = bytes(self._buf[: end + 2])
                del self._buf[: end + 2]
                out += line
                if line == b"\r\n":
                    self._state = "head"
        return bytes(out)

    def _check_head(self, head: bytes) -> None:
        lines = head[:-4].split(b"\r\n")
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
        if (not _SAFE_PATH.match(target) or "/./" in path or "/../" in path
                or path.endswith(("/.", "/..")) or "//" in path or "%2e" in lowered
                or "%2f" in lowered or "%5c" in lowered):
            raise RequestRejected("path", f"{target[:80]!r} is not a plain absolute path")
        if not path.startswith(self.prefixes):
            raise RequestRejected("path", f"{path[:80]!r} outside {', '.join(self.prefixes)}")
        lengths: set[bytes] = set()
        chunked = False
        for raw in lines[1:]:
            if raw[:1] in (b" ", b"\t"):
                raise RequestRejected("header", "obsolete line folding")
            name, sep, value = raw.partition(b":")
            if not sep or not _TOKEN.match(name):
                raise RequestRejected("header", f"malformed header line {raw[:40]!r}")
            key, val = name.lower(), value.strip()
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


FORBIDDEN = (b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nConnection: close\r\n"
             b"Content-Length: %d\r\n\r\n%s")


def forbidden_response(reason: str) -> bytes:
    body = f"pqfed sidecar: {reason}\n".encode()
    return FORBIDDEN % (len(body), body)
