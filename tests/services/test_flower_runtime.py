"""Flower 1.42 deployment runtime: SuperLink + SuperNodes + SuperExecs as OS processes.

The slow tests run the numpy stand-in app (tests/services/flower_minimal_app/mini.py): three
nodes, node i adds scale*(i+1) and weighs with i+1, so FedAvg moves the model by
scale*(1+4+9)/(1+2+3) per round.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pqfed.services import flower_runtime as fr

MINI_DIR = Path(__file__).resolve().parent / "flower_minimal_app"
NUM_NODES = 3


def expected_value(rounds: int, scale: float, nodes: int = NUM_NODES) -> float:
    weights = [i + 1 for i in range(nodes)]
    return rounds * scale * sum(w * w for w in weights) / sum(weights)


class TcpRelay:
    """Plain byte relay 127.0.0.1:<port> -> target (stands in for the PQC sidecar)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.connections = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if up:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            s_reader, s_writer = await asyncio.open_connection(*self.target)
        except OSError:
            c_writer.close()
            return
        await asyncio.gather(
            self._pipe(c_reader, s_writer, up=True), self._pipe(s_reader, c_writer, up=False)
        )

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, fr.LOCALHOST, 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()

    @property
    def address(self) -> str:
        return f"{fr.LOCALHOST}:{self.port}"

    def start(self) -> TcpRelay:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def stage_mini_app(dest: Path) -> Path:
    return fr.stage_app_dir(
        dest,
        serverapp="mini:server_app",
        clientapp="mini:client_app",
        config_defaults={
            "num-server-rounds": 3,
            "fraction-evaluate": 1.0,
            "min-nodes": 2,
            "round-timeout": 600.0,
            "result-path": "",
            "client-scale": 1.0,
        },
    )


def run_mini(dep: fr.FlowerDeployment, app_dir: Path, rounds: int, scale: float) -> dict[str, Any]:
    result_path = dep.run_dir / f"result-{time.time_ns()}.json"
    t0 = time.monotonic()
    run_id = dep.submit(
        app_dir,
        {
            "num-server-rounds": rounds,
            "min-nodes": NUM_NODES,
            "client-scale": scale,
            "result-path": str(result_path),
            "round-timeout": 120.0,
        },
    )
    status = dep.wait(run_id, timeout=60 + 40 * rounds)
    wall = time.monotonic() - t0
    if not status.succeeded or not result_path.exists():
        logs = dep.run_logs(run_id)
        pytest.fail(f"run {run_id} ended {status}; ServerApp log:\n{logs[-4000:]}")
    result: dict[str, Any] = json.loads(result_path.read_text())
    result["wall_s"] = wall
    result["run_id_submitted"] = run_id
    stamps = result["round_stamps"]
    result["round_s"] = [b - a for a, b in itertools.pairwise(stamps)]
    return result


def check_result(result: dict[str, Any], rounds: int, scale: float) -> None:
    want = expected_value(rounds, scale)
    assert result["final"] == pytest.approx([want] * 10, rel=1e-5)
    assert result["train_partition_ids"] == [[0.0, 1.0, 2.0]] * rounds
    assert result["run_config"]["client-scale"] == scale
    assert result["run_id"] == result["run_id_submitted"]
    assert len(result["round_s"]) == rounds


# --------------------------------------------------------------------------- fast unit tests


def test_format_config_args() -> None:
    s = fr.format_config_args({"partition-id": 0, "lr": 0.5, "iid": True, "dir": "/a b"})
    assert s == 'partition-id=0 lr=0.5 iid=true dir="/a b"'
    with pytest.raises(ValueError):
        fr.format_config_args({"x": 'say "hi"'})


def test_commands_and_env(tmp_path: Path) -> None:
    dep = fr.FlowerDeployment.local(
        tmp_path, 2, superlink_port=9999, fleet_addresses=["127.0.0.1:7001", "127.0.0.1:7002"]
    )
    link = dep.superlink.command()
    assert "--isolation" in link and "process" in link
    assert "--disable-runtime-dependency-installation" in link
    assert link[link.index("--port") + 1] == "9999"
    assert link[link.index("--database") + 1].endswith("state/superlink.db")
    node = dep.supernodes[1].command()
    assert node[node.index("--superlink") + 1] == "127.0.0.1:7002"
    assert node[node.index("--node-config") + 1] == "partition-id=1 num-partitions=2"
    assert dep.serverapp_executor is not None
    assert dep.serverapp_executor.command()[-1] == "127.0.0.1:9999"
    env = dep.supernodes[0].env()
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["FLWR_HOME"].endswith("homes/supernode-0")
    fast = fr.FlowerDeployment.local(tmp_path, 1, fast_poll=0.2).supernodes[0].command()
    assert fast[1:5] == ["-m", "pqfed.services.flower_runtime", "exec", "--poll-cap"]


def test_stage_app_and_run_config_keys(tmp_path: Path) -> None:
    app = stage_mini_app(tmp_path / "app")
    defaults = fr.app_run_config_defaults(app)
    assert defaults["client-scale"] == 1.0 and defaults["num-server-rounds"] == 3
    shipped = fr.app_run_config_defaults(fr.FLOWER_APP_DIR)
    assert {"spec", "job", "state-dir", "identity-dir"} <= set(shipped)
    assert "client-scale" not in shipped
    with pytest.raises(ValueError, match="not-a-key"):
        fr.submit_run(app, {"not-a-key": 1}, "127.0.0.1:1", flwr_home=tmp_path / "h")


