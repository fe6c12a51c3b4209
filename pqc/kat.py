"""Known-answer checks run by `pqfed selftest`: ML-KEM (FIPS 203), ML-DSA (FIPS 204), the
X-Wing combiner, the pqfed1 key schedule and record protection.

The vectors in ``kat.json`` fix, for a seed, what FIPS 203/204 make deterministic: the public
key derived from the seed, the shared secret a fixed ciphertext decapsulates to, the implicit
rejection secret of a tampered ciphertext, and that a fixed signature verifies (and a flipped
one does not); then an X-Wing vector (keys from a seed, decapsulation through our combiner;
the test suite checks the same code against the draft's own vectors), the pqfed1 secrets of a
fixed shared secret and transcript, and one protected record per AEAD. A build whose PQC code
or OpenSSL is wrong for its architecture (e.g. an arm64 image run on a Raspberry Pi or under
qemu) fails here before it carries any traffic. One source of truth: every entry but X-Wing's
is a record of a vector file under tests/pqc/vectors/ (its ``_source``), copied by
tests/pqc/vectors/generate.py, and tests/pqc/test_vectors.py fails when the two disagree.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import mldsa, mlkem, x25519

from pqfed.pqc.backends import get_backend
from pqfed.pqc.errors import InvalidSignature, RecordError
from pqfed.pqc.keyschedule import application_secrets, handshake_secrets, xwing_combine
from pqfed.pqc.record import FrameDecoder, InnerType, RecordProtection

__all__ = ["KatResult", "run_known_answer_tests"]

_VECTORS = Path(__file__).with_name("kat.json")
_KEM_FROM_SEED: dict[str, Any] = {"ML-KEM-768": mlkem.MLKEM768PrivateKey,
                                  "ML-KEM-1024": mlkem.MLKEM1024PrivateKey}
_SIG_FROM_SEED: dict[str, Any] = {"ML-DSA-65": mldsa.MLDSA65PrivateKey}


@dataclass(frozen=True)
class KatResult:
    """One known-answer check: ``ok`` False carries what differed in ``detail``."""

    name: str
    ok: bool
    detail: str = ""


@cache
def _vectors() -> dict[str, dict[str, str]]:
    data: dict[str, Any] = json.loads(_VECTORS.read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def _check(name: str, got: bytes | str, want: str) -> KatResult:
    got_hex = got if isinstance(got, str) else got.hex()
    if got_hex == want:
        return KatResult(name, True)
    return KatResult(name, False, f"expected {want[:16]}..., got {got_hex[:16]}...")


def _kem(alg: str, v: dict[str, str]) -> list[KatResult]:
    key = _KEM_FROM_SEED[alg].from_seed_bytes(bytes.fromhex(v["seed"]))
    ct = bytes.fromhex(v["ciphertext"])
    tampered = bytes([ct[0] ^ 1]) + ct[1:]
    pk = key.public_key().public_bytes_raw()
    # Encapsulation is randomized: its answer is checked by decapsulating it again, through
    # the backend the sidecar uses.
    enc_ct, enc_ss = get_backend().kem_encapsulate(alg, pk)
    return [
        _check(f"{alg} keygen from seed", hashlib.sha256(pk).hexdigest(),
               v["public_key_sha256"]),
        _check(f"{alg} decapsulate", key.decapsulate(ct), v["shared_secret"]),
        _check(f"{alg} implicit rejection", key.decapsulate(tampered),
               v["rejection_secret_for_first_byte_flipped"]),
        _check(f"{alg} encapsulate round trip", key.decapsulate(enc_ct), enc_ss.hex()),
    ]


def _sig(alg: str, v: dict[str, str]) -> list[KatResult]:
    key = _SIG_FROM_SEED[alg].from_seed_bytes(bytes.fromhex(v["seed"]))
    pk = key.public_key().public_bytes_raw()
    msg, ctx, sig = (bytes.fromhex(v[k]) for k in ("message", "context", "signature"))
    backend = get_backend()
    out = [_check(f"{alg} keygen from seed", hashlib.sha256(pk).hexdigest(),
                  v["public_key_sha256"])]
    try:
        backend.sig_verify(alg, pk, msg, sig, ctx)
        out.append(KatResult(f"{alg} verify known signature", True))
    except InvalidSignature as exc:
        out.append(KatResult(f"{alg} verify known signature", False, str(exc)))
    flipped = bytes([sig[0] ^ 1]) + sig[1:]
    try:
        backend.sig_verify(alg, pk, msg, flipped, ctx)
        out.append(KatResult(f"{alg} reject altered signature", False,
                             "a signature with one bit flipped verified"))
    except InvalidSignature:
        out.append(KatResult(f"{alg} reject altered signature", True))
    return out


def _xwing(v: dict[str, str]) -> list[KatResult]:
    """draft-connolly-cfrg-xwing-kem: keys from the 32-byte seed (SHAKE-256 expansion), then
    decapsulation through pqfed's combiner."""
    expanded = hashlib.shake_256(bytes.fromhex(v["seed"])).digest(96)
    kem = mlkem.MLKEM768PrivateKey.from_seed_bytes(expanded[:64])
    sk_x = x25519.X25519PrivateKey.from_private_bytes(expanded[64:])
    pk_x = sk_x.public_key().public_bytes_raw()
    pk = kem.public_key().public_bytes_raw() + pk_x
    ct = bytes.fromhex(v["ciphertext"])
    ct_m, ct_x = ct[:-32], ct[-32:]
    ss = xwing_combine(kem.decapsulate(ct_m),
                       sk_x.exchange(x25519.X25519PublicKey.from_public_bytes(ct_x)), ct_x, pk_x)
    return [_check("X-Wing keygen from seed", hashlib.sha256(pk).hexdigest(),
                   v["public_key_sha256"]),
            _check("X-Wing decapsulate (combiner)", ss, v["shared_secret"])]


