"""Fixed inputs for known-answer files: labelled deterministic byte streams, identities from
fixed ML-DSA seeds with fixed-field certificates, and a pqfed1 handshake whose every random
value comes from such streams. Used by vectors/generate.py (to write the files) and by
test_vectors.py (to replay them). Test-only: nothing here is imported by the product.

Where randomness enters a handshake and how it is fixed here:
* hello randoms, X25519 keys: `HandshakeConfig.random` (production: os.urandom);
* ML-KEM key generation: FIPS 203 ML-KEM.KeyGen_internal(d, z), 64 bytes from the stream
  (pyca `from_seed_bytes`, liboqs `OQS_KEM_keypair_derand`);
* ML-KEM encapsulation: Encaps_internal(ek, m), m from the stream (liboqs draws m with one
  `randombytes(32)` call, which `fixed_randomness` answers; pyca has no derandomized form);
* ML-DSA signing: the 32-byte `rnd` of FIPS 204 hedged signing, from the stream (liboqs,
  through `fixed_randomness`; pyca signs hedged with its own randomness only).
So a byte-for-byte replay of both sides needs liboqs; with pyca alone the verifying side
(a client that reads the recorded server messages) is replayed instead.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any

from pqfed.pqc.backends import get_backend
from pqfed.pqc.identity import CERT_CONTEXT, Certificate, Identity, Role, TrustAnchor, key_id

FEDERATION = "fed-golden"
NOT_BEFORE = 1_767_225_600  # 2026-01-01T00:00:00Z
NOT_AFTER = 4_102_444_800  # 2100-01-01T00:00:00Z
SIG_ALG = "ML-DSA-65"


def fixed_bytes(label: str, n: int) -> bytes:
    """n bytes of SHAKE-256("pqfed-kat/" + label): the same on every run and machine."""
    return hashlib.shake_256(f"pqfed-kat/{label}".encode()).digest(n)


class ByteStream:
    """A deterministic randomness source: successive SHAKE-256 output of one label."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._pos = 0
        self.drawn: list[int] = []  # sizes of the draws, in order (recorded in the file)

    def __call__(self, n: int) -> bytes:
        end = self._pos + n
        out = fixed_bytes(self.label, end)[self._pos:end]
        self._pos = end
        self.drawn.append(n)
        return out


class FixedRndKey:
    """An ML-DSA signing key (liboqs) whose hedged-signing `rnd` comes from a stream."""

    def __init__(self, xi: bytes, stream: ByteStream | None) -> None:
        from pqfed.pqc.backends.liboqs import load_library

        self._key = get_backend("liboqs").sig_load_private(SIG_ALG, xi)
        self._api = load_library()
        self._stream = stream
        self.algorithm = SIG_ALG

    def public_bytes(self) -> bytes:
        return bytes(self._key.public_bytes())

    def private_bytes(self) -> bytes:
        return bytes(self._key.private_bytes())

    def sign(self, message: bytes, context: bytes = b"") -> bytes:
        rnd = self._stream(32) if self._stream is not None else bytes(32)  # 0^32: FIPS 204
        with self._api.fixed_randomness(rnd):  # deterministic variant
            return bytes(self._key.sign(message, context))


class FixedBackend:
    """The process backend, with ML-KEM key generation and encapsulation from a stream."""

    def __init__(self, stream: ByteStream, verify_with: str = "liboqs") -> None:
        self._stream = stream
        self._inner = get_backend(verify_with)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def kem_generate(self, algorithm: str) -> Any:
        from pqfed.pqc.backends.pyca import PycaKemKey

        seed = self._stream(64)  # FIPS 203 d || z
        return PycaKemKey(algorithm, _pyca_kem(algorithm).from_seed_bytes(seed))

    def kem_encapsulate(self, algorithm: str, public_key: bytes) -> tuple[bytes, bytes]:
        from pqfed.pqc.backends.liboqs import load_library

        m = self._stream(32)
        with load_library().fixed_randomness(m):
            ct, ss = get_backend("liboqs").kem_encapsulate(algorithm, public_key)
        return bytes(ct), bytes(ss)

    def sig_verify(self, algorithm: str, public_key: bytes, message: bytes, signature: bytes,
                   context: bytes = b"") -> None:
        self._inner.sig_verify(algorithm, public_key, message, signature, context)


