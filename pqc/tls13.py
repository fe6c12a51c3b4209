"""TLS 1.3 (RFC 8446) with ML-DSA-65 X.509 certificates and hybrid ML-KEM key exchange.

The standard counterpart of the pqfed1 channel (`pqfed.pqc.channel`), for peers that speak
TLS: hospital IT, service meshes, openssl tooling. OpenSSL (4.x, the one bundled with
cryptography, reached through pyOpenSSL) runs the protocol; this module fixes its parameters
and applies pqfed's identity policy:

* TLS 1.3 only; key exchange X25519MLKEM768 (draft-ietf-tls-ecdhe-mlkem; SecP384r1MLKEM1024
  may be added), never a classical-only group, so a client offering only X25519 is refused;
* signature algorithms: ML-DSA-65 only (draft-ietf-tls-mldsa), for CertificateVerify and for
  the certificates, so an ECDSA/Ed25519/RSA certificate cannot authenticate;
* AEAD: TLS_AES_256_GCM_SHA384 or TLS_CHACHA20_POLY1305_SHA256 (pqfed1's suites);
* mutual authentication: OpenSSL builds and checks the chain to the federation CA (the only
  certificate in its store), then our verification callback runs `X509TrustAnchor.verify` on
  the leaf: federation, role, pinned node id, usage (EKU), revocation (the CA's CRL).

Byte-stream API like `SecureChannel`: `send`, `recv`, `close`, `abort`, `peer`. The TLS engine
runs on memory BIOs and the bytes travel over asyncio streams (sans-IO, like the pqfed1
handshake), so it works over any socket asyncio can open. Given an executor, each handshake
step (OpenSSL's ML-KEM, ML-DSA signing and verification, our leaf policy) runs on its threads,
off the event loop, as pqfed1's steps do: OpenSSL releases the GIL, so parallel handshakes use
every core.

In TLS 1.3 the client's handshake completes before the server has judged the client's
certificate (RFC 8446 §4.4.2, §4.6.3): a client refused by the server learns it from the alert
on its first `recv` (HandshakeError('peer_alert')), the server from its own handshake.

Bulk data can leave the event loop: `TlsChannel.detach` hands an established channel's socket
and OpenSSL connection to a `TlsStream`, whose blocking `send`/`recv` run in pump threads
(pqfed.pqc.sidecar.pump) with large preallocated buffers; OpenSSL and the socket calls release
the GIL. The module stays one (past 500 lines) because both paths share the connection, its
memory BIOs and the record and error handling below.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import NoReturn, Protocol

from cryptography import x509
from cryptography.hazmat.bindings.openssl.binding import Binding
from cryptography.hazmat.primitives.asymmetric import mldsa
from OpenSSL import SSL, crypto

from pqfed.pqc.channel import HandshakeStats
from pqfed.pqc.errors import (
    CertificateError,
    ChannelClosed,
    HandshakeError,
    PqcError,
    RecordError,
)
from pqfed.pqc.identity import Role
from pqfed.pqc.pki.profile import (
    NodeCertificate,
    Usage,
    X509TrustAnchor,
    check_ml_dsa_65_key,
    private_key_pem,
)

log = logging.getLogger("pqfed.pqc.tls13")

PQ_GROUPS = ("X25519MLKEM768", "SecP384r1MLKEM1024")
DEFAULT_GROUPS = ("X25519MLKEM768",)
SIGNATURE_ALGORITHMS = "mldsa65"
CIPHERSUITES = "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
READ_CHUNK = 1 << 16
WRITE_CHUNK = 1 << 16
# A TlsStream's buffers (allocated once per stream, so glibc's mmap threshold does not apply):
# one socket read, one SSL_write and the plaintext of one `recv` at most.
BULK_CHUNK = 1 << 18
# RFC 8446 §5.2: a TLS 1.3 record carries at most 2^14 bytes of plaintext and adds a 5-byte
# header, the inner content type (1 byte) and the AEAD tag (16 bytes for both our suites).
RECORD_PLAINTEXT = 1 << 14
RECORD_OVERHEAD = 5 + 1 + 16

_lib = Binding.lib
_ffi = Binding.ffi
_SSL_MODE_NO_AUTO_CHAIN = 0x8  # openssl/ssl.h; neither pyOpenSSL nor the binding name it


def set_groups(ctx: SSL.Context, groups: tuple[str, ...]) -> None:
    """SSL_CTX_set1_groups_list (alias set1_curves_list). pyOpenSSL has no wrapper for it or
    for the signature algorithms: both calls go through cryptography's OpenSSL binding on
    pyOpenSSL's context handle, here and in `set_signature_algorithms` only."""
    if _lib.SSL_CTX_set1_curves_list(ctx._context, ":".join(groups).encode()) != 1:
        raise HandshakeError("groups", f"OpenSSL refused the group list {groups}")