def _key_schedule(v: dict[str, str]) -> list[KatResult]:
    hs = handshake_secrets(bytes.fromhex(v["shared_secret"]), bytes.fromhex(v["hello_hash"]))
    app = application_secrets(hs.master, bytes.fromhex(v["server_finished_hash"]))
    got = {"client_handshake_traffic": hs.client_handshake,
           "server_handshake_traffic": hs.server_handshake, "master_secret": hs.master,
           "client_app_traffic": app.client, "server_app_traffic": app.server,
           "exporter_master": app.exporter}
    return [_check(f"pqfed1 key schedule {name}", value, v[name]) for name, value in got.items()]


def _record(name: str, v: dict[str, str]) -> list[KatResult]:
    aead = name.removeprefix("pqfed1 record ")
    secret, content = bytes.fromhex(v["traffic_secret"]), bytes.fromhex(v["content"])
    inner = InnerType(int(v["inner_type"], 16))
    sender, receiver = RecordProtection(aead, secret), RecordProtection(aead, secret)
    sender.seq = receiver.seq = int(v["seq"])
    out = [_check(f"{name} seal", sender.seal(inner, content), v["record"])]
    (frame,) = list(FrameDecoder().feed(bytes.fromhex(v["record"])))
    try:
        opened = receiver.open(frame)
        out.append(KatResult(f"{name} open", opened == (inner, content),
                             "" if opened == (inner, content) else "opened to other content"))
    except RecordError as exc:
        out.append(KatResult(f"{name} open", False, str(exc)))
    return out


def run_known_answer_tests() -> list[KatResult]:
    """Every check in ``kat.json``; never raises for a wrong answer, returns it."""
    results: list[KatResult] = []
    for alg, v in _vectors().items():
        if alg in _KEM_FROM_SEED:
            results += _kem(alg, v)
        elif alg in _SIG_FROM_SEED:
            results += _sig(alg, v)
        elif alg == "X-Wing":
            results += _xwing(v)
        elif alg == "pqfed1 key schedule":
            results += _key_schedule(v)
        elif alg.startswith("pqfed1 record "):
            results += _record(alg, v)
        else:
            results.append(KatResult(alg, False, "no check for this algorithm in pqc/kat.py"))
    return results
