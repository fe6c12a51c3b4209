"""The pqfed handshake: hybrid PQ key establishment with mutual ML-DSA authentication.

Message flow (one round trip plus the client's second flight, as in TLS 1.3 full handshake):

    Client                                              Server
    ClientHello {version, suites, groups, random,
                 federation, key_share(ML-KEM pk, X25519 pk)}  ---->
                      <----  ServerHello {version, suite, group, random,
                                          key_share(ML-KEM ct, X25519 pk)}
                      <----  {Certificate, CertificateVerify, Finished}   (s hs traffic)
    {Certificate, CertificateVerify, Finished}  ---->                     (c hs traffic)
    [application data]  <--->  [application data]                        (ap traffic)

Designs followed:
* Key shares and the hybrid secret: X-Wing combiner (keyschedule.xwing_combine).
* Key schedule, Finished MACs, traffic keys: RFC 8446 §7.1, §4.4.4, §7.3.
* Authentication: SIGMA-I (Krawczyk, CRYPTO 2003) in its TLS 1.3 form: each side signs the
  running transcript hash (CertificateVerify, RFC 8446 §4.4.3), MACs it with a key derived
  from the shared secret (Finished), and sends its identity encrypted (identity protection).
* Downgrade protection: version, all offered suites and groups are in ClientHello, so in the
  transcript that both signatures cover; a stripped offer breaks the server's signature.

The classes are sans-IO state machines in the style of h11: bytes (frames) in, bytes out. This
module owns no thread, reads no environment variable and no file; the crypto work that may run
concurrently (the two checks of the peer's flight, the client's early signature) is handed to
a `CryptoRunner` that the driver supplies (`HandshakeConfig.crypto`): `INLINE` here, threads in
`pqfed.pqc.pool.ThreadedCrypto`. `pqfed.pqc.channel` drives them over asyncio streams with a
timeout; `pqfed.pqc.pool` holds the host-dependent defaults (AEAD preference, parallelism).
The module is one file on purpose (~700 lines), like h11's state machine: both endpoints, the
messages and every check a reviewer must see together to judge the protocol.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import hmac
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric import x25519

from pqfed.pqc.algorithms import KEM_SIZES, PQ_SIGNATURES
from pqfed.pqc.backends import Backend, KemPrivateKey, get_backend
from pqfed.pqc.encoding import Reader, Writer
from pqfed.pqc.errors import (
    CertificateError,
    DecodeError,
    HandshakeError,
    InvalidSignature,
    RecordError,
)
from pqfed.pqc.identity import Certificate, Identity, Role, TrustAnchor
from pqfed.pqc.keyschedule import (
    HASH_NAME,
    application_secrets,
    finished_mac,
    handshake_secrets,
    xwing_combine,
)
from pqfed.pqc.record import (
    DEFAULT_KEY_UPDATE_AFTER,
    MAX_PLAINTEXT,
    Frame,
    FrameType,
    InnerType,
    RecordProtection,
    encode_frame,
)

PROTOCOL_VERSION = 1
RANDOM_LEN = 32
X25519_LEN = 32
_CV_PAD = b" " * 64  # RFC 8446 §4.4.3: 64 spaces, then the context string and a zero byte
_SERVER_CV_CONTEXT = b"pqfed1, server CertificateVerify"
_CLIENT_CV_CONTEXT = b"pqfed1, client CertificateVerify"


class Group(enum.IntEnum):
    """Key-establishment groups. Codes follow the TLS hybrid group registry where one exists."""

    X25519_MLKEM768 = 0x11EC
    X25519_MLKEM1024 = 0x11EE
    X25519 = 0x001D  # classical baseline for benchmarks; never offered by default


GROUP_KEM: dict[Group, str | None] = {
    Group.X25519_MLKEM768: "ML-KEM-768",
    Group.X25519_MLKEM1024: "ML-KEM-1024",
    Group.X25519: None,
}


class Suite(enum.IntEnum):
    """Record protection + transcript hash (like TLS 1.3 cipher suites)."""

    AES_256_GCM_SHA384 = 0x1302
    CHACHA20_POLY1305_SHA384 = 0x5103


SUITE_AEAD: dict[Suite, str] = {
    Suite.AES_256_GCM_SHA384: "AES-256-GCM",
    Suite.CHACHA20_POLY1305_SHA384: "CHACHA20-POLY1305",
}


class MessageType(enum.IntEnum):
    CLIENT_HELLO = 1
    SERVER_HELLO = 2
    CERTIFICATE = 11
    CERTIFICATE_VERIFY = 15
    FINISHED = 20


# The suites offered when the caller names none, in preference order. Which one a host should
# prefer (AES instructions or not, PQFED_AEAD) is the driver's decision: pool.default_suites().
DEFAULT_SUITES = (Suite.AES_256_GCM_SHA384, Suite.CHACHA20_POLY1305_SHA384)


# Where a handshake's own random values come from: the hello randoms and the X25519 private
# keys (RFC 7748 §5: 32 random bytes, clamped by X25519 itself). Production: os.urandom.
# Tests fix it to replay a recorded handshake byte for byte (tests/pqc/vectors/handshake/);
# ML-KEM key generation and encapsulation and ML-DSA signing draw their randomness inside the
# backend and the signing key, which such a test supplies too (HandshakeConfig.backend,
# HandshakeConfig.identity).
RandomSource = Callable[[int], bytes]


def _x25519_private(random: RandomSource) -> x25519.X25519PrivateKey:
    return x25519.X25519PrivateKey.from_private_bytes(_draw(random, X25519_LEN))


def _draw(random: RandomSource, n: int) -> bytes:
    data = random(n)
    if len(data) != n:  # a broken source must never shorten a key or a random
        raise HandshakeError("random", f"randomness source returned {len(data)} of {n} bytes")
    return data


@dataclass(frozen=True, slots=True)
class KeyShare:
    """A client's ephemeral key share: an ML-KEM decapsulation key and an X25519 key."""

    group: Group
    kem: KemPrivateKey | None
    x25519: x25519.X25519PrivateKey
    x25519_public: bytes

    @classmethod
    def generate(cls, group: Group, backend: Backend,
                 random: RandomSource = os.urandom) -> KeyShare:
        alg = GROUP_KEM[group]
        priv = _x25519_private(random)
        return cls(group, backend.kem_generate(alg) if alg else None, priv,
                   priv.public_key().public_bytes_raw())


