"""Both backends, the same contract: round trips, sizes, rejection, and interoperability
(each implements FIPS 203/204, so keys, ciphertexts and signatures cross between them)."""

from __future__ import annotations

import os

import pytest

from pqfed.pqc.algorithms import KEM_SIZES, SIG_SIZES
from pqfed.pqc.backends import BACKENDS, available_backends, backend_report, get_backend
from pqfed.pqc.errors import BackendUnavailable, InvalidSignature, UnsupportedAlgorithm


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    status = available_backends()[name]
    # Never a skip: `make test` builds liboqs first (make liboqs), so absence is a broken setup.
    assert status == "ok", f"backend {name} unavailable ({status}); run `make liboqs`"
    return name


@pytest.mark.parametrize("alg", list(KEM_SIZES))
def test_kem_round_trip_and_sizes(backend_name: str, alg: str) -> None:
    b = get_backend(backend_name)
    key = b.kem_generate(alg)
    ct, ss = b.kem_encapsulate(alg, key.public_bytes())
    assert len(key.public_bytes()) == KEM_SIZES[alg].public_key
    assert len(ct) == KEM_SIZES[alg].ciphertext
    assert len(ss) == KEM_SIZES[alg].shared_secret
    assert key.decapsulate(ct) == ss
    assert b.kem_generate(alg).public_bytes() != key.public_bytes()


@pytest.mark.parametrize("alg", list(KEM_SIZES))
def test_kem_implicit_rejection_gives_a_different_secret(backend_name: str, alg: str) -> None:
    # FIPS 203 decapsulation never fails: a modified ciphertext yields an unrelated secret,
    # which then breaks the Finished MAC. The channel relies on that.
    b = get_backend(backend_name)
    key = b.kem_generate(alg)
    ct, ss = b.kem_encapsulate(alg, key.public_bytes())
    bad = bytes([ct[0] ^ 1]) + ct[1:]
    rejected = key.decapsulate(bad)
    assert rejected != ss and len(rejected) == len(ss)
    assert key.decapsulate(bad) == rejected  # deterministic: J(z || c)


def test_kem_malformed_input_is_refused(backend_name: str) -> None:
    b = get_backend(backend_name)
    key = b.kem_generate("ML-KEM-768")
    with pytest.raises(ValueError):
        key.decapsulate(b"\0" * 100)
    with pytest.raises(ValueError):
        b.kem_encapsulate("ML-KEM-768", b"\0" * 100)
    # FIPS 203 7.2 modulus check: coefficients >= q in the encapsulation key are refused.
    with pytest.raises(ValueError):
        b.kem_encapsulate("ML-KEM-768", b"\xff" * KEM_SIZES["ML-KEM-768"].public_key)


