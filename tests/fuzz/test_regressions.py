"""Inputs the fuzz harness (tests/fuzz/harness.py) found crashing, kept as regressions: each
must now be refused with its parser's documented error. regressions/<target>-<n>.bin are the
smallest input of each distinct crash; the named cases below restate them by hand."""

from __future__ import annotations

import importlib.util
import math
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from pqfed.pqc.armor import unarmor
from pqfed.pqc.errors import DecodeError
from pqfed.services.compression import MAGIC, CompressionError, decode

HERE = Path(__file__).parent
REGRESSIONS = sorted((HERE / "regressions").glob("*.bin"))


def _harness() -> ModuleType:
    if "pqfed_fuzz_harness" not in sys.modules:
        spec = importlib.util.spec_from_file_location("pqfed_fuzz_harness", HERE / "harness.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["pqfed_fuzz_harness"]


@pytest.fixture(scope="module")
def targets() -> Iterator[dict[str, object]]:
    h = _harness()
    with h.work_dir() as work:
        yield {t.name: t for t in h.all_targets(work)}


def test_every_target_has_its_crashes_kept() -> None:
    assert {p.name.rsplit("-", 1)[0] for p in REGRESSIONS} == {"audit-log", "compression",
                                                               "pem-armor"}


@pytest.mark.parametrize("path", REGRESSIONS, ids=lambda p: p.stem)
def test_crashing_input_is_now_refused(path: Path, targets: dict[str, object]) -> None:
    target = targets[path.name.rsplit("-", 1)[0]]
    with pytest.raises(target.errors):  # type: ignore[attr-defined]
        target.run(path.read_bytes())  # type: ignore[attr-defined]


def test_pem_with_a_non_ascii_character_is_a_decode_error() -> None:
    text = "-----BEGIN PQFED CERTIFICATE-----\nAAé=\n-----END PQFED CERTIFICATE-----\n"
    with pytest.raises(DecodeError, match="outside ASCII"):
        unarmor("PQFED CERTIFICATE", text)


def _blob(shape: tuple[int, ...], kind: int = 2, tail: bytes = b"\0\0\0\0") -> bytes:
    return (MAGIC + struct.pack("<BI", 1, 1) + struct.pack("<B", len(shape))
            + struct.pack(f"<{len(shape)}I", *shape) + struct.pack("<B", kind) + tail)


@pytest.mark.parametrize(("shape", "reason"), [
    ((0xFFFFFFFF, 0xFFFFFFFF), "elements"),  # np.prod overflowed; a sparse tensor of 2^64
    ((1 << 20, 1 << 20), "elements"),  # 2^40 float32 from a 30-byte blob
    ((0, 0xFFFFFFFF, 0xFFFFFFFF), "elements"),  # size 0, yet numpy refuses the shape
    ((1,) * 65, "dimensions"),  # past numpy's 64
])
def test_shapes_without_a_model_are_bounded(shape: tuple[int, ...], reason: str) -> None:
    with pytest.raises(CompressionError, match=reason):
        decode(_blob(shape), None)


@pytest.mark.parametrize("scale", [math.inf, math.nan, 3e38])
def test_int8_scale_must_be_a_finite_step(scale: float) -> None:
    blob = _blob((2,), kind=1, tail=struct.pack("<f", scale) + b"\x7f\x7f")
    with pytest.raises(CompressionError, match="scale"):
        decode(blob, [np.zeros(2, dtype=np.float32)])
