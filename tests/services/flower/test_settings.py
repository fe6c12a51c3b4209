"""FlowerTuning: one frozen, validated object for every launch knob."""

from __future__ import annotations

import dataclasses

import pytest

from pqfed.services.flower import FlowerTuning, FlowerTuningError


def test_default_is_stock_and_fast_is_not() -> None:
    assert FlowerTuning().stock
    fast = FlowerTuning.fast(0.1, preload=("torch",))
    assert not fast.stock
    assert (fast.poll_cap, fast.superexec_poll_interval, fast.warm_clientapp, fast.preload) == (
        0.1, 0.1, True, ("torch",))


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        FlowerTuning().poll_cap = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(("changes", "field"), [
    ({"poll_cap": 0.0}, "poll_cap"),
    ({"poll_cap": -1.0}, "poll_cap"),
    ({"superexec_poll_interval": 0.001}, "superexec_poll_interval"),
    ({"superexec_poll_interval": 61.0}, "superexec_poll_interval"),
    ({"preload": ("torch",)}, "preload"),  # without warm_clientapp nothing would preload
    ({"warm_clientapp": True, "preload": "torch"}, "preload"),  # a str, not a tuple
    ({"long_poll_s": 5.0}, "long_poll_s"),  # a layer of the asgi stack only
])
def test_bad_values_name_the_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(FlowerTuningError) as err:
        FlowerTuning(**changes)  # type: ignore[arg-type]
    assert err.value.field == field
    assert f"FlowerTuning.{field}" in str(err.value)


def test_replace_validates_again() -> None:
    fast = FlowerTuning.fast()
    assert fast.replace(warm_clientapp=False, preload=()).warm_clientapp is False
    with pytest.raises(FlowerTuningError, match="poll_cap"):
        fast.replace(poll_cap=0)
