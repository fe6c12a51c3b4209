from __future__ import annotations

import pytest

from pqfed.pqc.algorithms import KEM_SIZES, SIG_SIZES
from pqfed.pqc.backends import available_backends, get_backend
from pqfed.pqc.errors import BackendUnavailable, InvalidSignature, UnsupportedAlgorithm

LIBOQS_REASON = available_backends()["liboqs"]
needs_liboqs = pytest.mark.skipif(LIBOQS_REASON != "ok", reason=f"liboqs: {LIBOQS_REASON}")


@pytest.mark.parametrize("alg", list(KEM_SIZES))
def test_kem_round_trip_and_sizes(alg: str) -> None:
    b = get_backend("pyca")
    key = b.kem_generate(alg)
    ct, ss = b.kem_encapsulate(alg, key.public_bytes())
    assert len(key.public_bytes()) == KEM_SIZES[alg].public_key
    assert len(ct) == KEM_SIZES[alg].ciphertext
    assert key.decapsulate(ct) == ss


def test_kem_implicit_rejection_gives_a_different_secret() -> None:
    # FIPS 203 decapsulation never fails: a modified ciphertext yields an unrelated secret,
    # which then breaks the Finished MAC. The channel relies on that.
    b = get_backend("pyca")
    key = b.kem_generate("ML-KEM-768")
    ct, ss = b.kem_encapsulate("ML-KEM-768", key.public_bytes())
    bad = bytes([ct[0] ^ 1]) + ct[1:]
    assert key.decapsulate(bad) != ss


@pytest.mark.parametrize("alg", list(SIG_SIZES))
def test_signature_round_trip_and_rejection(alg: str) -> None:
    b = get_backend("pyca")
    key = b.sig_generate(alg)
    sig = key.sign(b"update", b"ctx")
    assert len(sig) == SIG_SIZES[alg].signature
    b.sig_verify(alg, key.public_bytes(), b"update", sig, b"ctx")
    with pytest.raises(InvalidSignature):
        b.sig_verify(alg, key.public_bytes(), b"updatE", sig, b"ctx")
    with pytest.raises(InvalidSignature):
        b.sig_verify(alg, key.public_bytes(), b"update", sig, b"other context")
    with pytest.raises(InvalidSignature):
        b.sig_verify(alg, key.public_bytes(), b"update", bytes(len(sig)), b"ctx")


def test_private_key_export_reload_signs_verifiably() -> None:
    b = get_backend("pyca")
    key = b.sig_generate("ML-DSA-65")
    again = b.sig_load_private("ML-DSA-65", key.private_bytes())
    assert again.public_bytes() == key.public_bytes()
    b.sig_verify("ML-DSA-65", key.public_bytes(), b"m", again.sign(b"m"))


def test_unknown_algorithm_and_backend_are_named() -> None:
    with pytest.raises(UnsupportedAlgorithm, match="ML-KEM-512"):
        get_backend("pyca").kem_generate("ML-KEM-512")
    with pytest.raises(BackendUnavailable, match="choose one of"):
        get_backend("openssl-3")


def test_liboqs_missing_is_reported_not_faked() -> None:
    status = available_backends()
    assert status["pyca"] == "ok"
    if status["liboqs"] != "ok":
        with pytest.raises(BackendUnavailable, match="liboqs"):
            get_backend("liboqs")


@needs_liboqs
@pytest.mark.parametrize(("producer", "consumer"), [("pyca", "liboqs"), ("liboqs", "pyca")])
def test_cross_backend_interop(producer: str, consumer: str) -> None:
    p, c = get_backend(producer), get_backend(consumer)
    kem = c.kem_generate("ML-KEM-768")
    ct, ss = p.kem_encapsulate("ML-KEM-768", kem.public_bytes())
    assert kem.decapsulate(ct) == ss
    sig_key = p.sig_generate("ML-DSA-65")
    c.sig_verify("ML-DSA-65", sig_key.public_bytes(), b"m", sig_key.sign(b"m", b"ctx"), b"ctx")