def set_signature_algorithms(ctx: SSL.Context, sigalgs: str) -> None:
    """SSL_CTX_set1_sigalgs_list: what we sign with, accept in CertificateVerify and ask the
    peer for (signature_algorithms and, for the client certificate, CertificateRequest)."""
    if _lib.SSL_CTX_set1_sigalgs_list(ctx._context, sigalgs.encode()) != 1:
        raise HandshakeError("signature_algorithms", f"OpenSSL refused {sigalgs!r}")


class LeafPolicy(Protocol):
    """What judges the peer's leaf certificate: `X509TrustAnchor`, or a holder of one that
    adds to it (`pqfed.pqc.truststore.X509Trust`: CRL freshness)."""

    @property
    def root(self) -> x509.Certificate: ...

    def verify(self, cert: x509.Certificate, *, now: float | None = None,
               roles: tuple[Role, ...] | None = None, node_id: str | None = None,
               usage: Usage | None = None) -> NodeCertificate: ...


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """One side's identity, what it trusts and what it expects of its peer."""

    certificate: x509.Certificate
    key: mldsa.MLDSA65PrivateKey = field(repr=False)
    trust: X509TrustAnchor | LeafPolicy
    peer_roles: tuple[Role, ...] | None = None
    peer_node_id: str | None = None
    groups: tuple[str, ...] = DEFAULT_GROUPS
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        check_ml_dsa_65_key(self.certificate.public_key(), "certificate.public_key")
        if self.key.public_key() != self.certificate.public_key():
            raise CertificateError("private_key", "does not match the certificate")
        bad = [g for g in self.groups if g not in PQ_GROUPS]
        if not self.groups or bad:
            raise HandshakeError("groups", f"{bad or 'none'}: choose from {', '.join(PQ_GROUPS)}"
                                           " (hybrid post-quantum groups only)")


@dataclass(slots=True)
class _ConnState:
    """Per connection: the pin and what the verification callback found."""

    usage: Usage  # what the peer's certificate must authenticate
    node_id: str | None
    peer: NodeCertificate | None = None
    error: CertificateError | None = None
    sign_started: float | None = None  # see TlsContext._info


_OPENSSL_FIELD = {
    _lib.X509_V_ERR_CERT_NOT_YET_VALID: "not_before",
    _lib.X509_V_ERR_CERT_HAS_EXPIRED: "not_after",
    _lib.X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT: "issuer",
    _lib.X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY: "issuer",
    _lib.X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE: "issuer",
    _lib.X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT: "issuer",
    _lib.X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN: "issuer",
    _lib.X509_V_ERR_CERT_SIGNATURE_FAILURE: "signature",
    _lib.X509_V_ERR_INVALID_PURPOSE: "extended_key_usage",
    _lib.X509_V_ERR_KEYUSAGE_NO_DIGITAL_SIGNATURE: "key_usage",
    _lib.X509_V_ERR_INVALID_CA: "basic_constraints",
    _lib.X509_V_ERR_PATH_LENGTH_EXCEEDED: "basic_constraints",
    _lib.X509_V_ERR_UNHANDLED_CRITICAL_EXTENSION: "extensions",
}