@pytest.mark.parametrize("alg", list(SIG_SIZES))
def test_signature_round_trip_and_rejection(backend_name: str, alg: str) -> None:
    b = get_backend(backend_name)
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
    tampered = bytearray(sig)
    tampered[len(sig) // 2] ^= 0x10
    with pytest.raises(InvalidSignature):
        b.sig_verify(alg, key.public_bytes(), b"update", bytes(tampered), b"ctx")
    with pytest.raises(InvalidSignature):
        b.sig_verify(alg, key.public_bytes(), b"update", sig[:-1], b"ctx")
    with pytest.raises(InvalidSignature):
        b.sig_verify(alg, b.sig_generate(alg).public_bytes(), b"update", sig, b"ctx")


def test_private_key_export_reload_signs_verifiably(backend_name: str) -> None:
    b = get_backend(backend_name)
    key = b.sig_generate("ML-DSA-65")
    assert len(key.private_bytes()) == 32  # the FIPS 204 seed, in both backends
    again = b.sig_load_private("ML-DSA-65", key.private_bytes())
    assert again.public_bytes() == key.public_bytes()
    b.sig_verify("ML-DSA-65", key.public_bytes(), b"m", again.sign(b"m"))


def test_unknown_algorithm_is_named(backend_name: str) -> None:
    b = get_backend(backend_name)
    with pytest.raises(UnsupportedAlgorithm, match="ML-KEM-512"):
        b.kem_generate("ML-KEM-512")
    with pytest.raises(UnsupportedAlgorithm, match="SLH-DSA"):
        b.sig_generate("SLH-DSA-SHA2-128s")


def test_unknown_backend_is_named() -> None:
    with pytest.raises(BackendUnavailable, match="choose one of auto, pyca, liboqs"):
        get_backend("openssl-3")


@pytest.mark.parametrize(("producer", "consumer"), [("pyca", "liboqs"), ("liboqs", "pyca")])
@pytest.mark.parametrize("kem", list(KEM_SIZES))
def test_kem_interop(producer: str, consumer: str, kem: str) -> None:
    p, c = get_backend(producer), get_backend(consumer)
    key = c.kem_generate(kem)
    ct, ss = p.kem_encapsulate(kem, key.public_bytes())
    assert key.decapsulate(ct) == ss
    # Implicit rejection agrees too: both compute J(z || c') from the consumer's key only.
    bad = ct[:-1] + bytes([ct[-1] ^ 0x80])
    assert key.decapsulate(bad) != ss


@pytest.mark.parametrize(("producer", "consumer"), [("pyca", "liboqs"), ("liboqs", "pyca")])
@pytest.mark.parametrize("alg", ["ML-DSA-44", "ML-DSA-65", "ML-DSA-87"])
def test_signature_and_private_key_interop(producer: str, consumer: str, alg: str) -> None:
    p, c = get_backend(producer), get_backend(consumer)
    key = p.sig_generate(alg)
    c.sig_verify(alg, key.public_bytes(), b"m", key.sign(b"m", b"ctx"), b"ctx")
    c.sig_verify(alg, key.public_bytes(), b"", key.sign(b""))
    with pytest.raises(InvalidSignature):
        c.sig_verify(alg, key.public_bytes(), b"m", key.sign(b"m", b"ctx"), b"ctX")
    # A private key (the 32-byte seed) exported by one loads into the other, same public key.
    moved = c.sig_load_private(alg, key.private_bytes())
    assert moved.public_bytes() == key.public_bytes()
    p.sig_verify(alg, key.public_bytes(), b"m2", moved.sign(b"m2"))


def test_auto_prefers_liboqs_and_reports_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PQFED_CRYPTO_BACKEND", "auto")  # restored afterwards
    get_backend.cache_clear()
    try:
        assert get_backend().name == "liboqs"
        assert get_backend("auto").name == "liboqs"
        report = backend_report()
        assert report["backend"] == "liboqs"
        assert "liboqs 0.13.0 via ctypes" in report["description"]
    finally:
        get_backend.cache_clear()


def test_auto_falls_back_to_pyca_without_liboqs(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: os.PathLike[str]) -> None:
    from pqfed.pqc.backends import liboqs

    monkeypatch.setenv("PQFED_CRYPTO_BACKEND", "auto")  # restored afterwards
    monkeypatch.setenv("PQFED_LIBOQS", os.fspath(tmp_path) + "/missing/liboqs.so")
    get_backend.cache_clear()
    liboqs.load_library.cache_clear()
    try:
        assert get_backend().name == "pyca"
        assert "pyca/cryptography" in backend_report()["description"]
        # Named explicitly, an unusable backend is an error, never a silent substitute.
        with pytest.raises(BackendUnavailable, match="cannot load"):
            get_backend("liboqs")
        assert available_backends()["liboqs"].startswith("cannot load")
    finally:
        get_backend.cache_clear()
        liboqs.load_library.cache_clear()


def test_environment_selects_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    get_backend.cache_clear()
    try:
        monkeypatch.setenv("PQFED_CRYPTO_BACKEND", "pyca")
        assert get_backend().name == "pyca"
    finally:
        get_backend.cache_clear()


def test_selftest_reports_the_backend_and_checks_across_backends(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from pqfed.cli import main

    monkeypatch.setenv("PQFED_CRYPTO_BACKEND", "auto")  # restored afterwards
    get_backend.cache_clear()
    try:
        assert main(["selftest", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["ok"] is True
        assert report["versions"]["pqc_backend"].startswith("liboqs (liboqs 0.13.0 via ctypes")
        pairs = {c["name"]: c["status"] for c in report["checks"]
                 if c["name"].startswith("backends: ")}
        assert pairs == {f"backends: {p}": "ok" for p in
                         ("pyca->pyca", "pyca->liboqs", "liboqs->pyca", "liboqs->liboqs")}
        assert main(["selftest", "--json", "--backend", "pyca"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["versions"]["pqc_backend"].startswith("pyca ")
    finally:
        get_backend.cache_clear()