def test_shipped_app_builds_and_validates() -> None:
    """services/flower_app: components are import strings of installed modules (serverapp, clientapp)
    (validated like `flwr run` does: find_spec + AST scan); the FAB carries no code."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.config_utils import load_and_validate

    config, _ = load_and_validate(fr.FLOWER_APP_DIR / "pyproject.toml", check_module=True)
    components = config["tool"]["flwr"]["app"]["components"]
    assert components == {
        "serverapp": "pqfed.services.serverapp:server_app",
        "clientapp": "pqfed.services.clientapp:client_app",
    }
    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(fr.FLOWER_APP_DIR))).namelist()
    assert "pyproject.toml" in names
    assert not [n for n in names if n.endswith(".py")]


# --------------------------------------------------------------------------- deployment


@pytest.mark.slow
def test_deployment_through_relay(tmp_path: Path) -> None:
    """SuperLink + 3 SuperNodes dialing through a TCP relay, process isolation, 3 rounds;
    then a SuperLink restart on the same database still knows the finished run."""
    app = stage_mini_app(tmp_path / "app")
    link_port = fr.free_port()
    relay = TcpRelay(fr.LOCALHOST, link_port).start()
    dep = fr.FlowerDeployment.local(
        tmp_path / "run",
        NUM_NODES,
        superlink_port=link_port,
        fleet_addresses=[relay.address] * NUM_NODES,
        extra_pythonpath=[MINI_DIR],
    )
    try:
        dep.start()
        result = run_mini(dep, app, rounds=3, scale=1.5)
        check_result(result, rounds=3, scale=1.5)
        assert relay.connections >= NUM_NODES
        assert relay.bytes_up > 0 and relay.bytes_down > 0
        for node in dep.supernodes:  # node traffic went to the relay, not the SuperLink port
            assert f"--superlink {relay.address}" in node.proc.log_path.read_text()  # type: ignore[union-attr]
        print(f"\nprocess isolation via relay: rounds {[f'{r:.2f}' for r in result['round_s']]} s")

        dep.superlink.stop()
        dep.superlink.start()
        dep.superlink.wait_ready(60)
        status = fr.get_run_status(result["run_id"], dep.control_address)
        assert status.succeeded, status
    finally:
        dep.stop()
        relay.stop()
    for proc in dep.processes():
        assert not proc.running


@pytest.mark.slow
def test_warm_clientapp_zygote(tmp_path: Path) -> None:
    """The flwr-clientapp shim forks the task from the zygote with the shim's argv, stdio,
    cwd and env, and returns the task's exit code."""
    import subprocess

    node = fr.SuperNodeProcess(
        run_dir=tmp_path, index=0, superlink_address="127.0.0.1:1", runtime_port=1,
        warm_clientapp=True,
    )  # fmt: skip
    zyg = fr.ManagedProcess(
        "zygote",
        [sys.executable, "-m", "pqfed.services.flower_runtime", "zygote",
         "--socket", str(node.zygote_socket)],
        tmp_path / "zygote.log", node.env(), tmp_path,
    ).start()  # fmt: skip
    try:
        fr._wait_unix_socket(node.zygote_socket, 60, zyg)
        shim = node._shim_path()[0] / "flwr-clientapp"
        ok = subprocess.run(
            [shim, "--help"], check=False, capture_output=True, text=True, timeout=30
        )
        assert ok.returncode == 0 and "usage: flwr-clientapp" in ok.stdout
        bad = subprocess.run(
            [shim, "--no-such-flag"], check=False, capture_output=True, text=True, timeout=30
        )
        assert bad.returncode == 2 and "error:" in bad.stderr
    finally:
        zyg.stop()
    assert not zyg.running


@pytest.mark.slow
def test_round_overhead_by_isolation(tmp_path: Path) -> None:
    """Stock Flower launch vs ours (fast polls + warm ClientApp) give the same FedAvg result.
    Prints their round times; the measured comparison is `make bench-fl` (transport study)."""
    app = stage_mini_app(tmp_path / "app")
    fast = {"superexec_poll_interval": 0.1, "fast_poll": 0.1}
    modes: dict[str, dict[str, Any]] = {
        "subprocess (default)": {"isolation": "subprocess"},
        "process + fast_poll + warm_clientapp": {
            "isolation": "process",
            **fast,
            "warm_clientapp": True,
            "preload": ["mini", "httpcore"],
        },
    }
    report = []
    for i, (label, kwargs) in enumerate(modes.items()):
        dep = fr.FlowerDeployment.local(
            tmp_path / f"run{i}", NUM_NODES, extra_pythonpath=[MINI_DIR], **kwargs
        )
        with dep:
            result = run_mini(dep, app, rounds=3, scale=1.0)
        check_result(result, rounds=3, scale=1.0)
        rounds = result["round_s"]
        report.append(
            f"{label:40s} mean round {sum(rounds) / len(rounds):6.2f} s "
            f"(rounds {', '.join(f'{r:.2f}' for r in rounds)}; submit->finished "
            f"{result['wall_s']:.1f} s)"
        )
    print("\nFlower 1.42 round time, 3 nodes, 10-float FedAvg, train+evaluate per round:")
    print("\n".join(report))
