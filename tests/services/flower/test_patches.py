"""services/flower/patches.py: every target exists with the signature the patch relies on in
the installed flwr; the version guard falls back or refuses on another flwr; a missing target
fails loudly; the fast-poll patches do what they claim."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from pqfed.services.flower import IdleBackoff
from pqfed.services.flower import patches as fp

REPO = Path(__file__).resolve().parents[3]
OTHER_VERSIONS = ["1.41.0", "1.43.0", "2.0.0"]
TARGETS = [(p, t) for p in fp.ALL_PATCHES for t in p.targets]


def _setting(patch: fp.FlowerPatch[Any]) -> Any:
    if patch is fp.UVICORN_HTTP_PIN:
        return "httptools"
    if patch is fp.PEER_BINDING:
        return b"X-Pqfed-Peer"
    if patch is fp.SUPERNODE_IDLE_BACKOFF:
        return (0.1, IdleBackoff())
    if patch is fp.SUPERLINK_ASGI_MIDDLEWARE:
        return None
    return 0.1


# --------------------------------------------------------------------------- targets


def test_the_pinned_flwr_is_installed_and_is_the_projects_pin() -> None:
    assert fp.installed_flwr_version() == fp.PINNED_FLWR_VERSION
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = [d for extra in project["optional-dependencies"].values() for d in extra]
    assert f"flwr[dp]=={fp.PINNED_FLWR_VERSION}" in [*project["dependencies"], *deps]


@pytest.mark.parametrize(("patch", "target"), TARGETS,
                         ids=[f"{p.name}:{t.name}" for p, t in TARGETS])
def test_target_exists_with_the_expected_signature(patch: fp.FlowerPatch[Any],
                                                   target: fp.Target) -> None:
    target.resolve(fp.PINNED_FLWR_VERSION)  # raises PatchTargetMissing otherwise


@pytest.mark.parametrize("patch", fp.ALL_PATCHES, ids=lambda p: p.name)
def test_each_patch_says_what_upstream_does(patch: fp.FlowerPatch[Any]) -> None:
    assert "Upstream:" in (type(patch).__doc__ or "")
    assert patch.without


@pytest.mark.parametrize(("target", "reason"), [
    (fp.Target("flwr.supercore.constant", "NO_SUCH_CONSTANT"), "no attribute 'NO_SUCH_CONSTANT'"),
    (fp.Target("flwr.no_such_module", "x"), "module does not import"),
    (fp.Target("flwr.supercore.object_store.in_memory_object_store",
               "InMemoryObjectStore.put", params=("self", "object_id")), "signature"),
    (fp.Target("flwr.supercore.inflatable.inflatable_utils", "pull_objects",
               keyword_defaults=("no_such_default",)), "no keyword-only defaults"),
    (fp.Target("flwr.supercore.routers.runtime.responses", "_POLL_INTERVAL",
               expect=lambda v: "changed"), "changed"),
    # inherited, not defined on the class: patching it would change the base class
    (fp.Target("flwr.supercore.object_store.in_memory_object_store",
               "InMemoryObjectStore.__init_subclass__"), "no attribute"),
])
def test_a_missing_or_changed_target_raises_naming_it_and_the_version(
        target: fp.Target, reason: str) -> None:
    with pytest.raises(fp.PatchTargetMissing) as err:
        target.resolve("1.42.0")
    assert err.value.target == target.name and err.value.flwr_version == "1.42.0"
    assert reason in err.value.reason
    assert target.name in str(err.value) and "1.42.0" in str(err.value)


def test_no_patch_is_half_applied_when_a_target_is_missing() -> None:
    applied: list[object] = []

    class Broken(fp.FlowerPatch[float]):
        """Upstream: test double."""

        name = "broken"
        targets = (fp.Target("flwr.supercore.constant", "PULL_BACKOFF_CAP"),
                   fp.Target("flwr.supercore.constant", "GONE_IN_THIS_RELEASE"))
        on_other_version = fp.OnOtherVersion.STOCK
        without = "nothing"

        def apply(self, setting: float, values: list[Any], flwr_version: str) -> None:
            applied.append(setting)

    with pytest.raises(fp.PatchTargetMissing, match="GONE_IN_THIS_RELEASE"):
        Broken().install(0.1, flwr_version=fp.PINNED_FLWR_VERSION)
    assert applied == []


# --------------------------------------------------------------------------- version guard


@pytest.mark.parametrize("version", OTHER_VERSIONS)
@pytest.mark.parametrize("patch", [p for p in fp.ALL_PATCHES
                                   if p.on_other_version is fp.OnOtherVersion.STOCK],
                         ids=lambda p: p.name)
def test_speed_patches_fall_back_to_stock_flower_on_another_version(
        patch: fp.FlowerPatch[Any], version: str, caplog: pytest.LogCaptureFixture) -> None:
    before = [t.resolve(fp.PINNED_FLWR_VERSION) for t in patch.targets]
    before_defaults = [dict(getattr(v, "__kwdefaults__", None) or {}) for v in before]
    with caplog.at_level(logging.WARNING, logger=fp.__name__):
        assert patch.install(_setting(patch), flwr_version=version) is False
    after = [t.resolve(fp.PINNED_FLWR_VERSION) for t in patch.targets]
    assert all(a is b for a, b in zip(after, before, strict=True))  # nothing replaced
    assert [dict(getattr(v, "__kwdefaults__", None) or {}) for v in after] == before_defaults
    assert patch.name in caplog.text and version in caplog.text
    assert fp.PINNED_FLWR_VERSION in caplog.text and "stock Flower" in caplog.text


@pytest.mark.parametrize("version", OTHER_VERSIONS)
def test_fast_poll_patches_nothing_on_another_version(version: str) -> None:
    assert fp.install_fast_poll(0.1, flwr_version=version) == []


@pytest.mark.parametrize("version", OTHER_VERSIONS)
@pytest.mark.parametrize("patch", [fp.UVICORN_HTTP_PIN, fp.PEER_BINDING], ids=lambda p: p.name)
def test_security_patches_refuse_another_version(patch: fp.FlowerPatch[Any],
                                                 version: str) -> None:
    """Stock Flower would be wrong here: a SuperLink parsing HTTP differently from the
    sidecar's filter, or one certificate holding several Flower nodes."""
    with pytest.raises(fp.UnsupportedFlowerVersion) as err:
        patch.install(_setting(patch), flwr_version=version)
    assert err.value.patch == patch.name and err.value.flwr_version == version
    assert f"flwr=={fp.PINNED_FLWR_VERSION}" in str(err.value)


