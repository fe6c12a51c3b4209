"""The liboqs backend: Open Quantum Safe's C library for ML-KEM (FIPS 203) and ML-DSA (FIPS 204).

Two bindings reach the same C library; `select_binding` picks one from the library's version:

* **ctypes** (ours, this module): a thin binding over liboqs' stable public C API
  (`OQS_KEM_*`, `OQS_SIG_*`, `OQS_randombytes_*`, `OQS_version`), present and unchanged from
  liboqs 0.12 to 0.14+. It is what runs with the liboqs 0.13.0 that `make liboqs` builds from
  the crates.io package `oqs-sys` (pqc/native/build-liboqs.sh).
* **liboqs-python** (the `oqs` package, `pip install 'pqfed[oqs]'`): used when it is installed
  AND the library found is >= 0.14. Its 0.16 releases bind `OQS_SIG_supports_ctx_str`, which
  liboqs 0.13 lacks, so importing it against our build would fail; a shim re-exporting a
  missing symbol would have to be a second C library, which is more than the ctypes binding.

Why not only liboqs-python: besides the version gap, liboqs-python *downloads and builds*
liboqs on import when it cannot find the library. That must never happen on a hospital node
(no outbound traffic, no surprise compilers), so this module locates the library itself and
imports `oqs` only after a matching library was found.

Private keys: ML-DSA keys are exported as the 32-byte FIPS 204 seed xi, like pyca, so identity
files move between backends. liboqs 0.13 has no "keypair from seed" for ML-DSA; its key
generation draws xi with exactly one `OQS_randombytes(32)` call, so seeded key generation swaps
in a randomness source that returns xi to the calling thread only (`fixed_randomness`). Tests
check the result against pyca's `from_seed_bytes` on every key size.

Ed25519 (the classical baseline of the benchmarks only) is not in liboqs; it is served by pyca.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import platform
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from pqfed.cache import cache_dir
from pqfed.pqc.errors import BackendUnavailable, InvalidSignature, UnsupportedAlgorithm

KEM_ALGORITHMS: Final = ("ML-KEM-768", "ML-KEM-1024")
SIG_ALGORITHMS: Final = ("ML-DSA-44", "ML-DSA-65", "ML-DSA-87")
# The liboqs release `make liboqs` builds (pqc/native/build-liboqs.sh pins oqs-sys).
BUILT_VERSION: Final = "0.13.0"
# liboqs-python 0.16 binds symbols that appeared in liboqs 0.14.
LIBOQS_PYTHON_MIN: Final = (0, 14)

# FIPS 203/204 sizes (fixed by the standards, so no need to read liboqs' struct layout, which
# changes between releases): secret key, and for ML-DSA the maximum signature length.
_KEM_SECRET: Final = {"ML-KEM-768": 2400, "ML-KEM-1024": 3168}
_KEM_SIZES: Final = {"ML-KEM-768": (1184, 1088), "ML-KEM-1024": (1568, 1568)}  # pk, ct
_SIG_SIZES: Final = {"ML-DSA-44": (1312, 2560, 2420), "ML-DSA-65": (1952, 4032, 3309),
                     "ML-DSA-87": (2592, 4896, 4627)}  # pk, sk, signature
_SHARED = 32
_SEED_KEM = 64  # FIPS 203 keygen seed d || z
_SEED_SIG = 32  # FIPS 204 keygen seed xi
_OQS_SUCCESS = 0

Binding = Literal["ctypes", "liboqs-python"]


def _arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        machine, machine)


def cache_library(version: str = BUILT_VERSION, arch: str | None = None) -> Path:
    """Where `make liboqs` puts the shared library (outside the repository)."""
    return cache_dir() / "liboqs" / version / (arch or _arch()) / "liboqs.so"


def find_liboqs() -> Path | None:
    """The liboqs shared library to load, without network access and without importing `oqs`.

    Order: $PQFED_LIBOQS (an explicit .so path); $OQS_INSTALL_PATH/lib and ~/_oqs/lib (where
    liboqs-python looks); the `make liboqs` cache; the system linker path.
    """
    explicit = os.environ.get("PQFED_LIBOQS")
    if explicit:
        return Path(explicit)
    root = Path(os.environ.get("OQS_INSTALL_PATH", Path.home() / "_oqs"))
    candidates = [root / "lib" / "liboqs.so", root / "lib64" / "liboqs.so", cache_library()]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    found = ctypes.util.find_library("oqs")
    return Path(found) if found else None


def parse_version(text: str) -> tuple[int, ...]:
    """'0.13.0' -> (0, 13, 0); '0.14.1-rc1' -> (0, 14, 1)."""
    parts: list[int] = []
    for piece in text.split("-", maxsplit=1)[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def select_binding(library_version: str, liboqs_python_installed: bool) -> Binding:
    """liboqs-python when it is installed and the library is new enough for it; else ctypes."""
    if liboqs_python_installed and parse_version(library_version)[:2] >= LIBOQS_PYTHON_MIN:
        return "liboqs-python"
    return "ctypes"


# --- the C API --------------------------------------------------------------------------------

_u8p = ctypes.c_char_p  # bytes in; outputs use create_string_buffer (also char*)
_RandomCallback = ctypes.CFUNCTYPE(None, ctypes.POINTER(ctypes.c_uint8), ctypes.c_size_t)


class _CApi:
    """Function prototypes of the liboqs calls we use. ctypes.CDLL releases the GIL for the
    duration of each call, so liboqs runs in parallel on threads (unlike pyca's ML-KEM)."""

    # Foreign functions, set from the table in __init__.
    OQS_version: Any
    OQS_init: Any
    OQS_KEM_new: Any
    OQS_KEM_keypair: Any
    OQS_KEM_keypair_derand: Any
    OQS_KEM_encaps: Any
    OQS_KEM_decaps: Any
    OQS_SIG_new: Any
    OQS_SIG_keypair: Any
    OQS_SIG_sign_with_ctx_str: Any
    OQS_SIG_verify_with_ctx_str: Any
    OQS_randombytes_custom_algorithm: Any
    OQS_randombytes_switch_algorithm: Any

    def __init__(self, path: Path) -> None:
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise BackendUnavailable("liboqs", f"cannot load {path}: {exc}") from exc
        self.path = path
        sz, vp, st = ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int
        protos: dict[str, tuple[Any, list[Any]]] = {
            "OQS_version": (ctypes.c_char_p, []),
            "OQS_init": (None, []),
            "OQS_KEM_new": (vp, [ctypes.c_char_p]),
            "OQS_KEM_keypair": (st, [vp, _u8p, _u8p]),
            "OQS_KEM_keypair_derand": (st, [vp, _u8p, _u8p, _u8p]),
            "OQS_KEM_encaps": (st, [vp, _u8p, _u8p, _u8p]),
            "OQS_KEM_decaps": (st, [vp, _u8p, _u8p, _u8p]),
            "OQS_SIG_new": (vp, [ctypes.c_char_p]),
            "OQS_SIG_keypair": (st, [vp, _u8p, _u8p]),
            "OQS_SIG_sign_with_ctx_str": (st, [vp, _u8p, ctypes.POINTER(sz), _u8p, sz, _u8p, sz,
                                               _u8p]),
            "OQS_SIG_verify_with_ctx_str": (st, [vp, _u8p, sz, _u8p, sz, _u8p, sz, _u8p]),
            "OQS_randombytes_custom_algorithm": (None, [_RandomCallback]),
            "OQS_randombytes_switch_algorithm": (st, [ctypes.c_char_p]),
        }
        for name, (restype, argtypes) in protos.items():
            try:
                fn = getattr(lib, name)
            except AttributeError:
                raise BackendUnavailable(
                    "liboqs", f"{path} lacks {name}; rebuild it with `make liboqs`") from None
            fn.restype, fn.argtypes = restype, argtypes
            setattr(self, name, fn)
        self.lib = lib
        self.OQS_init()
        self.version = str(self.OQS_version().decode())
        self.kem: dict[str, int] = {}
        self.sig: dict[str, int] = {}
        # liboqs' method names for ML-KEM/ML-DSA are the FIPS names ("ML-KEM-768").
        # The descriptors are immutable tables: one per algorithm for the process, shared by
        # all threads, never freed.
        for table, new, names in ((self.kem, self.OQS_KEM_new, KEM_ALGORITHMS),
                                  (self.sig, self.OQS_SIG_new, SIG_ALGORITHMS)):
            for alg in names:
                handle = new(alg.encode())
                if not handle:
                    raise BackendUnavailable(
                        "liboqs", f"{path} (liboqs {self.version}) was built without {alg}; "
                        "rebuild it with `make liboqs`")
                table[alg] = handle
        self._callback = _RandomCallback(self._random)
        self._fixed_lock = threading.Lock()
        self._fixed_owner: int | None = None
        self._fixed_data = b""

    # Seeded randomness ---------------------------------------------------------------------

    def _random(self, out: Any, n: int) -> None:
        # Runs inside liboqs while a seeded call is in flight. Other threads calling liboqs in
        # that window get real randomness; only the owner consumes the fixed bytes, in order.
        if threading.get_ident() == self._fixed_owner:
            data, self._fixed_data = self._fixed_data[:n], self._fixed_data[n:]
            if len(data) != n:
                self._fixed_owner = None  # the caller sees the exhaustion and raises
                data = data + os.urandom(n - len(data))
        else:
            data = os.urandom(n)
        ctypes.memmove(out, data, n)

    @contextlib.contextmanager
    def fixed_randomness(self, data: bytes) -> Iterator[None]:
        """liboqs' randomness comes from `data` for liboqs calls made by this thread inside the
        block; every byte must be consumed exactly, else `RuntimeError` (the key or signature
        would not be the one the seed defines)."""
        with self._fixed_lock:
            self._fixed_owner, self._fixed_data = threading.get_ident(), data
            self.OQS_randombytes_custom_algorithm(self._callback)
            try:
                yield
                exhausted = self._fixed_owner is None
                left = len(self._fixed_data)
            finally:
                self.OQS_randombytes_switch_algorithm(b"system")
                self._fixed_owner, self._fixed_data = None, b""
        if exhausted or left:
            raise RuntimeError(
                f"liboqs {self.version} consumed randomness differently than FIPS 204 key "
                "generation defines; seeded keys cannot be derived with this build")

    # Operations ------------------------------------------------------------------------------

    def kem_keypair(self, algorithm: str, seed: bytes | None) -> tuple[bytes, bytes]:
        pk_len, _ = _KEM_SIZES[algorithm]
        pk = ctypes.create_string_buffer(pk_len)
        sk = ctypes.create_string_buffer(_KEM_SECRET[algorithm])
        handle = self.kem[algorithm]
        rc = (self.OQS_KEM_keypair(handle, pk, sk) if seed is None
              else self.OQS_KEM_keypair_derand(handle, pk, sk, seed))
        _ok(rc, f"{algorithm} key generation")
        return pk.raw, sk.raw

    def kem_encaps(self, algorithm: str, public_key: bytes) -> tuple[bytes, bytes]:
        pk_len, ct_len = _KEM_SIZES[algorithm]
        if len(public_key) != pk_len:
            raise ValueError(f"{algorithm} public key must be {pk_len} bytes")
        ct = ctypes.create_string_buffer(ct_len)
        ss = ctypes.create_string_buffer(_SHARED)
        # liboqs >= 0.12 runs the FIPS 203 encapsulation-key check (modulus check) and fails.
        _ok(self.OQS_KEM_encaps(self.kem[algorithm], ct, ss, public_key),
            f"{algorithm} encapsulation (public key rejected)")
        return ct.raw, ss.raw

    def kem_decaps(self, algorithm: str, secret_key: bytes, ciphertext: bytes) -> bytes:
        _, ct_len = _KEM_SIZES[algorithm]
        if len(ciphertext) != ct_len:
            raise ValueError(f"{algorithm} ciphertext must be {ct_len} bytes")
        ss = ctypes.create_string_buffer(_SHARED)
        _ok(self.OQS_KEM_decaps(self.kem[algorithm], ss, ciphertext, secret_key),
            f"{algorithm} decapsulation")
        return ss.raw

    def sig_keypair(self, algorithm: str, seed: bytes) -> tuple[bytes, bytes]:
        pk_len, sk_len, _ = _SIG_SIZES[algorithm]
        pk = ctypes.create_string_buffer(pk_len)
        sk = ctypes.create_string_buffer(sk_len)
        with self.fixed_randomness(seed):
            rc = self.OQS_SIG_keypair(self.sig[algorithm], pk, sk)
        _ok(rc, f"{algorithm} key generation")
        return pk.raw, sk.raw

    def sign(self, algorithm: str, secret_key: bytes, message: bytes, context: bytes) -> bytes:
        _, _, sig_len = _SIG_SIZES[algorithm]
        out = ctypes.create_string_buffer(sig_len)
        n = ctypes.c_size_t(sig_len)
        _ok(self.OQS_SIG_sign_with_ctx_str(self.sig[algorithm], out, ctypes.byref(n), message,
                                           len(message), context, len(context), secret_key),
            f"{algorithm} signing")
        return out.raw[: n.value]

    def verify(self, algorithm: str, public_key: bytes, message: bytes, signature: bytes,
               context: bytes) -> bool:
        return bool(self.OQS_SIG_verify_with_ctx_str(
            self.sig[algorithm], message, len(message), signature, len(signature), context,
            len(context), public_key) == _OQS_SUCCESS)


def _ok(rc: int, what: str) -> None:
    if rc != _OQS_SUCCESS:
        raise ValueError(f"liboqs: {what} failed")


@functools.cache
def load_library(path: Path | None = None) -> _CApi:
    """The process-wide binding to one liboqs shared library (loaded once)."""
    library = path or find_liboqs()
    if library is None:
        raise BackendUnavailable(
            "liboqs",
            f"the liboqs C library is not installed (looked at $PQFED_LIBOQS, "
            f"$OQS_INSTALL_PATH/lib, ~/_oqs/lib, {cache_library()} and the system linker "
            "path); run `make liboqs`, or use the backend 'pyca'")
    return _CApi(library)


# --- keys and the backend ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class LiboqsKemKey:
    algorithm: str
    _api: _CApi
    _public: bytes
    _secret: bytes

    def public_bytes(self) -> bytes:
        return self._public

    def decapsulate(self, ciphertext: bytes) -> bytes:
        return self._api.kem_decaps(self.algorithm, self._secret, bytes(ciphertext))


@dataclass(frozen=True, slots=True)
class LiboqsSigKey:
    algorithm: str
    _api: _CApi
    _public: bytes
    _secret: bytes
    _seed: bytes

    def public_bytes(self) -> bytes:
        return self._public

    def private_bytes(self) -> bytes:
        return self._seed

    def sign(self, message: bytes, context: bytes = b"") -> bytes:
        return self._api.sign(self.algorithm, self._secret, bytes(message), bytes(context))


@dataclass(slots=True)
class OqsKemKey:
    """A KEM key held by liboqs-python (liboqs >= 0.14)."""

    algorithm: str
    _kem: Any
    _public: bytes

    def public_bytes(self) -> bytes:
        return self._public

    def decapsulate(self, ciphertext: bytes) -> bytes:
        return bytes(self._kem.decap_secret(ciphertext))


@dataclass(slots=True)
class OqsSigKey:
    """A signing key held by liboqs-python (liboqs >= 0.14); exports liboqs' expanded key."""

    algorithm: str
    _sig: Any
    _public: bytes

    def public_bytes(self) -> bytes:
        return self._public

    def private_bytes(self) -> bytes:
        return bytes(self._sig.export_secret_key())

    def sign(self, message: bytes, context: bytes = b"") -> bytes:
        if context:
            return bytes(self._sig.sign_with_ctx_str(message, context))
        return bytes(self._sig.sign(message))


def _liboqs_python_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("oqs") is not None


class LiboqsBackend:
    """liboqs (Open Quantum Safe). Interoperates with pyca on public keys, ciphertexts,
    signatures and (ctypes binding) ML-DSA private-key seeds: both implement FIPS 203/204."""

    name = "liboqs"
    kem_algorithms = KEM_ALGORITHMS
    sig_algorithms: tuple[str, ...] = (*SIG_ALGORITHMS, "Ed25519")

    def __init__(self, library: Path | None = None, binding: Binding | None = None) -> None:
        self._api = load_library(library)
        self.version = self._api.version
        self.library = self._api.path
        self.binding: Binding = binding or select_binding(self.version,
                                                          _liboqs_python_installed())
        self._oqs: Any = None
        if self.binding == "liboqs-python":
            if parse_version(self.version)[:2] < LIBOQS_PYTHON_MIN:
                raise BackendUnavailable(
                    "liboqs", f"liboqs-python needs liboqs >= 0.14, {self.library} is "
                    f"{self.version}; use the ctypes binding")
            # liboqs-python loads the library from $OQS_INSTALL_PATH/lib first: point it at
            # the one we found, so it never reaches its download-and-build fallback.
            os.environ.setdefault("OQS_INSTALL_PATH", str(self.library.parent.parent))
            try:
                import oqs
            except (ImportError, RuntimeError, OSError) as exc:
                raise BackendUnavailable("liboqs", f"liboqs-python failed to load: {exc}"
                                         ) from exc
            self._oqs = oqs

    @property
    def description(self) -> str:
        return f"liboqs {self.version} via {self.binding} ({self.library})"

    def _check(self, algorithm: str, supported: tuple[str, ...]) -> None:
        if algorithm not in supported:
            raise UnsupportedAlgorithm(algorithm, supported)

    def _pyca(self) -> Any:
        from pqfed.pqc.backends.pyca import PycaBackend

        return PycaBackend()

    def kem_generate(self, algorithm: str) -> LiboqsKemKey | OqsKemKey:
        self._check(algorithm, KEM_ALGORITHMS)
        if self._oqs is not None:
            kem = self._oqs.KeyEncapsulation(algorithm)
            return OqsKemKey(algorithm, kem, bytes(kem.generate_keypair()))
        return LiboqsKemKey(algorithm, self._api, *self._api.kem_keypair(algorithm, None))

    def kem_from_seed(self, algorithm: str, seed: bytes) -> LiboqsKemKey:
        """FIPS 203 ML-KEM.KeyGen_internal(d, z) from the 64-byte seed d || z (as pyca's
        `from_seed_bytes`). Used for known-answer tests."""
        self._check(algorithm, KEM_ALGORITHMS)
        if len(seed) != _SEED_KEM:
            raise ValueError(f"{algorithm} seed must be {_SEED_KEM} bytes (d || z)")
        return LiboqsKemKey(algorithm, self._api, *self._api.kem_keypair(algorithm, seed))

    def kem_encapsulate(self, algorithm: str, public_key: bytes) -> tuple[bytes, bytes]:
        self._check(algorithm, KEM_ALGORITHMS)
        if self._oqs is not None:
            with self._oqs.KeyEncapsulation(algorithm) as kem:
                ciphertext, shared = kem.encap_secret(public_key)
            return bytes(ciphertext), bytes(shared)
        return self._api.kem_encaps(algorithm, bytes(public_key))

    def sig_generate(self, algorithm: str) -> Any:
        if algorithm == "Ed25519":
            return self._pyca().sig_generate(algorithm)
        self._check(algorithm, SIG_ALGORITHMS)
        if self._oqs is not None:
            sig = self._oqs.Signature(algorithm)
            return OqsSigKey(algorithm, sig, bytes(sig.generate_keypair()))
        return self.sig_load_private(algorithm, os.urandom(_SEED_SIG))

    def sig_load_private(self, algorithm: str, data: bytes) -> Any:
        """Loads a 32-byte FIPS 204 seed (the format pyca and this backend export)."""
        if algorithm == "Ed25519":
            return self._pyca().sig_load_private(algorithm, data)
        self._check(algorithm, SIG_ALGORITHMS)
        if self._oqs is not None:
            raise UnsupportedAlgorithm(
                f"{algorithm} private-key import with liboqs-python", ("the ctypes binding",))
        if len(data) != _SEED_SIG:
            raise ValueError(f"{algorithm} private key must be the {_SEED_SIG}-byte seed")
        seed = bytes(data)
        return LiboqsSigKey(algorithm, self._api, *self._api.sig_keypair(algorithm, seed), seed)

    def sig_verify(
        self, algorithm: str, public_key: bytes, message: bytes, signature: bytes,
        context: bytes = b"",
    ) -> None:
        if algorithm == "Ed25519":
            self._pyca().sig_verify(algorithm, public_key, message, signature, context)
            return
        self._check(algorithm, SIG_ALGORITHMS)
        if self._oqs is not None:
            with self._oqs.Signature(algorithm) as sig:
                ok = (sig.verify_with_ctx_str(message, signature, context, public_key)
                      if context else sig.verify(message, signature, public_key))
        else:
            if len(public_key) != _SIG_SIZES[algorithm][0]:
                raise InvalidSignature(f"{algorithm} public key has the wrong length")
            ok = self._api.verify(algorithm, bytes(public_key), bytes(message), bytes(signature),
                                  bytes(context))
        if not ok:
            raise InvalidSignature(f"{algorithm} signature does not verify (liboqs)")
