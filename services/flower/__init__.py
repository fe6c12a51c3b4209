"""Flower 1.42 deployment runtime on one machine: SuperLink, SuperNodes and app executors as
separate OS processes (the process layout of the Kubernetes pods), driven from Python.

Process recipe (Flower 1.42, everything on 127.0.0.1, explicit ports)::

    # 1. SuperLink: ONE HTTP port serves the Fleet, Control and Runtime (ServerApp) APIs.
    flower-superlink --insecure --isolation process --disable-runtime-dependency-installation \
        --host 127.0.0.1 --port $LINK --database $STATE/superlink.db
    #    (run as `python -m pqfed.services.flower exec --http httptools
    #    flower-superlink -- ...`: flwr calls uvicorn.run without http=, and the sidecar's
    #    request filter was validated against httptools, so that parser is pinned.)
    # 2. Long-lived ServerApp launcher. Flower 1.42 has no long-lived ServerApp: `flwr-serverapp`
    #    needs a per-run token. SuperExec polls the Runtime API and spawns one `flwr-serverapp`
    #    per run (its stdout goes to /dev/null; read it with `flwr log RUN_ID CONN --show`).
    flower-superexec --insecure --runtime-api-address 127.0.0.1:$LINK
    # 3. Per node i: SuperNode (Fleet client + ClientApp Runtime API on its own port) ...
    flower-supernode --insecure --isolation process --superlink 127.0.0.1:$FLEET \
        --host 127.0.0.1 --port $NODE_RT_i --node-config 'partition-id=i num-partitions=n'
    #    ... and its ClientApp launcher: spawns one `flwr-clientapp` PER MESSAGE.
    flower-superexec --insecure --runtime-api-address 127.0.0.1:$NODE_RT_i
    # 4. Submit: `flwr run APP_DIR CONN --format json --run-config overrides.toml` where CONN is
    #    a [superlink.CONN] table (address, insecure) in $FLWR_HOME/config.toml.

With ``--isolation subprocess`` (the default) SuperLink and SuperNode start step 2/3's
SuperExec themselves; the per-run/per-message app processes are the same either way.

Every process gets its own session (``start_new_session``), its own ``FLWR_HOME`` and a log
file under ``run_dir/logs``; ``stop()`` terminates the whole process tree. Telemetry and the
update check are disabled so nothing leaves 127.0.0.1.

Speed (measured: 3 nodes, 10-float FedAvg, train+evaluate per round, 2-core box): the stock
recipe costs ~12.5 s per round in BOTH isolation modes. Flower 1.42 has no long-lived ClientApp:
SuperExec spawns one cold ``flwr-clientapp`` per message (~1.1 s CPU of imports, more with
torch), and poll sleeps are hard-coded (SuperNode idle loop 3 s, ServerApp
``Grid.send_and_receive`` 3 s, object pulls back off 1 s doubling to 10 s). Two opt-ins, both
fields of `FlowerTuning`:

* ``poll_cap=S`` (~6.5 s/round): SuperNode runs via ``python -m pqfed.services.flower exec``;
  ``flwr-serverapp``/``flwr-clientapp`` shims go first on the SuperExec's PATH; all cap
  those sleeps/back-offs at S seconds. The SuperNode's wait for its ClientApp's reply (and
  that reply's objects) also ends as soon as they are stored, and the SuperLink's SQL state
  sweeps expired task claims at most once a second. These patch private attributes of the
  pinned flwr==1.42.0, all in services/flower/patches.py (version-guarded: stock Flower, with
  a log line, on any other flwr).
* ``warm_clientapp=True`` (+ ``preload``; with poll_cap ~2.4 s/round): a per-node process
  imports ``flwr-clientapp`` and the app once and forks one pristine child per task
  (services/flower/warm_clientapp.py).

Modules: settings (`FlowerTuning`), polling (`IdlePoller`: idle SuperNodes back off),
environment (FLWR_HOME, env, console scripts), app_dir
(the FAB source and config syntax), processes (SuperLink/SuperExec/SuperNode), control (the
Control API client), deployment (`FlowerDeployment`), warm_clientapp, patches, launch
(``python -m pqfed.services.flower``). Generic process supervision and ports live outside
Flower, in services/procs.py and services/ports.py.
"""

from pqfed.services.flower.app_dir import (
    FLOWER_APP_DIR,
    ConfigValue,
    app_run_config_defaults,
    format_config_args,
    stage_app_dir,
)
from pqfed.services.flower.control import (
    RunStatus,
    fetch_run_logs,
    get_run_status,
    list_nodes,
    stop_run,
    submit_run,
    try_run_status,
    wait_nodes,
    wait_run,
)
from pqfed.services.flower.deployment import FlowerDeployment
from pqfed.services.flower.environment import DEFAULT_CONNECTION, flower_env, write_flower_config
from pqfed.services.flower.patches import (
    PINNED_FLWR_VERSION,
    FlowerPatchError,
    PatchTargetMissing,
    UnsupportedFlowerVersion,
)
from pqfed.services.flower.polling import IdlePoller
from pqfed.services.flower.processes import (
    Isolation,
    SuperExecProcess,
    SuperLinkProcess,
    SuperNodeProcess,
    superlink_http_implementation,
)
from pqfed.services.flower.settings import FlowerTuning, FlowerTuningError, IdleBackoff

__all__ = [
    "DEFAULT_CONNECTION",
    "FLOWER_APP_DIR",
    "PINNED_FLWR_VERSION",
    "ConfigValue",
    "FlowerDeployment",
    "FlowerPatchError",
    "FlowerTuning",
    "FlowerTuningError",
    "IdleBackoff",
    "IdlePoller",
    "Isolation",
    "PatchTargetMissing",
    "RunStatus",
    "SuperExecProcess",
    "SuperLinkProcess",
    "SuperNodeProcess",
    "UnsupportedFlowerVersion",
    "app_run_config_defaults",
    "fetch_run_logs",
    "flower_env",
    "format_config_args",
    "get_run_status",
    "list_nodes",
    "stage_app_dir",
    "stop_run",
    "submit_run",
    "superlink_http_implementation",
    "try_run_status",
    "wait_nodes",
    "wait_run",
    "write_flower_config",
]
