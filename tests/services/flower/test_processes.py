"""The command lines and environments of the Flower processes (nothing is started here)."""

from __future__ import annotations

import sys
from pathlib import Path

from pqfed.services import flower as fr
from pqfed.services.flower.processes import LAUNCHER


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
    assert node[0].endswith("flower-supernode")  # stock: the console script itself
    assert dep.serverapp_executor is not None
    assert dep.serverapp_executor.command()[-1] == "127.0.0.1:9999"
    env = dep.supernodes[0].env()
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["FLWR_HOME"].endswith("homes/supernode-0")
    assert "FLWR_SUPEREXEC_TASK_POLL_INTERVAL" not in env


def test_tuning_reaches_every_process(tmp_path: Path) -> None:
    """One FlowerTuning given to the deployment shapes the SuperLink, the SuperNodes (their
    launch, shims and warm ClientApp process) and the ServerApp SuperExec."""
    tuning = fr.FlowerTuning.fast(0.2, preload=("json",))
    dep = fr.FlowerDeployment.local(tmp_path, 1, tuning=tuning)
    node = dep.supernodes[0]
    assert node.command()[:5] == [sys.executable, "-m", LAUNCHER, "exec", "--poll-cap"]
    assert LAUNCHER == "pqfed.services.flower"
    zygote = node.zygote_command()
    assert zygote[1:4] == ["-m", LAUNCHER, "zygote"]
    assert zygote[zygote.index("--preload") + 1] == "json"
    assert zygote[zygote.index("--poll-cap") + 1] == "0.2"
    env = node.env()
    assert env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "0.2"
    shims = [Path(p) for p in env["PATH"].split(":")[:2]]
    assert (shims[0] / "flwr-clientapp").read_text().count(str(node.zygote_socket)) == 1
    assert "--poll-cap 0.2" in (shims[1] / "flwr-serverapp").read_text()
    link = dep.superlink.command()
    assert link[link.index("--poll-cap") + 1] == "0.2"
    executor = dep.serverapp_executor
    assert executor is not None and not executor.tuning.warm_clientapp
    assert executor.env()["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "0.2"


def test_long_run_dir_moves_the_zygote_socket(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    node = fr.SuperNodeProcess(deep, 3, "127.0.0.1:1", 1)
    assert len(str(node.zygote_socket)) <= 100
    assert node.zygote_socket.name.endswith("clientapp-3.sock")
