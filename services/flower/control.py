"""Flower 1.42's Control API, as a client: submit a run (through the ``flwr`` CLI, the only
public way to build and push a FAB), follow it, stop it, read its ServerApp log, list nodes.

The status and node queries use flwr's own protobuf-over-HTTP client
(``flwr.supercore.control.control_http_client.ControlHttpClient``, not a public API; its
constructor is checked by tests/services/flower/test_control.py against the installed flwr).
"""

from __future__ import annotations

import contextlib
import json
import shlex
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pqfed.services.flower.app_dir import ConfigValue, app_run_config_defaults
from pqfed.services.flower.environment import (
    BIN_DIR,
    DEFAULT_CONNECTION,
    bypass_proxy_for_loopback,
    flower_env,
    write_flower_config,
)
from pqfed.services.procs import ManagedProcess


@dataclass(frozen=True)
class RunStatus:
    run_id: int
    status: str  # pending | starting | running | finished
    sub_status: str  # completed | failed | stopped | "" (until finished)
    details: str

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def succeeded(self) -> bool:
        return self.finished and self.sub_status == "completed"


def control_client(control_address: str) -> Any:
    """flwr's Control API client for an insecure (loopback) SuperLink."""
    from flwr.supercore.control.control_http_client import ControlHttpClient

    bypass_proxy_for_loopback()
    return ControlHttpClient.from_server_address(control_address, True, None, [])


def get_run_status(run_id: int, control_address: str) -> RunStatus:
    from flwr.proto.control_pb2 import ListRunsRequest

    client = control_client(control_address)
    try:
        res = client.ListRuns(ListRunsRequest(run_id=run_id))
    finally:
        client.close()
    if run_id not in res.run_dict:
        raise KeyError(f"run {run_id} unknown to SuperLink {control_address}")
    st = res.run_dict[run_id].status
    return RunStatus(run_id, str(st.status), str(st.sub_status), str(st.details))


def try_run_status(run_id: int, control_address: str) -> RunStatus | None:
    """`get_run_status`, or None when the SuperLink did not answer in time: a late answer
    from a busy SuperLink (many nodes polling) is asked again, not fatal."""
    import httpx

    try:
        return get_run_status(run_id, control_address)
    except httpx.TimeoutException:
        return None


def wait_run(
    run_id: int,
    control_address: str,
    timeout: float,
    *,
    poll: float = 0.5,
    watch: Sequence[ManagedProcess] = (),
) -> RunStatus:
    """Block until the run is finished (any sub-status); raise TimeoutError otherwise.
    Processes in ``watch`` are checked while waiting so a crash fails fast."""
    deadline = time.monotonic() + timeout
    status: RunStatus | None = None
    while True:
        status = try_run_status(run_id, control_address) or status
        if status is not None and status.finished:
            return status
        for proc in watch:
            proc.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} not finished after {timeout:.0f}s: {status}")
        time.sleep(poll)


def stop_run(run_id: int, control_address: str) -> bool:
    from flwr.proto.control_pb2 import StopRunRequest

    client = control_client(control_address)
    try:
        return bool(client.StopRun(StopRunRequest(run_id=run_id)).success)
    finally:
        client.close()


def list_nodes(control_address: str) -> dict[int, str]:
    """node_id -> status (``online``/``offline``/...)."""
    from flwr.proto.control_pb2 import ListNodesRequest

    client = control_client(control_address)
    try:
        res = client.ListNodes(ListNodesRequest())
    finally:
        client.close()
    return {int(n.node_id): str(n.status) for n in res.nodes_info}


def wait_nodes(
    control_address: str,
    count: int,
    timeout: float,
    watch: Sequence[ManagedProcess] = (),
) -> list[int]:
    """Wait until at least ``count`` SuperNodes are online; return their ids."""
    import httpx

    deadline = time.monotonic() + timeout
    online: list[int] = []
    while True:
        # A SuperLink busy with many nodes' registrations and polls answers late; that is
        # no reason to give up the job before `timeout` (issue 13: 100 clients).
        with contextlib.suppress(httpx.TimeoutException):
            online = [nid for nid, st in list_nodes(control_address).items()
                      if st == "online"]
        if len(online) >= count:
            return online
        for proc in watch:
            proc.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(online)}/{count} SuperNodes online after {timeout:.0f}s")
        time.sleep(0.2)


def submit_run(
    app_dir: Path,
    run_config: Mapping[str, ConfigValue],
    superlink_control_address: str,
    *,
    flwr_home: Path,
    extra_pythonpath: Sequence[Path | str] = (),
    connection: str = DEFAULT_CONNECTION,
    log_path: Path | None = None,
    timeout: float = 120.0,
) -> int:
    """``flwr run APP_DIR CONN --format json --run-config FILE`` -> run id.

    ``run_config`` overrides ``[tool.flwr.app.config]``; unknown keys are rejected up front
    (Flower only accepts overrides of existing keys). The component modules
    must be importable by this ``flwr run`` (it checks them with ``importlib.util.find_spec``).
    """
    import tomli_w

    app_dir = Path(app_dir).resolve()
    unknown = sorted(set(run_config) - set(app_run_config_defaults(app_dir)))
    if unknown:
        raise ValueError(
            f"run_config keys {unknown} are not in [tool.flwr.app.config] of {app_dir} "
            "(add them there or via stage_app_dir(config_defaults=...))"
        )
    write_flower_config(flwr_home, superlink_control_address, connection)
    cmd = [str(BIN_DIR / "flwr"), "run", str(app_dir), connection, "--format", "json"]
    if run_config:
        # A TOML file keeps value types and avoids quoting through the CLI parser.
        overrides = flwr_home / f"run-config-{time.time_ns()}.toml"
        overrides.write_text(tomli_w.dumps(dict(run_config)), encoding="utf-8")
        cmd += ["--run-config", str(overrides)]
    env = flower_env(flwr_home, extra_pythonpath=extra_pythonpath)
    res = subprocess.run(
        cmd, capture_output=True, text=True, env=env, cwd=flwr_home, timeout=timeout, check=False
    )
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("a", encoding="utf-8") as f:
            f.write(f"$ {shlex.join(cmd)}\n{res.stdout}{res.stderr}\n")
    payload: dict[str, Any] = {}
    start = res.stdout.find("{")
    if start >= 0:
        with contextlib.suppress(json.JSONDecodeError):
            payload = json.loads(res.stdout[start:])
    if res.returncode != 0 or not payload.get("success") or payload.get("run-id") is None:
        raise RuntimeError(
            f"flwr run failed (rc={res.returncode}): {payload.get('error-message') or ''}\n"
            f"stdout: {res.stdout[-2000:]}\nstderr: {res.stderr[-2000:]}"
        )
    return int(payload["run-id"])


def fetch_run_logs(
    run_id: int,
    control_address: str,
    *,
    flwr_home: Path,
    connection: str = DEFAULT_CONNECTION,
    timeout: float = 60.0,
) -> str:
    """ServerApp output of a run (SuperExec sends it to /dev/null; the SuperLink keeps it)."""
    write_flower_config(flwr_home, control_address, connection)
    res = subprocess.run(
        [str(BIN_DIR / "flwr"), "log", str(run_id), connection, "--show"],
        capture_output=True, text=True, env=flower_env(flwr_home), cwd=flwr_home,
        timeout=timeout, check=False,
    )  # fmt: skip
    return res.stdout + res.stderr