class KeyShareSource(Protocol):
    """Where a client takes its ephemeral key share from (`pqfed.pqc.pool.KeySharePool`
    generates them ahead of use); each share serves exactly one handshake."""

    def take(self, group: Group, backend: Backend) -> KeyShare: ...


class CryptoRunner(Protocol):
    """Runs the handshake's independent crypto jobs: the driver's choice of inline or threads.

    `run_all` runs every job and raises the first failure in job order; `start` begins a job
    and returns what gives its result (raising its error) when called."""

    def run_all(self, jobs: Sequence[Callable[[], object]]) -> list[object]: ...

    def start(self, job: Callable[[], bytes]) -> Callable[[], bytes]: ...


class InlineCrypto:
    """Every job in the calling thread, one after the other (no threads anywhere)."""

    def run_all(self, jobs: Sequence[Callable[[], object]]) -> list[object]:
        return [job() for job in jobs]

    def start(self, job: Callable[[], bytes]) -> Callable[[], bytes]:
        result = job()
        return lambda: result


INLINE = InlineCrypto()


@dataclass(frozen=True, slots=True)
class HandshakeConfig:
    """What one side offers, accepts and expects of its peer."""

    identity: Identity
    trust: TrustAnchor
    suites: tuple[Suite, ...] = DEFAULT_SUITES
    groups: tuple[Group, ...] = (Group.X25519_MLKEM768,)
    peer_signature_algorithms: tuple[str, ...] = PQ_SIGNATURES
    peer_roles: tuple[Role, ...] | None = None
    peer_node_id: str | None = None
    timeout_s: float = 10.0
    max_plaintext: int = MAX_PLAINTEXT
    key_update_after: int = DEFAULT_KEY_UPDATE_AFTER
    backend: Backend | None = None  # None: the process-wide default (get_backend())
    # Verify the peer's certificate (CA signature) and CertificateVerify concurrently, through
    # `crypto`. Off: one after the other. None: the driver decides (pool.parallel_default();
    # the bare state machine runs them one after the other).
    parallel_auth: bool | None = None
    key_shares: KeyShareSource | None = None  # client side: precomputed ephemeral shares
    # Client side: start signing through `crypto` as soon as ServerHello arrives (on a thread,
    # this overlaps the server's signature); off: sign inline in the same step.
    early_signature: bool = True
    # Who runs the jobs above; None: the driver's (channel.py: a shared ThreadedCrypto), or
    # INLINE when the state machine is used bare.
    crypto: CryptoRunner | None = None
    # Hello randoms and X25519 keys (see RandomSource); never set outside tests.
    random: RandomSource = os.urandom