def _openssl_error(errnum: int, depth: int) -> CertificateError:
    name = _OPENSSL_FIELD.get(errnum, "chain")
    reason = _ffi.string(_lib.X509_verify_cert_error_string(errnum)).decode()
    return CertificateError(f"root.{name}" if depth > 0 and name != "issuer" else name,
                            f"OpenSSL: {reason} (X509_V_ERR {errnum}, depth {depth})")


def _openssl_key(key: mldsa.MLDSA65PrivateKey) -> crypto.PKey:
    """pyOpenSSL converts only classical cryptography keys (PKey.from_cryptography_key), so
    the ML-DSA key goes through PKCS#8 PEM into OpenSSL; pyOpenSSL deprecates passing PKey
    objects, which is the only route for this key type."""
    return crypto.load_privatekey(crypto.FILETYPE_PEM, private_key_pem(key))


# OpenSSL's handshake states as SSL_state_string_long names them (ssl/ssl_stat.c): the info
# callback runs when a state is left, so the time from "own Certificate written" to "own
# CertificateVerify written" is the ML-DSA-65 signature OpenSSL makes inside the handshake.
_OWN_CERTIFICATE_WRITTEN = {Usage.SERVER: b"SSLv3/TLS write certificate",
                            Usage.CLIENT: b"SSLv3/TLS write client certificate"}
_OWN_CERTIFICATE_VERIFY_WRITTEN = {Usage.SERVER: b"TLSv1.3 write server certificate verify",
                                   Usage.CLIENT: b"SSLv3/TLS write certificate verify"}


class TlsContext:
    """One side's OpenSSL context, built once and used for every connection of that side.

    `trust` may be replaced (a newer CRL) while connections run; each verification reads it.
    `on_sign`, if given, receives the seconds each CertificateVerify signature took (read from
    OpenSSL's state changes: `_info`).
    """

    def __init__(self, config: TlsConfig, side: Usage,
                 on_sign: Callable[[float], None] | None = None) -> None:
        self.config = config
        self.side = side
        self.on_sign = on_sign
        self.trust: X509TrustAnchor | LeafPolicy = config.trust
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
        ctx.set_tls13_ciphersuites(CIPHERSUITES.encode())
        set_groups(ctx, config.groups)
        set_signature_algorithms(ctx, SIGNATURE_ALGORITHMS)
        ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        # Send the leaf only: the peer holds the CA (RFC 8446 §4.4.2 lets the trust anchor be
        # omitted), which saves one 5.5 KB ML-DSA-65 certificate per side and handshake.
        ctx.set_mode(_SSL_MODE_NO_AUTO_CHAIN)
        ctx.use_certificate(config.certificate)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.use_privatekey(_openssl_key(config.key))
        ctx.check_privatekey()
        store = ctx.get_cert_store()
        assert store is not None
        store.add_cert(crypto.X509.from_cryptography(config.trust.root))
        store.set_flags(crypto.X509StoreFlags.X509_STRICT)
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify)
        ctx.set_verify_depth(1)  # leaf + the federation CA: no intermediates (pathLen 0)
        if on_sign is not None:
            ctx.set_info_callback(self._info)
        self.ssl = ctx

    def _info(self, conn: SSL.Connection, where: int, _ret: int) -> None:
        """SSL_CTX_set_info_callback: times this side's CertificateVerify signature."""
        if not where & SSL.SSL_CB_LOOP or self.on_sign is None:
            return
        state: _ConnState = conn.get_app_data()
        name = conn.get_state_string()
        if name == _OWN_CERTIFICATE_WRITTEN[self.side]:
            state.sign_started = time.perf_counter()
        elif name == _OWN_CERTIFICATE_VERIFY_WRITTEN[self.side] and state.sign_started:
            self.on_sign(time.perf_counter() - state.sign_started)
            state.sign_started = None

    def _verify(self, conn: SSL.Connection, cert: crypto.X509, errnum: int, depth: int,
                ok: int) -> bool:
        """OpenSSL's per-certificate callback: its chain result, then our policy on the leaf."""
        state: _ConnState = conn.get_app_data()
        if not ok:
            state.error = state.error or _openssl_error(errnum, depth)
            return False
        if depth > 0:
            return True
        try:
            state.peer = self.trust.verify(
                cert.to_cryptography(),
                roles=self.config.peer_roles, node_id=state.node_id, usage=state.usage)
        except CertificateError as exc:
            state.error = exc
            return False
        except ValueError as exc:  # cryptography parses extensions lazily
            state.error = CertificateError("certificate", f"cannot be parsed: {exc}")
            return False
        return True

    def connection(self, peer_node_id: str | None = None) -> tuple[SSL.Connection, _ConnState]:
        conn = SSL.Connection(self.ssl, None)  # memory BIOs
        peer_usage = Usage.CLIENT if self.side is Usage.SERVER else Usage.SERVER
        state = _ConnState(peer_usage, peer_node_id or self.config.peer_node_id)
        conn.set_app_data(state)
        if self.side is Usage.SERVER:
            conn.set_accept_state()
        else:
            conn.set_connect_state()
        return conn, state