def _pyca_kem(algorithm: str) -> Any:
    from cryptography.hazmat.primitives.asymmetric import mlkem

    return {"ML-KEM-768": mlkem.MLKEM768PrivateKey,
            "ML-KEM-1024": mlkem.MLKEM1024PrivateKey}[algorithm]


@dataclass(frozen=True)
class GoldenPki:
    ca: Certificate
    aggregator: Certificate
    client: Certificate
    xi: dict[str, bytes]

    @property
    def trust(self) -> TrustAnchor:
        return TrustAnchor(self.ca)


def certificate_fields(node: str, role: Role, public_key: bytes, issuer: bytes,
                       serial: int) -> Certificate:
    return Certificate(FEDERATION, node, role, SIG_ALG, public_key, NOT_BEFORE, NOT_AFTER,
                       serial, issuer)


def golden_pki() -> GoldenPki:
    """CA, aggregator and client certificates from fixed seeds and fields, signed with the
    FIPS 204 deterministic variant (rnd = 0^32): byte-identical on every run."""
    xi = {name: fixed_bytes(f"golden/{name}/xi", 32) for name in ("ca", "aggregator", "client")}
    ca_key = FixedRndKey(xi["ca"], None)
    ca_pk = ca_key.public_bytes()
    ca = certificate_fields("ca", Role.CA, ca_pk, key_id(ca_pk), 1)
    ca = replace(ca, signature=ca_key.sign(ca.tbs_bytes(), CERT_CONTEXT))
    certs = {}
    for serial, (name, role) in enumerate((("aggregator", Role.AGGREGATOR),
                                           ("client", Role.CLIENT)), start=2):
        pk = FixedRndKey(xi[name], None).public_bytes()
        cert = certificate_fields(name, role, pk, ca.key_id, serial)
        certs[name] = replace(cert, signature=ca_key.sign(cert.tbs_bytes(), CERT_CONTEXT))
    return GoldenPki(ca, certs["aggregator"], certs["client"], xi)


def golden_identity(pki: GoldenPki, name: str, stream: ByteStream | None) -> Identity:
    cert = pki.aggregator if name == "aggregator" else pki.client
    return Identity(cert, FixedRndKey(pki.xi[name], stream))


GOLDEN_SUITES = ("AES_256_GCM_SHA384", "CHACHA20_POLY1305_SHA384")
APP_DATA = {"client": b"pqfed1 golden: client application data",
            "server": b"pqfed1 golden: server application data"}


def golden_configs(pki: GoldenPki, client_stream: ByteStream, server_stream: ByteStream,
                   verify_with: str = "liboqs") -> tuple[Any, Any]:
    """Client and server HandshakeConfig with every random value from the two streams; one
    thread per side (no early signature, no parallel checks) so the draw order is fixed."""
    from pqfed.pqc.handshake import Group, HandshakeConfig, Suite

    suites = tuple(Suite[s] for s in GOLDEN_SUITES)
    configs = []
    for name, stream in (("client", client_stream), ("aggregator", server_stream)):
        configs.append(HandshakeConfig(
            golden_identity(pki, name, stream), pki.trust, suites=suites,
            groups=(Group.X25519_MLKEM768,), backend=FixedBackend(stream, verify_with),  # type: ignore[arg-type]
            parallel_auth=False, early_signature=False, random=stream))
    return configs[0], configs[1]