def test_the_launcher_refuses_to_start_a_superlink_on_another_version() -> None:
    """`python -m pqfed.services.flower exec --http ... flower-superlink` on an unpinned flwr
    (simulated by the version string) exits with the refusal before the SuperLink starts."""
    code = ("import sys; from pqfed.services.flower import patches, launch; "
            "patches.installed_flwr_version = lambda: '1.43.0'; "
            "launch.main(['exec', '--http', 'httptools', 'flower-superlink', '--', '--help'])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=False)
    assert res.returncode != 0
    assert "UnsupportedFlowerVersion" in res.stderr and "uvicorn-http-pin" in res.stderr
    assert "usage: flower-superlink" not in res.stdout


# --------------------------------------------------------------------------- behaviour


def test_wakeable_sleep_ends_on_wakeup_and_falls_back_to_cap() -> None:
    wakeup = threading.Event()
    clock = fp.WakeableTime(0.5, wakeup)
    threading.Timer(0.05, wakeup.set).start()
    t0 = time.monotonic()
    clock.sleep(3.0)
    assert time.monotonic() - t0 < 0.4  # woke on the event, not the 0.5 s cap
    assert not wakeup.is_set()  # consumed: the next sleep waits again
    t0 = time.monotonic()
    clock.sleep(3.0)
    assert 0.45 <= time.monotonic() - t0 < 2.0  # nothing arrived: the cap, not 3 s
    assert clock.monotonic() > 0  # everything else is the real `time`


def test_throttled_runs_once_per_interval_per_instance() -> None:
    calls: list[object] = []

    class Store:
        def sweep(self) -> str:
            calls.append(self)
            return "swept"

    sweep = fp.throttled(Store.sweep, 0.2)
    a, b = Store(), Store()
    assert sweep(a) == "swept"
    assert sweep(a) is None  # within the interval: skipped
    assert sweep(b) == "swept"  # other instance: own clock
    time.sleep(0.25)
    assert sweep(a) == "swept"
    assert calls == [a, b, a]


# Runs in a fresh interpreter: the patches are process-wide and must not leak into other tests.
_INSTALL_CHECK = """
import contextlib, json
from pqfed.services.flower import IdleBackoff
from pqfed.services.flower import patches as fp
from flwr.supercore.corestate.sql_corestate import SqlCoreState
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
from flwr.supercore.routers.runtime import responses
from flwr.serverapp.strategy import strategy_utils
from flwr.superlink.grid import http_grid
from flwr.supernode import start_client_internal
from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

first = fp.install_fast_poll(0.1)
again = fp.install_fast_poll(0.1)
fp.NODE_WAKEUP.clear()
with contextlib.suppress(Exception):  # an unregistered object: the wake-up still fires
    InMemoryObjectStore().put("0" * 64, b"x")
woke = fp.NODE_WAKEUP.is_set()
defaults = inflatable_utils.pull_and_inflate_object_from_tree.__kwdefaults__
for patch in fp.ALL_PATCHES:  # the targets still check once patched
    for target in patch.targets:
        target.resolve(fp.PINNED_FLWR_VERSION)
print(json.dumps({
    "patched": first, "idempotent": first == again, "woke": woke,
    "wakeable": isinstance(start_client_internal.time, fp.WakeableTime),
    "grid": isinstance(http_grid.time, fp.CappedTime),
    "strategy": strategy_utils.sleep.__self__.__class__.__name__,
    "poll": responses._POLL_INTERVAL,
    "backoff": [defaults["initial_backoff"], defaults["backoff_cap"],
                defaults["max_tries_per_object"]],
    "sweep": getattr(SqlCoreState._cleanup_expired_task_tokens, "__pqfed_patched__", False),
    "store": getattr(InMemoryNodeState.store_message, "__pqfed_patched__", False),
    "store_wrapped_once": not hasattr(InMemoryNodeState.store_message.__wrapped__,
                                      "__wrapped__"),
}))
"""


def test_install_fast_poll_patches_every_target_once() -> None:
    res = subprocess.run([sys.executable, "-c", _INSTALL_CHECK], capture_output=True,
                         text=True, timeout=120, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    expected = [t.name for p in (*fp.FAST_POLL_PATCHES, fp.TOKEN_SWEEP_THROTTLE)
                for t in p.targets]
    assert out["patched"] == expected
    assert out["idempotent"] and out["store_wrapped_once"]  # no double wrapping
    assert out["wakeable"] and out["woke"]  # stored objects wake the SuperNode's Fleet loop
    assert out["grid"] and out["strategy"] == "CappedTime"
    assert out["poll"] == 0.1
    assert out["backoff"] == [0.1, 0.1, None]
    assert out["sweep"] and out["store"]


# The SuperNode's loop as flwr 1.42 runs it: pull (None: nothing for the node), then the idle
# `time.sleep(3)`; after a message, `_push_messages`. Fresh interpreter, as above.
_IDLE_CHECK = """
import json, time
from pqfed.services.flower import patches as fp
from pqfed.services.flower.settings import IdleBackoff
from flwr.supernode import start_client_internal as sci

fp.install_fast_poll(0.1)
assert fp.install_idle_backoff(0.1, IdleBackoff(window_s=1.0, cap_s=0.4, factor=2.0))
assert fp.install_idle_backoff(0.1, IdleBackoff())  # again: nothing wrapped twice
clock = sci.time
poller = clock.poller
def empty_pull():
    return sci._pull_and_store_message(
        state=None, object_store=None, node_config={}, receive=lambda: None, get_run=None,
        get_fab=None, pull_object=None, confirm_message_received=None, trusted_entities=None)
waits = []
assert empty_pull() is None
waits.append(poller.take_pending())
poller.last_activity -= 10  # idle for 10 s: back off
for _ in range(4):
    empty_pull()
    waits.append(poller._pending)
    clock.sleep(3)  # the loop's idle sleep consumes the poller's wait
    waits.append(poller._pending)
class Failing:
    def get_messages_legacy(self, is_reply):
        raise RuntimeError("stop")
try:
    sci._push_messages(state=Failing(), object_store=None, send=None, push_object=None)
except RuntimeError:
    pass
empty_pull()
after_push = poller.take_pending()
for patch in fp.ALL_PATCHES:
    for target in patch.targets:
        target.resolve(fp.PINNED_FLWR_VERSION)
print(json.dumps({"clock": type(clock).__name__, "waits": waits, "after_push": after_push,
                  "once": not hasattr(sci._pull_and_store_message.__wrapped__, "__wrapped__")}))
"""


def test_idle_backoff_drives_the_supernode_loops_idle_sleep() -> None:
    res = subprocess.run([sys.executable, "-c", _IDLE_CHECK], capture_output=True,
                         text=True, timeout=120, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["clock"] == "IdleBackoffTime"  # still a WakeableTime for the reply wait
    waits = out["waits"]
    assert waits[0] == 0.1  # just started: fast
    # each empty pull decides a wait (doubling to the 0.4 s cap), the idle sleep takes it
    assert waits[1::2] == [0.2, 0.4, 0.4, 0.4]
    assert waits[2::2] == [None] * 4
    assert out["after_push"] == 0.1  # a pushed reply (even a failed push) resets to fast
    assert out["once"]
