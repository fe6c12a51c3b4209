"""Known-answer checks for ML-KEM (FIPS 203) and ML-DSA (FIPS 204), run by `pqfed selftest`.

The vectors in ``kat.json`` fix, for a seed, what FIPS 203/204 make deterministic: the public
key derived from the seed, the shared secret a fixed ciphertext decapsulates to, the implicit
rejection secret of a tampered ciphertext, and that a fixed signature verifies (and a flipped
one does not). A build whose PQC code or OpenSSL is wrong for its architecture (e.g. an arm64
image run on a Raspberry Pi or under qemu) fails here before it carries any traffic.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import mldsa, mlkem

from pqfed.pqc.backends import get_backend
from pqfed.pqc.errors import InvalidSignature

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


def run_known_answer_tests() -> list[KatResult]:
    """Every check in ``kat.json``; never raises for a wrong answer, returns it."""
    results: list[KatResult] = []
    for alg, v in _vectors().items():
        if alg in _KEM_FROM_SEED:
            results += _kem(alg, v)
        elif alg in _SIG_FROM_SEED:
            results += _sig(alg, v)
        else:
            results.append(KatResult(alg, False, "no check for this algorithm in pqc/kat.py"))
    return results
