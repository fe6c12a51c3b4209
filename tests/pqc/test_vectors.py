"""Known-answer tests from tests/pqc/vectors/ (FIPS 203 seeded key generation, decapsulation
and implicit rejection; FIPS 204 seeded key generation and deterministic signatures), run
against both backends. How the files were made and why they are trusted: vectors/generate.py.
"""

from __future__ import annotations

import pytest

from pqfed.pqc.backends import BACKENDS, get_backend
from pqfed.pqc.backends.liboqs import LiboqsBackend, load_library

from .vector_files import load_vectors

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