@dataclass(frozen=True, slots=True)
class Session:
    """The result of a completed handshake, built once when it completes. (The record
    protections inside keep their own sequence numbers and keys.)"""

    suite: Suite
    group: Group
    peer: Certificate
    send: RecordProtection
    recv: RecordProtection
    exporter_secret: bytes
    transcript_hash: bytes


def _msg(mtype: MessageType, body: bytes) -> bytes:
    return Writer().u8(mtype).vec32(body).getvalue()


def _read_messages(data: bytes, structure: str) -> list[tuple[MessageType, bytes, bytes]]:
    """Splits a flight into (type, body, encoded message) triples."""
    r = Reader(data, structure)
    out: list[tuple[MessageType, bytes, bytes]] = []
    while r.remaining:
        code = r.u8("msg_type")
        try:
            mtype = MessageType(code)
        except ValueError:
            raise HandshakeError(f"{structure}.msg_type", f"unknown message {code}") from None
        body = r.vec32(f"{mtype.name.lower()}", 0, 1 << 16)
        out.append((mtype, body, _msg(mtype, body)))
    return out


def _expect(msgs: list[tuple[MessageType, bytes, bytes]], order: tuple[MessageType, ...],
            structure: str) -> list[tuple[MessageType, bytes, bytes]]:
    got = tuple(m[0] for m in msgs)
    if got != order:
        raise HandshakeError(
            structure, f"expected messages {[m.name for m in order]}, got {[m.name for m in got]}"
        )
    return msgs


def _u16_list(values: tuple[int, ...]) -> bytes:
    w = Writer()
    for v in values:
        w.u16(v)
    return w.getvalue()


def _parse_u16_list(raw: bytes, structure: str) -> tuple[int, ...]:
    if len(raw) % 2:
        raise HandshakeError(structure, "odd length for a list of 16-bit codes")
    return tuple(int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2))


class _Transcript:
    __slots__ = ("_h",)

    def __init__(self) -> None:
        self._h = hashlib.new(HASH_NAME)

    def add(self, encoded: bytes) -> None:
        self._h.update(encoded)

    def digest(self) -> bytes:
        return self._h.copy().digest()

    def digest_with(self, extra: bytes) -> bytes:
        h = self._h.copy()
        h.update(extra)
        return h.digest()

    def copy(self) -> _Transcript:
        out = _Transcript()
        out._h = self._h.copy()
        return out


def _decode_peer(config: HandshakeConfig, cert_body: bytes, structure: str) -> Certificate:
    try:
        r = Reader(cert_body, structure)
        cert = Certificate.from_bytes(r.vec16("certificate", 1, 16384))
        r.finish()
    except DecodeError as exc:
        raise HandshakeError(exc.field, exc.reason) from None
    if cert.sig_algorithm not in config.peer_signature_algorithms:
        raise HandshakeError(
            f"{structure}.sig_algorithm",
            f"{cert.sig_algorithm} not accepted "
            f"(accepted: {', '.join(config.peer_signature_algorithms)})",
        )
    return cert


def _trust_peer(config: HandshakeConfig, cert: Certificate, roles: tuple[Role, ...],
                structure: str) -> None:
    try:
        config.trust.verify(cert, roles=config.peer_roles or roles, node_id=config.peer_node_id)
    except CertificateError as exc:
        raise HandshakeError(f"{structure}.{exc.field}", exc.reason) from None


def _check_cv(backend: Backend, cert: Certificate, context: bytes, th: bytes, sig: bytes,
              structure: str) -> None:
    try:
        backend.sig_verify(cert.sig_algorithm, cert.public_key, _CV_PAD + context + b"\0" + th, sig)
    except InvalidSignature:
        raise HandshakeError(structure, "signature over the transcript does not verify") from None


def _check_finished(expected: bytes, got: bytes, structure: str) -> None:
    if not hmac.compare_digest(expected, got):
        raise HandshakeError(structure, "MAC does not match the transcript")


def _certificate_body(identity: Identity) -> bytes:
    return Writer().vec16(identity.certificate.to_bytes()).getvalue()


