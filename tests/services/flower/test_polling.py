"""services/flower/polling.py: an idle node's poll timing, as a pure state machine (times are
passed in, nothing sleeps), and its settings on `FlowerTuning`."""

from __future__ import annotations

import pytest

from pqfed.services.flower import FlowerTuning, FlowerTuningError, IdleBackoff, IdlePoller

FAST = 0.1
POLICY = IdleBackoff(window_s=1.0, cap_s=2.0, factor=2.0)


def _waits(poller: IdlePoller, start: float, count: int) -> list[float]:
    """Waits of `count` consecutive empty polls from `start` on (virtual clock)."""
    now, out = start, []
    for _ in range(count):
        wait = poller.empty_poll(now)
        out.append(wait)
        now += wait
    return out


def test_fast_within_the_window_after_activity() -> None:
    poller = IdlePoller(FAST, POLICY, now=100.0)
    assert poller.empty_poll(100.0) == FAST
    assert poller.empty_poll(100.99) == FAST  # still within the 1 s window


def test_idle_doubles_to_the_cap_and_stays_there() -> None:
    poller = IdlePoller(FAST, POLICY, now=0.0)
    assert _waits(poller, 1.0, 7) == pytest.approx([0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0])


def test_a_message_or_a_reply_resets_to_fast() -> None:
    poller = IdlePoller(FAST, POLICY, now=0.0)
    _waits(poller, 5.0, 6)
    assert poller.delay == 2.0
    poller.activity(20.0)  # a message arrived / a reply was pushed
    assert poller.empty_poll(20.1) == FAST
    assert _waits(poller, 21.5, 2) == pytest.approx([0.2, 0.4])  # backs off from fast again


@pytest.mark.parametrize("arrival", [0.05, 0.7, 3.3, 11.0, 59.9])
def test_a_new_instruction_is_seen_at_most_cap_later_than_it_arrived(arrival: float) -> None:
    """Walk the polls of a node idle since t=0 until the first one at or after `arrival`:
    a backed-off node sees the instruction at most cap_s late, within the window at most
    the fast interval late."""
    poller = IdlePoller(FAST, POLICY, now=0.0)
    now = 0.0
    while now < arrival:
        now += poller.empty_poll(now)
    late = now - arrival
    bound = FAST if arrival < POLICY.window_s else POLICY.cap_s
    assert 0 <= late <= bound + 1e-9


def test_polls_per_idle_minute_fall_twentyfold() -> None:
    """Requests an idle node sends in 60 s: 600 at the fixed 0.1 s, ~40 with the back-off."""
    poller = IdlePoller(FAST, POLICY, now=0.0)
    now, polls = 0.0, 0
    while now < 60.0:
        now += poller.empty_poll(now)
        polls += 1
    assert polls <= 60 / POLICY.cap_s + POLICY.window_s / FAST + 5


def test_the_pending_wait_is_taken_once() -> None:
    poller = IdlePoller(FAST, POLICY, now=0.0)
    assert poller.take_pending() is None  # no empty poll yet: not the idle sleep
    wait = poller.empty_poll(5.0)
    assert poller.take_pending() == wait
    assert poller.take_pending() is None  # the reply/object waits after it stay capped
    poller.empty_poll(6.0)
    poller.activity(6.1)  # a message came in between: no idle wait pending
    assert poller.take_pending() is None


def test_fast_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="fast_s"):
        IdlePoller(0.0, POLICY, now=0.0)


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"window_s": -1.0}, "idle_backoff.window_s"),
    ({"cap_s": 0.0}, "idle_backoff.cap_s"),
    ({"cap_s": True}, "idle_backoff.cap_s"),
    ({"factor": 0.5}, "idle_backoff.factor"),
    ({"factor": 1.0}, "idle_backoff.factor"),  # would never back off
])
def test_bad_backoff_values_name_the_field(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(FlowerTuningError) as err:
        IdleBackoff(**kwargs)
    assert err.value.field == field
    assert f"FlowerTuning.{field}" in str(err.value)


def test_backoff_argument_round_trips_and_bad_ones_say_the_form() -> None:
    assert IdleBackoff.from_arg(POLICY.to_arg()) == POLICY
    for bad in ("1,2", "1,x,2", ""):
        with pytest.raises(FlowerTuningError, match="idle_backoff") as err:
            IdleBackoff.from_arg(bad)
        assert err.value.field == "idle_backoff"
    with pytest.raises(FlowerTuningError, match="WINDOW,CAP,FACTOR"):
        IdleBackoff.from_arg("1,2")


def test_tuning_backoff_needs_the_fast_poll_and_a_cap_not_below_it() -> None:
    assert FlowerTuning.fast(0.1, idle_backoff=POLICY).idle_backoff == POLICY
    with pytest.raises(FlowerTuningError) as err:
        FlowerTuning(idle_backoff=POLICY)  # stock sleeps: nothing to back off from
    assert err.value.field == "idle_backoff"
    with pytest.raises(FlowerTuningError) as err:
        FlowerTuning(poll_cap=0.5, idle_backoff=IdleBackoff(cap_s=0.2))
    assert err.value.field == "idle_backoff.cap_s"


def test_superlink_middleware_is_one_of_the_known_stacks() -> None:
    assert FlowerTuning().superlink_middleware == "stock"
    assert not FlowerTuning(superlink_middleware="asgi").stock
    with pytest.raises(FlowerTuningError) as err:
        FlowerTuning(superlink_middleware="fast")
    assert err.value.field == "superlink_middleware" and "asgi" in str(err.value)
