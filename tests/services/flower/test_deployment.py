"""FlowerDeployment: SuperLink + SuperNodes + SuperExecs as OS processes, end to end.

The slow tests run the numpy stand-in app (tests/services/flower/minimal_app/mini.py): three
nodes, node i adds scale*(i+1) and weighs with i+1, so FedAvg moves the model by
scale*(1+4+9)/(1+2+3) per round.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pqfed.services import flower as fr
from pqfed.services.ports import LOCALHOST, free_port

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
        server = await asyncio.start_server(self._handle, LOCALHOST, 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()

    @property
    def address(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    def start(self) -> TcpRelay:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


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
    # Generous: a guard against a hung run, not a timing (stock Flower's 3 s polls and cold
    # ClientApps, on a host shared with other tests).
    status = dep.wait(run_id, timeout=120 + 90 * rounds)
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


# --------------------------------------------------------------------------- deployment


@pytest.mark.slow
def test_deployment_through_relay(tmp_path: Path, mini_app: Path, mini_dir: Path) -> None:
    """SuperLink + 3 SuperNodes dialing through a TCP relay, process isolation, 3 rounds;
    then a SuperLink restart on the same database still knows the finished run."""
    app = mini_app
    link_port = free_port()
    relay = TcpRelay(LOCALHOST, link_port).start()
    dep = fr.FlowerDeployment.local(
        tmp_path / "run",
        NUM_NODES,
        superlink_port=link_port,
        fleet_addresses=[relay.address] * NUM_NODES,
        extra_pythonpath=[mini_dir],
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
def test_round_overhead_by_isolation(tmp_path: Path, mini_app: Path, mini_dir: Path) -> None:
    """Stock Flower launch vs ours (fast polls + warm ClientApp) give the same FedAvg result.
    Prints their round times; the measured comparison is `make bench-fl` (transport study)."""
    app = mini_app
    modes: dict[str, tuple[fr.Isolation, fr.FlowerTuning]] = {
        "subprocess (default)": ("subprocess", fr.FlowerTuning()),
        "process + poll_cap + warm_clientapp": (
            "process", fr.FlowerTuning.fast(0.1, preload=("mini", "httpcore"))),
    }
    report = []
    for i, (label, (isolation, tuning)) in enumerate(modes.items()):
        dep = fr.FlowerDeployment.local(
            tmp_path / f"run{i}", NUM_NODES, extra_pythonpath=[mini_dir], isolation=isolation,
            tuning=tuning,
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
