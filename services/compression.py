"""Update compression: top-k sparsification and 8-bit quantization of model deltas.

A client sends `delta = local - global` encoded as one byte blob; the aggregator decodes it
back to full weights before the (unchanged) Flower strategy aggregates. Top-k keeps the k
largest-magnitude entries per tensor (Aji & Heafield 2017) with error feedback: what a round
drops is added to the next round's delta (Stich et al., 2018), which recovers most of the
accuracy lost to sparsification. int8 is per-tensor symmetric linear quantization.

Blob layout (little-endian): magic "PQU1" | u8 method | u32 tensor count | per tensor:
u8 ndim, u32 dims..., u8 kind (bit 0 int8, bit 1 sparse, bit 2 bitmap positions),
[f32 scale], positions ([u32 nnz, u32 indices...] or a ceil(size/8)-byte bitmap, whichever is
smaller: at 10% density a bitmap costs 1 bit per weight instead of 3.2), values.
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

Arrays = list[npt.NDArray[np.float32]]
MAGIC = b"PQU1"
# Without a model to match (`like=None`), a blob's shapes are all there is: a sparse tensor
# of any declared size costs a few bytes, so the dense size it decodes to is bounded here
# (2^28 float32 = 1 GiB over all tensors), and so is the rank.
MAX_ELEMENTS = 1 << 28
MAX_NDIM = 32
_MAX_SCALE = float(np.finfo(np.float32).max) / 127  # 127 * scale must stay a finite float32


class CompressionError(ValueError):
    """A compressed update is malformed or does not match the global model."""


class Method(enum.IntEnum):
    NONE = 0
    TOPK = 1
    INT8 = 2
    TOPK_INT8 = 3

    @classmethod
    def parse(cls, name: str) -> Method:
        return {"none": cls.NONE, "topk": cls.TOPK, "int8": cls.INT8,
                "topk+int8": cls.TOPK_INT8}[name]


def _quantize(values: npt.NDArray[np.float32]) -> tuple[float, npt.NDArray[np.int8]]:
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    scale = peak / 127.0 if peak > 0 else 1.0
    return scale, np.clip(np.rint(values / scale), -127, 127).astype(np.int8)


def encode(delta: Sequence[npt.NDArray[np.float32]], method: Method,
           topk_fraction: float = 0.1) -> tuple[bytes, Arrays]:
    """Encodes `delta`; returns (blob, residual). The residual (what was not sent, including
    quantization error) is for error feedback and is all zeros for Method.NONE."""
    parts = [MAGIC, struct.pack("<BI", method, len(delta))]
    residual: Arrays = []
    sparse = method in (Method.TOPK, Method.TOPK_INT8)
    quant = method in (Method.INT8, Method.TOPK_INT8)
    for tensor in delta:
        t = np.ascontiguousarray(tensor, dtype=np.float32)
        flat = t.reshape(-1)
        parts.append(struct.pack("<B", t.ndim) + struct.pack(f"<{t.ndim}I", *t.shape))
        sent = np.zeros_like(flat)
        if sparse:
            k = max(1, int(np.ceil(flat.size * topk_fraction)))
            idx = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:].astype(np.uint32)
            idx.sort()
            vals = flat[idx]
        else:
            idx = np.empty(0, dtype=np.uint32)
            vals = flat
        bitmap = sparse and (flat.size + 7) // 8 < 4 * idx.size
        kind = (2 if sparse else 0) + (1 if quant else 0) + (4 if bitmap else 0)
        parts.append(struct.pack("<B", kind))
        if quant:
            scale, q = _quantize(vals)
            parts.append(struct.pack("<f", scale))
            decoded = q.astype(np.float32) * np.float32(scale)
            payload = q.tobytes()
        else:
            decoded = vals.astype(np.float32)
            payload = decoded.tobytes()
        if bitmap:
            mask = np.zeros(flat.size, dtype=bool)
            mask[idx] = True
            parts.append(np.packbits(mask).tobytes())
            sent[idx] = decoded
        elif sparse:
            parts.append(struct.pack("<I", idx.size) + idx.tobytes())
            sent[idx] = decoded
        else:
            sent = decoded
        parts.append(payload)
        residual.append((flat - sent).reshape(t.shape))
    return b"".join(parts), residual


def decode(blob: bytes, like: Sequence[npt.NDArray[np.float32]] | None) -> Arrays:
    """Decodes a blob into dense deltas shaped like the global model. Strict: every length
    and shape is checked against `like` (None: shapes as the blob says, for a node that has
    no model yet and does not train one), and trailing bytes are refused."""
    view = memoryview(blob)
    pos = 0

    def take(n: int, what: str) -> memoryview:
        nonlocal pos
        if n < 0 or pos + n > len(view):
            raise CompressionError(f"truncated update blob while reading {what}")
        out = view[pos:pos + n]
        pos += n
        return out

    if bytes(take(4, "magic")) != MAGIC:
        raise CompressionError("not a pqfed update blob (bad magic)")
    _method, count = struct.unpack("<BI", take(5, "header"))
    if like is not None and count != len(like):
        raise CompressionError(f"{count} tensors, the model has {len(like)}")
    out: Arrays = []
    elements = 0
    for i in range(count):
        (ndim,) = struct.unpack("<B", take(1, "ndim"))
        if ndim > MAX_NDIM:
            raise CompressionError(f"tensor {i}: {ndim} dimensions (at most {MAX_NDIM})")
        shape = struct.unpack(f"<{ndim}I", take(4 * ndim, "shape"))
        if like is not None and tuple(shape) != tuple(like[i].shape):
            raise CompressionError(f"tensor {i} has shape {shape}, expected {like[i].shape}")
        size = math.prod(shape)  # Python ints: no overflow
        elements += size
        # numpy refuses a shape whose non-zero dimensions overflow, even when one is 0.
        if like is None and (elements > MAX_ELEMENTS
                             or math.prod(d or 1 for d in shape) > MAX_ELEMENTS):
            raise CompressionError(f"tensor {i}: over {MAX_ELEMENTS} elements in the update")
        (kind,) = struct.unpack("<B", take(1, "kind"))
        if kind > 7 or kind in {4, 5}:
            raise CompressionError(f"tensor {i}: unknown encoding {kind}")
        quant, sparse, bitmap = bool(kind & 1), bool(kind & 2), bool(kind & 4)
        scale = struct.unpack("<f", take(4, "scale"))[0] if quant else 1.0
        if not math.isfinite(scale) or abs(scale) > _MAX_SCALE:
            raise CompressionError(f"tensor {i}: scale {scale} is not a finite int8 step")
        if bitmap:
            packed = np.frombuffer(take((size + 7) // 8, "bitmap"), dtype=np.uint8)
            bits = np.unpackbits(packed)
            if bits[size:].any():
                raise CompressionError(f"tensor {i}: bitmap has bits past the tensor")
            idx = np.flatnonzero(bits[:size]).astype(np.uint32)
            nnz = idx.size
        elif sparse:
            (nnz,) = struct.unpack("<I", take(4, "nnz"))
            if nnz > size:
                raise CompressionError(f"tensor {i}: {nnz} entries for size {size}")
            idx = np.frombuffer(take(4 * nnz, "indices"), dtype=np.uint32)
            if nnz and int(idx.max()) >= size:
                raise CompressionError(f"tensor {i}: index out of range")
        else:
            nnz = size
        width = 1 if quant else 4
        raw = take(nnz * width, "values")
        vals = (np.frombuffer(raw, dtype=np.int8).astype(np.float32) * np.float32(scale)
                if quant else np.frombuffer(raw, dtype=np.float32).copy())
        if sparse:
            dense = np.zeros(size, dtype=np.float32)
            dense[idx] = vals
        else:
            dense = vals
        out.append(dense.reshape(shape))
    if pos != len(view):
        raise CompressionError(f"{len(view) - pos} trailing bytes after the last tensor")
    return out
