from __future__ import annotations

import struct

import numpy as np
import pytest

from pqfed.services.compression import CompressionError, Method, decode, encode

RNG = np.random.default_rng(0)
DELTA = [RNG.normal(size=(64, 32)).astype(np.float32), RNG.normal(size=(32,)).astype(np.float32)]
DENSE = sum(t.nbytes for t in DELTA)


@pytest.mark.parametrize("method", list(Method))
def test_decoded_plus_residual_is_the_delta(method: Method) -> None:
    blob, residual = encode(DELTA, method, 0.1)
    out = decode(blob, DELTA)
    for d, o, r in zip(DELTA, out, residual, strict=True):
        np.testing.assert_allclose(o + r, d, atol=1e-6)
        assert o.shape == d.shape and o.dtype == np.float32


def test_sizes_shrink_as_expected() -> None:
    sizes = {m: len(encode(DELTA, m, 0.1)[0]) for m in Method}
    assert sizes[Method.NONE] >= DENSE
    assert sizes[Method.INT8] < DENSE * 0.3
    assert sizes[Method.TOPK_INT8] < DENSE * 0.07  # bitmap positions + 1-byte values


def test_sparse_positions_use_indices_when_very_sparse() -> None:
    sparse_blob = encode(DELTA, Method.TOPK, 0.01)[0]
    out = decode(sparse_blob, DELTA)
    assert sum(int(np.count_nonzero(o)) for o in out) <= 0.02 * sum(t.size for t in DELTA)


def test_quantization_error_is_bounded() -> None:
    blob, _ = encode(DELTA, Method.INT8)
    for d, o in zip(DELTA, decode(blob, DELTA), strict=True):
        assert np.abs(d - o).max() <= np.abs(d).max() / 127 + 1e-6


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda b: b"XXXX" + b[4:], "magic"),
        (lambda b: b[:-1], "truncated"),
        (lambda b: b + b"\0", "trailing"),
        (lambda b: b[:5] + struct.pack("<I", 3) + b[9:], "tensors"),
    ],
)
def test_malformed_blobs_are_refused(mutate, match: str) -> None:  # type: ignore[no-untyped-def]
    blob, _ = encode(DELTA, Method.TOPK_INT8, 0.1)
    with pytest.raises(CompressionError, match=match):
        decode(mutate(blob), DELTA)


def test_shape_mismatch_and_bad_index() -> None:
    blob, _ = encode(DELTA, Method.TOPK, 0.01)
    with pytest.raises(CompressionError, match="shape"):
        decode(blob, [np.zeros((32, 64), np.float32), DELTA[1]])
    one = [np.arange(100, dtype=np.float32)]
    blob, _ = encode(one, Method.TOPK, 0.01)  # one index: indices encoding
    bad = blob[:-8] + struct.pack("<I", 1000) + blob[-4:]
    with pytest.raises(CompressionError, match="out of range"):
        decode(bad, one)
