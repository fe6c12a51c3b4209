"""`FlowerDeployment`: SuperLink + ServerApp SuperExec + N SuperNodes on one host, started in
dependency order, stopped as a whole; what the tests and the round-time benchmark run."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from pqfed.services.flower.app_dir import ConfigValue
from pqfed.services.flower.control import (
    RunStatus,
    fetch_run_logs,
    submit_run,
    wait_nodes,
    wait_run,
)
from pqfed.services.flower.processes import (
    Isolation,
    SuperExecProcess,
    SuperLinkProcess,
    SuperNodeProcess,
)
from pqfed.services.flower.settings import FlowerTuning
from pqfed.services.ports import free_ports
from pqfed.services.procs import ManagedProcess


def _partition_config(index: int, count: int) -> dict[str, ConfigValue]:
    return {"partition-id": index, "num-partitions": count}


@dataclass
class FlowerDeployment:
    """SuperLink + ServerApp SuperExec + N SuperNodes (+ ClientApp SuperExecs) on one host.

    ``fleet_addresses[i]`` overrides the Fleet address SuperNode ``i`` dials (e.g. a PQC
    sidecar/relay listening on 127.0.0.1:X that forwards to ``superlink.address``).
    """

    run_dir: Path
    superlink: SuperLinkProcess
    supernodes: list[SuperNodeProcess]
    serverapp_executor: SuperExecProcess | None = None

    @classmethod
    def local(
        cls,
        run_dir: Path,
        num_nodes: int,
        *,
        tuning: FlowerTuning = FlowerTuning(),  # noqa: B008 (frozen: one shared default)
        isolation: Isolation = "process",
        superlink_port: int | None = None,
        node_runtime_ports: Sequence[int] | None = None,
        fleet_addresses: Sequence[str] | None = None,
        node_config: Callable[[int, int], dict[str, ConfigValue]] | None = None,
        persist_state: bool = True,
        extra_pythonpath: Sequence[Path | str] = (),
    ) -> FlowerDeployment:
        run_dir = Path(run_dir).resolve()
        ports = free_ports(num_nodes + 1)
        link_port = superlink_port or ports[0]
        rt_ports = list(node_runtime_ports or ports[1:])
        superlink = SuperLinkProcess(
            run_dir=run_dir,
            port=link_port,
            isolation=isolation,
            database=run_dir / "state" / "superlink.db" if persist_state else None,
            tuning=tuning,
            extra_pythonpath=extra_pythonpath,
        )
        make_cfg = node_config or _partition_config
        nodes = [
            SuperNodeProcess(
                run_dir=run_dir,
                index=i,
                superlink_address=fleet_addresses[i] if fleet_addresses else superlink.address,
                runtime_port=rt_ports[i],
                node_config=make_cfg(i, num_nodes),
                isolation=isolation,
                tuning=tuning,
                extra_pythonpath=extra_pythonpath,
            )
            for i in range(num_nodes)
        ]
        executor = None
        if isolation == "process":
            executor = SuperExecProcess(
                run_dir=run_dir,
                name="serverapp-superexec",
                runtime_api_address=superlink.address,
                flwr_home=run_dir / "homes" / "serverapp",
                # the ServerApp process has no warm variant
                tuning=tuning.replace(warm_clientapp=False, preload=()),
                extra_pythonpath=extra_pythonpath,
            )
        return cls(run_dir, superlink, nodes, executor)

    @property
    def control_address(self) -> str:
        return self.superlink.address

    @property
    def cli_home(self) -> Path:
        return self.run_dir / "homes" / "cli"

    def processes(self) -> list[ManagedProcess]:
        procs = [self.superlink.proc]
        if self.serverapp_executor is not None:
            procs.append(self.serverapp_executor.proc)
        for node in self.supernodes:
            procs += [node.proc, node.executor.proc if node.executor else None, node.zygote]
        return [p for p in procs if p is not None]

    def start(self, timeout: float = 90.0) -> Self:
        """Start in dependency order and wait until all SuperNodes are online."""
        try:
            self.superlink.start()
            self.superlink.wait_ready(timeout)
            if self.serverapp_executor is not None:
                self.serverapp_executor.start()
            for node in self.supernodes:
                node.start()
            for node in self.supernodes:
                node.wait_ready(timeout)
            wait_nodes(self.control_address, len(self.supernodes), timeout, self.processes())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        for node in reversed(self.supernodes):
            node.stop(timeout)
        if self.serverapp_executor is not None:
            self.serverapp_executor.stop(timeout)
        self.superlink.stop(timeout)

    def submit(
        self,
        app_dir: Path,
        run_config: Mapping[str, ConfigValue],
        extra_pythonpath: Sequence[Path | str] = (),
    ) -> int:
        return submit_run(
            app_dir,
            run_config,
            self.control_address,
            flwr_home=self.cli_home,
            extra_pythonpath=extra_pythonpath or self.superlink.extra_pythonpath,
            log_path=self.run_dir / "logs" / "flwr-cli.log",
        )

    def wait(self, run_id: int, timeout: float) -> RunStatus:
        return wait_run(run_id, self.control_address, timeout, watch=self.processes())

    def run_logs(self, run_id: int) -> str:
        text = fetch_run_logs(run_id, self.control_address, flwr_home=self.cli_home)
        (self.run_dir / "logs" / f"serverapp-run-{run_id}.log").write_text(text, encoding="utf-8")
        return text

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