def _tls_reason(err: SSL.Error) -> str:
    parts = []
    for item in err.args[0] if err.args and isinstance(err.args[0], list) else []:
        parts.append(str(item[-1]) if isinstance(item, tuple) else str(item))
    return "; ".join(parts) or str(err)


def _handshake_error(err: SSL.Error) -> HandshakeError:
    reason = _tls_reason(err)
    low = reason.lower()
    if "alert" in low:
        fld = "peer_alert"
    elif "group" in low or "key share" in low or "curve" in low:
        fld = "groups"
    elif "signature" in low or "sigalg" in low:
        fld = "signature_algorithms"
    elif "version" in low or "protocol" in low:
        fld = "version"
    elif "peer did not return a certificate" in low or "certificate required" in low:
        fld = "certificate"
    else:
        fld = "tls"
    return HandshakeError(fld, reason)


def _peername(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


class TlsChannel:
    """A mutually authenticated TLS 1.3 byte channel to one peer (the SecureChannel API)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 conn: SSL.Connection, peer: NodeCertificate, stats: HandshakeStats) -> None:
        self._reader = reader
        self._writer = writer
        self._conn = conn
        self._closed = False
        self.peer = peer
        self.handshake = stats
        self.group = conn.get_group_name() or ""
        self.cipher = conn.get_cipher_name() or ""
        self.version = conn.get_protocol_version_name()
        self.bytes_sent = 0
        self.bytes_received = 0
        self._plaintext = _PlaintextReader()
        self._stream: TlsStream | None = None

    @property
    def peername(self) -> str:
        return _peername(self._writer)

    def _flush(self, plaintext: int = 0) -> int:
        """Sends what OpenSSL wrote into the outgoing memory BIO; `plaintext` (what was just
        given to SSL_write) sizes the read so that one BIO_read takes it all."""
        records = -(-plaintext // RECORD_PLAINTEXT)
        out = _drain_bio(self._conn, plaintext + records * RECORD_OVERHEAD + 512)
        if out:
            self._writer.write(out)
        return len(out)

    async def send(self, data: bytes) -> None:
        """Encrypts `data` (OpenSSL splits it into records of 16 KiB) and sends the records
        in one write: no copy of `data` first, one BIO read per WRITE_CHUNK."""
        if self._closed:
            raise ChannelClosed("channel is closed")
        if len(data) <= WRITE_CHUNK:
            self._conn.sendall(data)
            self.bytes_sent += self._flush(len(data))
        else:
            view = memoryview(data)
            for off in range(0, len(data), WRITE_CHUNK):
                piece = view[off : off + WRITE_CHUNK]
                self._conn.sendall(piece)
                self.bytes_sent += self._flush(len(piece))
                await self._writer.drain()
        await self._writer.drain()

    async def recv(self) -> bytes:
        """The application data of every record received so far (at least one byte; up to
        READ_CHUNK); ChannelClosed after the peer's close_notify, RecordError (after closing)
        on a bad record or a truncated stream."""
        while True:
            try:
                data = self._plaintext.read(self._conn)
            except SSL.ZeroReturnError:
                self._closed = True
                self._writer.close()
                raise ChannelClosed(f"peer {self.peer.node_id} closed the channel") from None
            except SSL.Error as err:
                exc = _handshake_error(err)
                if exc.field != "peer_alert":
                    await self._fail(RecordError("tls", exc.reason))
                await self._fail(exc)
            if data:
                return data
            if self._flush():  # e.g. a KeyUpdate answer
                await self._writer.drain()
            chunk = await self._reader.read(READ_CHUNK)
            if not chunk:
                await self._fail(RecordError(
                    "close", "connection ended without close_notify (truncation)"))
            self.bytes_received += len(chunk)
            self._conn.bio_write(chunk)

    async def close(self) -> None:
        """close_notify (RFC 8446 §6.1), then the TCP close."""
        if self._closed:
            return
        self._closed = True
        try:
            self._conn.shutdown()
            self._flush()
            await self._writer.drain()
        except (SSL.Error, ConnectionError, RuntimeError):
            pass
        self._writer.close()

    def abort(self) -> None:
        self._closed = True
        if self._stream is not None:
            self._stream.abort()
        else:
            self._writer.transport.abort()

    def detach(self) -> TlsStream | None:
        """Takes the channel off the event loop: its socket (blocking from now on), the OpenSSL
        connection and whatever the stream reader had buffered go to a `TlsStream` for pump
        threads; `abort` then aborts the stream. None (and the channel stays as it was) while
        records still wait in the transport's write buffer or the socket is gone."""
        if self._closed or self._stream is not None:
            return None
        taken = take_socket(self._reader, self._writer)
        if taken is None:
            return None
        sock, buffered = taken
        self._stream = TlsStream(sock, self._conn, buffered, self.peer.node_id)
        return self._stream

    async def _fail(self, exc: PqcError) -> NoReturn:
        log.warning("closing TLS channel to %s (%s): %s", self.peer.node_id, self.peername, exc)
        self.abort()
        raise exc


def _drain_bio(conn: SSL.Connection, size: int = READ_CHUNK) -> bytes:
    """Everything in the outgoing memory BIO; one BIO_read when `size` covers it."""
    parts = []
    while True:
        try:
            part = conn.bio_read(size)
        except SSL.WantReadError:
            break
        parts.append(part)
        if len(part) < size:
            break  # a memory BIO gives all it holds, up to size: it is empty now
    return parts[0] if len(parts) == 1 else b"".join(parts)


class _PlaintextReader:
    """Decrypts every complete record in the incoming memory BIO into one buffer.

    pyOpenSSL's `Connection.recv` allocates a buffer per call, returns one record (SSL_read
    gives at most one record's plaintext) and copies it out; a bulk transfer then pays a
    Python round trip, an allocation, a copy and (at the end) an exception per 16 KiB. Here
    SSL_read writes straight into one buffer, record after record, and the caller gets one
    `bytes` copy (`read`), or none (`read_into`, for `TlsStream`). Its error handling stays
    pyOpenSSL's (`_raise_ssl_error`): this class, `TlsStream` (the connection's memory BIOs)
    and `set_groups`/`set_signature_algorithms` are the only places reaching past pyOpenSSL's
    public API (pinned: pyOpenSSL 26.4)."""

    def __init__(self, size: int = READ_CHUNK) -> None:
        self._buf = bytearray(size)
        self._ptr = _ffi.from_buffer(self._buf)
        self._error: SSL.Error | None = None

    def read(self, conn: SSL.Connection) -> bytes:
        """The plaintext available now (b"" if none); raises SSL.Error (ZeroReturnError for
        close_notify) once the data before it has been returned."""
        got = self.read_into(conn)
        return bytes(memoryview(self._buf)[:got]) if got else b""

    @property
    def buffer(self) -> memoryview:
        return memoryview(self._buf)

    def read_into(self, conn: SSL.Connection) -> int:
        """Decrypts what it can into `buffer`; returns how many bytes (0 if none). Errors as
        `read`."""
        if self._error is not None:
            raise self._error
        ssl = conn._ssl  # pyOpenSSL internal: see the class docstring
        got, size = 0, len(self._buf)
        while got < size:
            n = _lib.SSL_read(ssl, self._ptr + got, size - got)
            if n > 0:
                got += n
                continue
            if _lib.SSL_get_error(ssl, n) == _lib.SSL_ERROR_WANT_READ:
                break
            try:
                conn._raise_ssl_error(ssl, n)
            except SSL.Error as err:
                if not got:
                    raise
                self._error = err  # after the data that came before it
            break
        return got


def take_socket(reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                ) -> tuple[socket.socket, bytes] | None:
    """Takes a connected TCP socket out of asyncio for blocking use in threads: a duplicate
    of its descriptor, and the bytes the StreamReader had read but nobody consumed. The
    transport is closed without flushing or shutting down (the duplicate keeps the
    connection open). None if the transport still holds unsent bytes or the socket is gone.

    asyncio has no public way to read a StreamReader's buffer without waiting; `_buffer` is
    read once, with reading paused (Python 3.11-3.13 keep it there)."""
    transport = writer.transport
    sock = writer.get_extra_info("socket")
    if (sock is None or not isinstance(transport, asyncio.Transport)
            or transport.is_closing() or transport.get_write_buffer_size()):
        return None
    transport.pause_reading()
    try:
        dup = socket.socket(fileno=os.dup(sock.fileno()))
    except OSError:
        transport.resume_reading()
        return None
    buffered: bytearray = reader._buffer  # type: ignore[attr-defined]  # see the docstring
    taken = bytes(buffered)
    buffered.clear()
    transport.abort()  # closes asyncio's descriptor only: no FIN, no RST
    dup.setblocking(True)
    return dup, taken


class TlsStream:
    """An established TLS 1.3 channel's data path for threads: blocking `send` and `recv`
    on the socket, one thread each way.

    OpenSSL does not allow two threads in one SSL object at once, so every call on it holds
    `_ssl_lock`; the socket calls (which block) run outside it, and a second lock keeps the
    records on the wire in the order OpenSSL produced them (a KeyUpdate answer made while
    reading goes between data records). The memory BIOs of the handshake stay: data is moved
    between them and the socket with preallocated BULK_CHUNK buffers, in one call per chunk.

    Semantics as `TlsChannel`: `recv` raises ChannelClosed after the peer's close_notify and
    RecordError (after aborting) on a bad record or a stream cut without close_notify; `close`
    sends close_notify; `abort` shuts the socket down, which wakes both threads. The socket's
    descriptor is closed by `release`, once no thread uses it any more."""

    def __init__(self, sock: socket.socket, conn: SSL.Connection, buffered: bytes,
                 peer: str, chunk: int = BULK_CHUNK) -> None:
        self._sock = sock
        self._conn = conn
        self._peer = peer
        self._ssl_lock = threading.Lock()
        self._wire_lock = threading.Lock()
        self._chunk = chunk
        self._inbuf = bytearray(chunk)
        self._plaintext = _PlaintextReader(chunk)
        records = -(-chunk // RECORD_PLAINTEXT)
        self._outbuf = bytearray(chunk + records * RECORD_OVERHEAD + 4096)
        self._outptr = _ffi.from_buffer(self._outbuf)
        self._closed = False
        self._aborted = False
        self._stopped = False
        self.bytes_sent = 0
        self.bytes_received = len(buffered)
        if buffered:
            self._bio_write(buffered)

    def _bio_write(self, data: bytes | memoryview) -> None:
        """Into the incoming memory BIO (pyOpenSSL's `bio_write` takes bytes only)."""
        with _ffi.from_buffer(data) as ptr:
            if _lib.BIO_write(self._conn._into_ssl, ptr, len(data)) != len(data):
                raise RecordError("tls", "the incoming memory BIO refused data")

    def _take_records(self) -> memoryview:
        """Everything OpenSSL wrote into the outgoing memory BIO; call with _ssl_lock held."""
        wbio, size, got = self._conn._from_ssl, len(self._outbuf), 0
        while got < size:
            n = _lib.BIO_read(wbio, self._outptr + got, size - got)
            if n <= 0:
                break
            got += n
        view = memoryview(self._outbuf)[:got]
        if got == size:  # more than one chunk's records (rare): take the rest too
            rest = _drain_bio(self._conn)
            if rest:
                return memoryview(bytes(view) + rest)
        return view

    def _send_records(self, records: memoryview) -> None:
        """Sends records taken under _ssl_lock; the caller holds _wire_lock (taken before
        releasing _ssl_lock, so records leave in the order they were made)."""
        try:
            self._sock.sendall(records)
        except OSError as exc:
            raise self._fail(RecordError("connection", f"send failed: {exc}")) from None
        self.bytes_sent += len(records)

    def send(self, data: bytes | memoryview) -> None:
        """Encrypts and sends all of `data`, one SSL_write and one socket write per chunk."""
        view = memoryview(data)
        for off in range(0, len(view), self._chunk):
            if self._closed:
                raise ChannelClosed("channel is closed")
            piece = view[off : off + self._chunk]
            self._ssl_lock.acquire()
            try:
                self._conn.sendall(piece)
                records = self._take_records()
                self._wire_lock.acquire()
            except SSL.Error as err:
                self._ssl_lock.release()
                raise self._fail(RecordError("tls", _tls_reason(err))) from None
            self._ssl_lock.release()
            try:
                self._send_records(records)
            finally:
                self._wire_lock.release()

    def recv(self) -> memoryview:
        """The plaintext of every record received so far (at least one byte, up to the
        chunk), valid until the next `recv`; raises as `TlsChannel.recv`."""
        while True:
            self._ssl_lock.acquire()
            try:
                got = self._plaintext.read_into(self._conn)
                answer = self._take_records()  # e.g. a KeyUpdate answer
                if answer:
                    self._wire_lock.acquire()
            except SSL.ZeroReturnError:
                self._ssl_lock.release()
                self._closed = True
                raise ChannelClosed(f"peer {self._peer} closed the channel") from None
            except SSL.Error as err:
                self._ssl_lock.release()
                exc = _handshake_error(err)
                raise self._fail(RecordError("tls", exc.reason) if exc.field != "peer_alert"
                                 else exc) from None
            self._ssl_lock.release()
            if answer:
                try:
                    self._send_records(answer)
                finally:
                    self._wire_lock.release()
            if got:
                return self._plaintext.buffer[:got]
            try:
                n = self._sock.recv_into(self._inbuf)
            except OSError as exc:
                if self._stopped or self._aborted:
                    raise self._ended() from None
                raise self._fail(RecordError("connection", f"receive failed: {exc}")) from None
            if not n:
                if self._stopped or self._aborted:
                    raise self._ended()
                raise self._fail(RecordError(
                    "close", "connection ended without close_notify (truncation)"))
            self.bytes_received += n
            with self._ssl_lock:
                self._bio_write(memoryview(self._inbuf)[:n])

    def close(self, timeout_s: float = 10.0) -> None:
        """close_notify (RFC 8446 §6.1) unless closed or aborted already, then the TCP close
        (FIN); waits at most `timeout_s` for the socket to take the alert."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(SSL.Error, OSError), self._ssl_lock:
            self._conn.shutdown()
            records = bytes(self._take_records())
            self._sock.settimeout(timeout_s)
            self._sock.sendall(records)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)

    def stop_reading(self) -> None:
        """Wakes a thread blocked in `recv`: it raises RecordError('stopped') (nothing is
        aborted or logged) instead of waiting for more records. After `abort`, `recv`
        raises RecordError('aborted') alike."""
        self._stopped = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RD)

    @property
    def stopped(self) -> bool:
        """`stop_reading` was called."""
        return self._stopped

    def abort(self) -> None:
        """Ends the connection without close_notify; blocked `send` and `recv` return."""
        self._closed = self._aborted = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    @property
    def aborted(self) -> bool:
        return self._aborted

    def release(self) -> None:
        """Closes the descriptor; call once both pump threads have returned."""
        self._closed = True
        self._sock.close()

    def _ended(self) -> RecordError:
        """What `recv` raises once reading was stopped or the channel aborted from outside
        (a revocation): the caller's doing, so not logged or counted as a failure."""
        if self._aborted:
            return RecordError("aborted", "the channel was aborted")
        return RecordError("stopped", "reading was stopped")

    def _fail(self, exc: PqcError) -> PqcError:
        if not self._aborted:
            log.warning("closing TLS channel to %s: %s", self._peer, exc)
        self.abort()
        return exc


async def _run_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         context: TlsContext, peer_node_id: str | None,
                         executor: Executor | None) -> TlsChannel:
    conn, state = context.connection(peer_node_id)
    sent = received = 0
    start = time.perf_counter()
    loop = asyncio.get_running_loop()

    def step() -> tuple[bool, bytes]:
        """One handshake step on what has arrived: (done, bytes to send)."""
        try:
            conn.do_handshake()
            done = True
        except SSL.WantReadError:
            done = False
        return done, _drain_bio(conn)

    async def drive() -> None:
        nonlocal sent, received
        while True:
            done, out = await loop.run_in_executor(executor, step) if executor else step()
            if out:
                writer.write(out)
                sent += len(out)
                await writer.drain()
            if done:
                return
            chunk = await reader.read(READ_CHUNK)
            if not chunk:
                raise HandshakeError("stream", "peer closed the connection during the handshake")
            received += len(chunk)
            conn.bio_write(chunk)

    try:
        await asyncio.wait_for(drive(), timeout=context.config.timeout_s)
    except TimeoutError:
        exc: PqcError = HandshakeError("timeout", f"no complete handshake in "
                                                  f"{context.config.timeout_s} s")
        _abort(writer, exc)
        raise exc from None
    except SSL.Error as err:
        exc = state.error or _handshake_error(err)
        # Tell the peer why (the alert OpenSSL queued), then close.
        out = _drain_bio(conn)
        if out:
            writer.write(out)
        _abort(writer, exc)
        raise exc from None
    except (PqcError, ConnectionError) as err:
        exc = err if isinstance(err, PqcError) else HandshakeError("stream", str(err))
        _abort(writer, exc)
        raise exc from None
    # Defence in depth: the context allows nothing else, but a weaker result must not pass.
    if conn.get_protocol_version_name() != "TLSv1.3":
        _abort(writer, exc := HandshakeError("version", conn.get_protocol_version_name()))
        raise exc
    if conn.get_group_name() not in context.config.groups:
        _abort(writer, exc := HandshakeError("groups", f"negotiated {conn.get_group_name()}"))
        raise exc
    if state.peer is None:
        _abort(writer, exc := HandshakeError("certificate", "the peer sent no certificate"))
        raise exc
    stats = HandshakeStats(time.perf_counter() - start, sent, received)
    return TlsChannel(reader, writer, conn, state.peer, stats)


def _abort(writer: asyncio.StreamWriter, exc: PqcError) -> None:
    log.warning("TLS handshake with %s failed: %s", _peername(writer), exc)
    writer.transport.abort()


async def tls_client_channel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                             context: TlsContext, peer_node_id: str | None = None,
                             executor: Executor | None = None) -> TlsChannel:
    """The client's handshake; with `executor`, its steps run on the executor's threads."""
    if context.side is not Usage.CLIENT:
        raise HandshakeError("side", "a client channel needs TlsContext(..., Usage.CLIENT)")
    return await _run_handshake(reader, writer, context, peer_node_id, executor)


async def tls_server_channel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                             context: TlsContext,
                             executor: Executor | None = None) -> TlsChannel:
    """The server's handshake; with `executor`, its steps run on the executor's threads."""
    if context.side is not Usage.SERVER:
        raise HandshakeError("side", "a server channel needs TlsContext(..., Usage.SERVER)")
    return await _run_handshake(reader, writer, context, None, executor)


async def tls_connect(host: str, port: int, context: TlsContext,
                      peer_node_id: str | None = None,
                      executor: Executor | None = None) -> TlsChannel:
    reader, writer = await asyncio.open_connection(host, port)
    return await tls_client_channel(reader, writer, context, peer_node_id, executor)
