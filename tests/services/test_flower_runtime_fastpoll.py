"""install_fast_poll: capped sleeps, the SuperNode's wake-on-reply and the throttled sweep."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

from pqfed.services import flower_runtime as fr


def test_wakeable_sleep_ends_on_wakeup_and_falls_back_to_cap() -> None:
    wakeup = threading.Event()
    clock = fr._WakeableTime(0.5, wakeup)
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

    sweep = fr._throttled(Store.sweep, 0.2)
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
from pqfed.services import flower_runtime as fr
from flwr.supercore.corestate.sql_corestate import SqlCoreState
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
from flwr.supernode import start_client_internal
from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

first = fr.install_fast_poll(0.1)
again = fr.install_fast_poll(0.1)
fr._NODE_WAKEUP.clear()
with contextlib.suppress(Exception):  # an unregistered object: the wake-up still fires
    InMemoryObjectStore().put("0" * 64, b"x")
woke = fr._NODE_WAKEUP.is_set()
defaults = inflatable_utils.pull_objects.__kwdefaults__
print(json.dumps({
    "patched": first, "idempotent": first == again, "woke": woke,
    "wakeable": isinstance(start_client_internal.time, fr._WakeableTime),
    "backoff": [defaults["initial_backoff"], defaults["backoff_cap"]],
    "sweep": getattr(SqlCoreState._cleanup_expired_task_tokens, "__pqfed_patched__", False),
    "store": getattr(InMemoryNodeState.store_message, "__pqfed_patched__", False),
}))
"""


def test_install_fast_poll_patches_the_message_path_once() -> None:
    res = subprocess.run([sys.executable, "-c", _INSTALL_CHECK], capture_output=True,
                         text=True, timeout=120, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for name in (
        "flwr.supernode.start_client_internal.time",
        "flwr.superlink.grid.http_grid.time",
        "flwr.supernode.nodestate.in_memory_nodestate.InMemoryNodeState.store_message",
        "flwr.supercore.object_store.in_memory_object_store.InMemoryObjectStore.put",
        "flwr.supercore.corestate.sql_corestate.SqlCoreState._cleanup_expired_task_tokens",
        "flwr.supercore.inflatable.inflatable_utils.pull_objects",
    ):
        assert name in out["patched"]
    assert out["idempotent"]  # no double wrapping
    assert out["wakeable"] and out["woke"]  # stored objects wake the SuperNode's Fleet loop
    assert out["backoff"] == [0.1, 0.1]
    assert out["sweep"] and out["store"]