def run_golden_handshake(pki: GoldenPki) -> dict[str, bytes]:
    """Both sides in memory: every message on the wire, and what each session holds."""
    from pqfed.pqc.handshake import ClientHandshake, ServerHandshake
    from pqfed.pqc.record import FrameDecoder, InnerType

    client_cfg, server_cfg = golden_configs(pki, ByteStream("golden/handshake/client"),
                                            ByteStream("golden/handshake/server"))
    client, server = ClientHandshake(client_cfg), ServerHandshake(server_cfg)

    def frame(data: bytes) -> Any:
        (f,) = list(FrameDecoder().feed(data))
        return f

    out: dict[str, bytes] = {"client_hello": client.start()}
    out["server_hello"], out["server_flight"] = list(
        server.receive_pipelined(frame(out["client_hello"])))
    assert client.receive(frame(out["server_hello"])) == b""
    out["client_flight"] = client.receive(frame(out["server_flight"]))
    assert server.receive(frame(out["client_flight"])) == b""
    assert client.session is not None and server.session is not None
    out["client_app_record"] = client.session.send.seal(InnerType.DATA, APP_DATA["client"])
    out["server_app_record"] = server.session.send.seal(InnerType.DATA, APP_DATA["server"])
    assert server.session.recv.open(frame(out["client_app_record"])) == (
        InnerType.DATA, APP_DATA["client"])
    assert client.session.recv.open(frame(out["server_app_record"])) == (
        InnerType.DATA, APP_DATA["server"])
    assert client.session.exporter_secret == server.session.exporter_secret
    assert client.session.transcript_hash == server.session.transcript_hash
    out["exporter_master"] = client.session.exporter_secret
    out["transcript_hash"] = client.session.transcript_hash
    return out


def golden_secrets(m: dict[str, bytes], client_x25519_private: bytes,
                   client_mlkem_seed: bytes) -> dict[str, bytes]:
    """The golden handshake's secrets recomputed from its messages and the client's fixed
    inputs alone (X-Wing decapsulation, RFC 8446 §7.1 schedule, record decryption): no
    handshake state machine involved."""
    from cryptography.hazmat.primitives.asymmetric import x25519

    from pqfed.pqc import keyschedule as ks
    from pqfed.pqc.record import HEADER_LEN, FrameDecoder, RecordProtection

    ch, sh = m["client_hello"][HEADER_LEN:], m["server_hello"][HEADER_LEN:]
    body = sh[5:]  # u8 type | u32 length | version, suite, group, random(32), ct, x25519
    ct_len = int.from_bytes(body[38:40], "big")
    ct_m, ct_x = body[40:40 + ct_len], body[40 + ct_len:72 + ct_len]
    priv = x25519.X25519PrivateKey.from_private_bytes(client_x25519_private)
    pk_x = priv.public_key().public_bytes_raw()
    ss_m = bytes(_pyca_kem("ML-KEM-768").from_seed_bytes(client_mlkem_seed).decapsulate(ct_m))
    ss_x = priv.exchange(x25519.X25519PublicKey.from_public_bytes(ct_x))
    shared = ks.xwing_combine(ss_m, ss_x, ct_x, pk_x)
    hello_hash = ks.transcript_hash_of(ch + sh)
    hs = ks.handshake_secrets(shared, hello_hash)

    def opened(secret: bytes, wire: bytes) -> bytes:
        (frame,) = list(FrameDecoder().feed(wire))
        return RecordProtection("AES-256-GCM", secret).open(frame)[1]

    server_flight = opened(hs.server_handshake, m["server_flight"])
    fin_hash = ks.transcript_hash_of(ch + sh + server_flight)
    app = ks.application_secrets(hs.master, fin_hash)
    client_flight = opened(hs.client_handshake, m["client_flight"])
    c_key, c_iv = ks.traffic_key_iv(app.client, 32)
    s_key, s_iv = ks.traffic_key_iv(app.server, 32)
    return {"shared_secret": shared, "hello_hash": hello_hash,
            "client_handshake_traffic": hs.client_handshake,
            "server_handshake_traffic": hs.server_handshake, "master_secret": hs.master,
            "server_finished_hash": fin_hash, "client_app_traffic": app.client,
            "server_app_traffic": app.server, "exporter_master": app.exporter,
            "transcript_hash": ks.transcript_hash_of(ch + sh + server_flight + client_flight),
            "client_app_key": c_key, "client_app_iv": c_iv, "server_app_key": s_key,
            "server_app_iv": s_iv}
