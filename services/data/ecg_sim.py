"""SIMULATED single-lead ECG rhythm classification. NOT patient data.

Every window is synthetic and the dataset is flagged ``simulated=True``: it exercises the
federated pipeline on an ECG-shaped signal but says nothing about clinical performance.

Classes (heart rate = 60 / mean RR interval):

* 0 ``normal``: sinus rhythm 60-100 bpm with small respiratory RR modulation;
* 1 ``bradycardia``: regular rhythm 35-55 bpm;
* 2 ``tachycardia``: regular rhythm 105-160 bpm;
* 3 ``irregular``: 55-140 bpm with either AF-like random RR variability (log-normal RR,
  coefficient of variation 0.12-0.30) or sinus rhythm with at least one premature
  (ectopic-like) beat followed by a compensatory pause.

The beat waveform comes from neurokit2's ``ecg_simulate(method="simple")`` (a Daubechies
wavelet cardiac cycle; fast and deterministic). We generate the RR sequence ourselves and
place one beat per RR interval because ``method="simple"`` tiles ``int(duration * HR / 60)``
identical beats and stretches them over the duration: a 5 s window can then only show
heart rates in steps of 12 bpm, every window starts on a beat, and there is no RR
variability at all. ``method="ecgsyn"`` (which has RR variability) is not used: it is
slower and can fail to terminate for some parameters. Windows are 5 s at 100 Hz, shaped
``(1, 500)``, with random beat phase, amplitude, baseline wander and Gaussian noise; the
whole set is a pure function of ``seed``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Final

import numpy as np

from .base import (
    FederatedDataset,
    FloatArray,
    Partition,
    assemble,
    rng_for,
    stratified_split_labels,
)

NAME: Final = "ecg-sim"
CLASS_NAMES: Final = ("normal", "bradycardia", "tachycardia", "irregular")
SAMPLING_RATE: Final = 100
DURATION_S: Final = 5.0
N_SAMPLES: Final = int(SAMPLING_RATE * DURATION_S)
N_PER_CLASS: Final = 1000
MAX_CLIENTS: Final = 50
FRACTIONS: Final = (0.70, 0.15, 0.15)
MIN_TRAIN_PER_CLIENT: Final = 10
HR_RANGES: Final = {0: (60.0, 100.0), 1: (35.0, 55.0), 2: (105.0, 160.0), 3: (55.0, 140.0)}


@lru_cache(maxsize=1)
def beat_template() -> FloatArray:
    """One cardiac cycle from neurokit2 (active part only, peak-normalized to 1)."""
    import neurokit2 as nk

    beat = np.asarray(
        nk.ecg_simulate(duration=1, sampling_rate=1000, heart_rate=60, method="simple",
                        noise=0, random_state=0),
        dtype=np.float64,
    )
    active = np.flatnonzero(np.abs(beat) > 1e-3 * np.abs(beat).max())
    tmpl: FloatArray = (beat[: active[-1] + 1] / np.abs(beat).max()).astype(np.float32)
    return tmpl


def rr_intervals(label: int, rng: np.random.Generator, duration: float) -> list[float]:
    """RR intervals (s) covering ``duration`` plus one extra beat before the window."""
    lo, hi = HR_RANGES[label]
    rr_mean = 60.0 / rng.uniform(lo, hi)
    out: list[float] = []
    t = 0.0
    mode_af = label == 3 and rng.random() < 0.6
    cv = rng.uniform(0.12, 0.30)
    rsa_amp = rng.uniform(0.01, 0.04) if label != 2 else rng.uniform(0.005, 0.02)
    rsa_f, rsa_phi = rng.uniform(0.2, 0.35), rng.uniform(0, 2 * np.pi)
    # the forced premature beat and its pause fall inside the window whatever the phase
    force_at = rng.uniform(rr_mean + 0.2, duration - 2.5 * rr_mean) if label == 3 else np.inf
    premature_done = False
    pending_pause: float | None = None
    while t < duration + 2 * rr_mean:
        if pending_pause is not None:
            rr, pending_pause = pending_pause, None
        elif mode_af:
            rr = rr_mean * float(np.exp(rng.normal(0.0, cv)))
        else:
            rr = rr_mean * (1 + rsa_amp * np.sin(2 * np.pi * rsa_f * t + rsa_phi)
                            + rng.normal(0.0, 0.005))
            due = t >= force_at and not premature_done
            if label == 3 and (due or rng.random() < 0.12):
                frac = rng.uniform(0.5, 0.7)
                rr, pending_pause = rr_mean * frac, rr_mean * (2.0 - frac)
                premature_done = True
        rr = max(rr, 0.25)
        out.append(rr)
        t += rr
    return out


def synth_window(label: int, rng: np.random.Generator) -> FloatArray:
    """One simulated 5 s, 100 Hz ECG window of the given rhythm class."""
    tmpl = beat_template()
    t = np.arange(N_SAMPLES) / SAMPLING_RATE
    rrs = rr_intervals(label, rng, DURATION_S)
    onset = -rng.uniform(0, rrs[0])  # random phase: the window need not start on a beat
    sig = np.zeros(N_SAMPLES)
    width = rng.uniform(0.9, 1.1)
    tgrid = np.linspace(0.0, 1.0, len(tmpl))
    for rr in rrs:
        # QT-like active part shortens with RR (Bazett-style sqrt), never beyond the RR.
        dur = min(0.6 * width * np.sqrt(rr), 0.9 * rr)
        m = (t >= onset) & (t < onset + dur)
        if m.any():
            sig[m] += np.interp((t[m] - onset) / dur, tgrid, tmpl)
        onset += rr
        if onset > DURATION_S:
            break
    sig *= rng.uniform(0.7, 1.3)
    sig += rng.uniform(0.0, 0.15) * np.sin(
        2 * np.pi * rng.uniform(0.1, 0.5) * t + rng.uniform(0, 2 * np.pi)
    )
    sig += rng.normal(0.0, rng.uniform(0.01, 0.05), N_SAMPLES)
    return sig.astype(np.float32)


def generate(seed: int, n_per_class: int = N_PER_CLASS) -> tuple[FloatArray, np.ndarray]:
    """``(x, y)``: x (n, 1, 500) float32 simulated windows, y int64 class ids, class-balanced."""
    rng = rng_for(seed, 3)
    labels = rng.permutation(np.repeat(np.arange(len(CLASS_NAMES)), n_per_class))
    x = np.stack([synth_window(int(k), rng) for k in labels])[:, None, :]
    return x.astype(np.float32), labels.astype(np.int64)


def load(n_clients: int, partition: Partition, seed: int) -> FederatedDataset:
    x, y = generate(seed)
    split = stratified_split_labels(y, FRACTIONS, rng_for(seed, 1))
    return assemble(
        name=NAME,
        x=x,
        y=y,
        split=split,
        groups=None,
        n_classes=len(CLASS_NAMES),
        n_clients=n_clients,
        partition=partition,
        seed=seed,
        simulated=True,
        class_names=CLASS_NAMES,
        min_train=MIN_TRAIN_PER_CLIENT,
        norm_axes=(0, 2),
        description="SIMULATED ECG rhythms (neurokit2 beat template), not patient data",
    )