def _x25519_shared(private: x25519.X25519PrivateKey, peer_public: bytes, structure: str) -> bytes:
    try:
        return private.exchange(x25519.X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        raise HandshakeError(structure, "X25519 public key is a low-order point") from None


class _State(enum.Enum):
    START = "start"
    WAIT_SERVER_HELLO = "wait ServerHello"
    WAIT_SERVER_FLIGHT = "wait server Certificate/CertificateVerify/Finished"
    WAIT_CLIENT_HELLO = "wait ClientHello"
    WAIT_CLIENT_FLIGHT = "wait client Certificate/CertificateVerify/Finished"
    DONE = "done"
    FAILED = "failed"


class _Endpoint:
    def __init__(self, config: HandshakeConfig, backend: Backend | None) -> None:
        self.config = config
        self.backend = backend or config.backend or get_backend()
        self.transcript = _Transcript()
        self.session: Session | None = None
        self._state = _State.START
        self._deferred: Callable[[], bytes] | None = None
        self._crypto: CryptoRunner = config.crypto or INLINE

    def _authenticate(self, checks: list[Callable[[], object]]) -> None:
        """The peer's two checks, concurrently through the runner when asked."""
        if self.config.parallel_auth:
            self._crypto.run_all(checks)
        else:
            INLINE.run_all(checks)

    @property
    def complete(self) -> bool:
        return self._state is _State.DONE

    def receive(self, frame: Frame) -> bytes:
        """Processes one frame from the peer; returns the bytes to send (may be empty).

        Any error leaves the endpoint FAILED: the caller must close the connection."""
        return b"".join(self.receive_pipelined(frame))

    def receive_pipelined(self, frame: Frame) -> Iterator[bytes]:
        """Like `receive`, but yields what can be sent before the rest is computed: the
        server's ServerHello goes out before it signs its CertificateVerify, so the client
        decapsulates and derives keys while the server signs (pipelining)."""
        yield self._guard(self._receive, frame)
        while self._deferred is not None:
            job, self._deferred = self._deferred, None
            yield self._guard(job)

    def _guard(self, fn: Callable[..., bytes], *args: Frame) -> bytes:
        try:
            return fn(*args)
        except DecodeError as exc:
            self._state = _State.FAILED
            raise HandshakeError(exc.field, exc.reason) from None
        except HandshakeError:
            self._state = _State.FAILED
            raise
        except Exception as exc:
            state, self._state = self._state, _State.FAILED
            raise HandshakeError(state.value, f"{type(exc).__name__}: {exc}") from exc

    def _receive(self, frame: Frame) -> bytes:
        raise NotImplementedError

    def _require(self, state: _State, frame: Frame, ftype: FrameType) -> None:
        if self._state is not state:
            raise HandshakeError("state", f"unexpected frame in state {self._state.value!r}")
        if frame.type is not ftype:
            raise HandshakeError("frame.type", f"expected {ftype.name} in {state.value!r}")

    def _open_flight(self, protection: RecordProtection, frame: Frame, structure: str) -> bytes:
        try:
            inner_type, data = protection.open(frame)
        except RecordError as exc:
            raise HandshakeError(f"{structure}.{exc.field}", exc.reason) from None
        if inner_type is not InnerType.HANDSHAKE:
            raise HandshakeError(f"{structure}.inner_type", f"{inner_type.name} during handshake")
        return data

    def _own_certificate(self, context: bytes) -> tuple[bytes, Callable[[], bytes]]:
        """Adds this side's Certificate to the transcript; returns it and the signing job
        for its CertificateVerify (RFC 8446 §4.4.3 content)."""
        cert_msg = _msg(MessageType.CERTIFICATE, _certificate_body(self.config.identity))
        self.transcript.add(cert_msg)
        content = _CV_PAD + context + b"\0" + self.transcript.digest()
        return cert_msg, functools.partial(self.config.identity.sign, content, b"")

    def _finish_flight(self, cert_msg: bytes, sig: bytes, hs_secret: bytes) -> bytes:
        """CertificateVerify and Finished after `cert_msg`, added to the transcript."""
        cv_msg = _msg(MessageType.CERTIFICATE_VERIFY, Writer().vec16(sig).getvalue())
        self.transcript.add(cv_msg)
        fin_msg = _msg(MessageType.FINISHED, finished_mac(hs_secret, self.transcript.digest()))
        self.transcript.add(fin_msg)
        return cert_msg + cv_msg + fin_msg

    def _read_flight(
        self, data: bytes, hs_secret: bytes, context: bytes, roles: tuple[Role, ...],
        structure: str, hello: _Transcript | None = None,
    ) -> tuple[Certificate, list[Callable[[], object]]]:
        """Parses the peer's Certificate/CertificateVerify/Finished, checks the Finished MAC
        and extends the transcript; returns the peer certificate and the two authentication
        checks (CA signature + role, transcript signature) still to run."""
        msgs = _expect(
            _read_messages(data, structure),
            (MessageType.CERTIFICATE, MessageType.CERTIFICATE_VERIFY, MessageType.FINISHED),
            structure,
        )
        (_, cert_body, cert_msg), (_, cv_body, cv_msg), (_, fin_body, fin_msg) = msgs
        peer = _decode_peer(self.config, cert_body, f"{structure}.certificate")
        self.transcript.add(cert_msg)
        # CertificateVerify covers the hellos and the signer's own Certificate (see
        # ClientHandshake._server_hello); for the server that is the running transcript.
        th_cert = hello.digest_with(cert_msg) if hello else self.transcript.digest()
        r = Reader(cv_body, f"{structure}.certificate_verify")
        sig = r.vec16("signature", 1, 8192)
        r.finish()
        self.transcript.add(cv_msg)
        _check_finished(finished_mac(hs_secret, self.transcript.digest()), fin_body,
                        f"{structure}.finished")
        self.transcript.add(fin_msg)
        checks: list[Callable[[], object]] = [
            functools.partial(_trust_peer, self.config, peer, roles, f"{structure}.certificate"),
            functools.partial(_check_cv, self.backend, peer, context, th_cert, sig,
                              f"{structure}.certificate_verify"),
        ]
        return peer, checks


class ClientHandshake(_Endpoint):
    """The connecting side (an FL client's sidecar, or an edge aggregator upstream)."""

    def __init__(self, config: HandshakeConfig, backend: Backend | None = None) -> None:
        super().__init__(config, backend)
        if not config.groups or not config.suites:
            raise HandshakeError("config", "offer at least one group and one suite")
        self._group = config.groups[0]
        share = (config.key_shares.take(self._group, self.backend) if config.key_shares
                 else KeyShare.generate(self._group, self.backend, config.random))
        self._kem: KemPrivateKey | None = share.kem
        self._x25519 = share.x25519
        self._x25519_public = share.x25519_public
        self._suite: Suite | None = None
        self._hs_client = b""
        self._server_hs = b""
        self._master = b""
        self._recv_hs: RecordProtection | None = None
        self._cert_msg = b""
        self._early_sig: Callable[[], bytes] | None = None

    def start(self) -> bytes:
        if self._state is not _State.START:
            raise HandshakeError("state", "ClientHello already sent")
        kem_pk = self._kem.public_bytes() if self._kem is not None else b""
        body = (
            Writer()
            .u16(PROTOCOL_VERSION)
            .vec8(_u16_list(tuple(self.config.suites)))
            .vec8(_u16_list(tuple(self.config.groups)))
            .raw(_draw(self.config.random, RANDOM_LEN))
            .text(self.config.identity.certificate.federation)
            .u16(self._group)
            .vec16(kem_pk)
            .raw(self._x25519_public)
            .getvalue()
        )
        msg = _msg(MessageType.CLIENT_HELLO, body)
        self.transcript.add(msg)
        self._state = _State.WAIT_SERVER_HELLO
        return encode_frame(FrameType.HANDSHAKE, msg)

    def _receive(self, frame: Frame) -> bytes:
        if self._state is _State.WAIT_SERVER_HELLO:
            self._require(_State.WAIT_SERVER_HELLO, frame, FrameType.HANDSHAKE)
            self._server_hello(frame.body)
            return b""
        self._require(_State.WAIT_SERVER_FLIGHT, frame, FrameType.PROTECTED)
        assert self._recv_hs is not None and self._suite is not None
        data = self._open_flight(self._recv_hs, frame, "server_flight")
        peer, checks = self._read_flight(data, self._server_hs, _SERVER_CV_CONTEXT,
                                         (Role.AGGREGATOR, Role.EDGE), "server_flight")
        app = application_secrets(self._master, self.transcript.digest())
        self._authenticate(checks)
        assert self._early_sig is not None
        sig = self._early_sig()  # sent only now that the server is authenticated
        cert_msg = self._cert_msg
        self.transcript.add(cert_msg)
        aead = SUITE_AEAD[self._suite]
        flight = self._finish_flight(cert_msg, sig, self._hs_client)
        out = RecordProtection(aead, self._hs_client).seal(InnerType.HANDSHAKE, flight)
        self.session = Session(self._suite, self._group, peer, RecordProtection(aead, app.client),
                               RecordProtection(aead, app.server), app.exporter,
                               self.transcript.digest())
        self._state = _State.DONE
        return out

    def _server_hello(self, body: bytes) -> None:
        msgs = _expect(_read_messages(body, "server_hello"), (MessageType.SERVER_HELLO,),
                       "server_hello")
        _, sh, sh_msg = msgs[0]
        r = Reader(sh, "server_hello")
        version = r.u16("version")
        if version != PROTOCOL_VERSION:
            raise HandshakeError("server_hello.version", f"{version} is not {PROTOCOL_VERSION}")
        suite_code = r.u16("suite")
        if suite_code not in self.config.suites:
            raise HandshakeError("server_hello.suite", f"{suite_code:#06x} was not offered")
        group_code = r.u16("group")
        if group_code != self._group:
            raise HandshakeError("server_hello.group",
                                 f"{group_code:#06x} is not the group of the key share sent")
        r.raw(RANDOM_LEN, "random")
        kem_alg = GROUP_KEM[self._group]
        ct_len = KEM_SIZES[kem_alg].ciphertext if kem_alg else 0
        kem_ct = r.vec16("kem_ciphertext", ct_len, ct_len)
        server_x = r.raw(X25519_LEN, "x25519_public")
        r.finish()
        ss_x = _x25519_shared(self._x25519, server_x, "server_hello.x25519_public")
        ss_m = self._kem.decapsulate(kem_ct) if self._kem is not None else b""
        self.transcript.add(sh_msg)
        shared = xwing_combine(ss_m, ss_x, server_x, self._x25519_public)
        hs = handshake_secrets(shared, self.transcript.digest())
        self._suite = Suite(suite_code)
        self._hs_client, self._server_hs, self._master = (hs.client_handshake,
                                                          hs.server_handshake, hs.master)
        self._recv_hs = RecordProtection(SUITE_AEAD[self._suite], hs.server_handshake)
        # SIGMA-I (Krawczyk 2003 §5.1): the initiator signs both key shares and its own
        # identity; binding to the responder's identity and the full transcript comes from
        # the Finished MAC. So the client signs H(ClientHello || ServerHello || its own
        # Certificate) now, while the server is still signing its CertificateVerify, instead
        # of after the server's flight as TLS 1.3 does; it is sent only after the server's
        # flight is verified. Version, offers and choices are in the hellos, so downgrade
        # protection is unchanged.
        self._cert_msg = _msg(MessageType.CERTIFICATE, _certificate_body(self.config.identity))
        content = _CV_PAD + _CLIENT_CV_CONTEXT + b"\0" + self.transcript.digest_with(
            self._cert_msg)
        sign = functools.partial(self.config.identity.sign, content, b"")
        self._early_sig = (self._crypto if self.config.early_signature else INLINE).start(sign)
        self._state = _State.WAIT_SERVER_FLIGHT


@dataclass(frozen=True, slots=True)
class _ServerKeys:
    """What the server holds between its flight and the client's: the Session without the
    peer, who is known only once the client's flight is verified."""

    suite: Suite
    group: Group
    send: RecordProtection
    recv: RecordProtection
    exporter_secret: bytes


class ServerHandshake(_Endpoint):
    """The accepting side (the aggregator's sidecar)."""

    def __init__(self, config: HandshakeConfig, backend: Backend | None = None) -> None:
        super().__init__(config, backend)
        self._state = _State.WAIT_CLIENT_HELLO
        self._pending: _ServerKeys | None = None
        self._hs_client = b""
        self._hello = _Transcript()

    def _receive(self, frame: Frame) -> bytes:
        if self._state is _State.WAIT_CLIENT_HELLO:
            self._require(_State.WAIT_CLIENT_HELLO, frame, FrameType.HANDSHAKE)
            return self._client_hello(frame.body)
        self._require(_State.WAIT_CLIENT_FLIGHT, frame, FrameType.PROTECTED)
        keys = self._pending
        assert keys is not None
        aead = SUITE_AEAD[keys.suite]
        recv_hs = RecordProtection(aead, self._hs_client)
        data = self._open_flight(recv_hs, frame, "client_flight")
        peer, checks = self._read_flight(data, self._hs_client, _CLIENT_CV_CONTEXT,
                                         (Role.CLIENT, Role.EDGE), "client_flight",
                                         hello=self._hello)
        self._authenticate(checks)
        self.session = Session(keys.suite, keys.group, peer, keys.send, keys.recv,
                               keys.exporter_secret, self.transcript.digest())
        self._state = _State.DONE
        return b""

    def _client_hello(self, body: bytes) -> bytes:
        msgs = _expect(_read_messages(body, "client_hello"), (MessageType.CLIENT_HELLO,),
                       "client_hello")
        _, ch, ch_msg = msgs[0]
        r = Reader(ch, "client_hello")
        version = r.u16("version")
        if version != PROTOCOL_VERSION:
            raise HandshakeError("client_hello.version", f"{version} is not {PROTOCOL_VERSION}")
        offered_suites = _parse_u16_list(r.vec8("suites", 2, 64), "client_hello.suites")
        offered_groups = _parse_u16_list(r.vec8("groups", 2, 64), "client_hello.groups")
        r.raw(RANDOM_LEN, "random")
        federation = r.text("federation", 1, 63)
        if federation != self.config.trust.root.federation:
            raise HandshakeError("client_hello.federation",
                                 f"{federation!r} is not {self.config.trust.root.federation!r}")
        share_group = r.u16("key_share.group")
        if share_group not in offered_groups:
            raise HandshakeError("client_hello.key_share.group", "not in the offered groups")
        if share_group not in self.config.groups:
            allowed = ", ".join(g.name for g in self.config.groups)
            raise HandshakeError("client_hello.key_share.group",
                                 f"{share_group:#06x} not accepted (accepted: {allowed})")
        group = Group(share_group)
        kem_alg = GROUP_KEM[group]
        pk_len = KEM_SIZES[kem_alg].public_key if kem_alg else 0
        kem_pk = r.vec16("key_share.kem_public", pk_len, pk_len)
        client_x = r.raw(X25519_LEN, "key_share.x25519_public")
        r.finish()
        # The client's preference order decides (it knows whether it has AES instructions).
        suite = next((Suite(s) for s in offered_suites if s in self.config.suites), None)
        if suite is None:
            raise HandshakeError("client_hello.suites", "no suite in common")
        self.transcript.add(ch_msg)

        x_private = _x25519_private(self.config.random)
        x_public = x_private.public_key().public_bytes_raw()
        ss_x = _x25519_shared(x_private, client_x, "client_hello.key_share.x25519_public")
        ct, ss_m = b"", b""
        if kem_alg is not None:
            try:
                ct, ss_m = self.backend.kem_encapsulate(kem_alg, kem_pk)
            except ValueError as exc:  # FIPS 203 §7.2 encapsulation key check
                raise HandshakeError("client_hello.key_share.kem_public", str(exc)) from None
        sh_body = (
            Writer().u16(PROTOCOL_VERSION).u16(suite).u16(group)
            .raw(_draw(self.config.random, RANDOM_LEN)).vec16(ct).raw(x_public).getvalue()
        )
        sh_msg = _msg(MessageType.SERVER_HELLO, sh_body)
        self.transcript.add(sh_msg)
        shared = xwing_combine(ss_m, ss_x, x_public, client_x)
        hs = handshake_secrets(shared, self.transcript.digest())
        self._hello = self.transcript.copy()  # the client signs over this + its Certificate
        self._hs_client = hs.client_handshake
        self._state = _State.WAIT_CLIENT_FLIGHT

        def server_flight() -> bytes:
            aead = SUITE_AEAD[suite]
            cert_msg, sign = self._own_certificate(_SERVER_CV_CONTEXT)
            flight = self._finish_flight(cert_msg, sign(), hs.server_handshake)
            app = application_secrets(hs.master, self.transcript.digest())
            self._pending = _ServerKeys(suite, group, RecordProtection(aead, app.server),
                                        RecordProtection(aead, app.client), app.exporter)
            return RecordProtection(aead, hs.server_handshake).seal(InnerType.HANDSHAKE, flight)

        self._deferred = server_flight
        return encode_frame(FrameType.HANDSHAKE, sh_msg)
