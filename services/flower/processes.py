"""Flower 1.42's long-lived processes as supervised OS processes: SuperLink, SuperExec and
SuperNode (+ its ClientApp SuperExec and warm ClientApp process).

Each takes one `FlowerTuning` (services/flower/settings.py). With a poll cap, a process runs
through ``python -m pqfed.services.flower exec`` (services/flower/launch.py), which installs
the patches of services/flower/patches.py before the flwr console script starts, and the
app processes a SuperExec spawns get the same through ``flwr-serverapp``/``flwr-clientapp``
shims first on its PATH. The SuperLink always runs through ``exec``: its uvicorn HTTP parser
is pinned (see `superlink_http_implementation`) and Flower node ids are bound to the PQC
channel's certificates.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
import zlib
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Self

from pqfed.services.flower.app_dir import ConfigValue, format_config_args
from pqfed.services.flower.environment import BIN_DIR, flower_env
from pqfed.services.flower.settings import FlowerTuning, IdleBackoff
from pqfed.services.flower.warm_clientapp import write_warm_clientapp_shim
from pqfed.services.ports import LOCALHOST
from pqfed.services.procs import ManagedProcess, wait_http_ok, wait_unix_socket

Isolation = Literal["process", "subprocess"]

#: ``python -m LAUNCHER exec|zygote ...`` (services/flower/__main__.py).
LAUNCHER = "pqfed.services.flower"
_STOCK = FlowerTuning()


def exec_argv(script: str, poll_cap: float | None, http: str | None = None, *,
              idle_backoff: IdleBackoff | None = None,
              superlink_middleware: str = "stock",
              long_poll_s: float | None = None) -> list[str]:
    """argv that runs a flwr console script, optionally with capped poll sleeps (and idle
    back-off), uvicorn's HTTP/1.1 implementation pinned (patches.UVICORN_HTTP_PIN) and the
    SuperLink's middlewares as pure ASGI (patches.SUPERLINK_ASGI_MIDDLEWARE), holding empty
    Fleet pulls up to ``long_poll_s`` (services/flower/longpoll.py)."""
    if poll_cap is None and http is None:
        return [str(BIN_DIR / script)]
    return [
        sys.executable, "-m", LAUNCHER, "exec",
        *(["--poll-cap", str(poll_cap)] if poll_cap is not None else []),
        *(["--idle-backoff", idle_backoff.to_arg()] if idle_backoff is not None else []),
        *(["--http", http] if http is not None else []),
        *(["--superlink-middleware", superlink_middleware]
          if superlink_middleware != "stock" else []),
        *(["--long-poll", str(long_poll_s)] if long_poll_s is not None else []),
        script, "--",
    ]  # fmt: skip


def superlink_http_implementation() -> str:
    """The HTTP/1.1 implementation the SuperLink's uvicorn must use: the one the sidecar's
    request filter (pqc/sidecar/httpfilter.py) was validated against."""
    from pqfed.pqc.sidecar.httpfilter import UPSTREAM_HTTP_IMPLEMENTATION

    return UPSTREAM_HTTP_IMPLEMENTATION


def write_fast_poll_shims(bin_dir: Path, poll_cap: float) -> Path:
    """Write ``flwr-serverapp``/``flwr-clientapp`` into ``bin_dir``: put it first on a
    SuperExec's PATH so the app processes it spawns run with capped polling/back-off."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("flwr-serverapp", "flwr-clientapp"):
        script = bin_dir / name
        argv = exec_argv(name, poll_cap)
        script.write_text(f'#!/bin/sh\nexec {shlex.join(argv)} "$@"\n', encoding="utf-8")
        script.chmod(0o755)
    return bin_dir


@dataclass
class FlowerProcess:
    """What the SuperLink, SuperExec and SuperNode processes share: the run directory their
    logs and shims go to, one `FlowerTuning`, the Flower environment (FLWR_HOME, PYTHONPATH,
    PATH shims, overrides) and the supervised OS process. A subclass says what differs: its
    `name` and `flwr_home`, its `command()` and the directories it puts first on PATH."""

    run_dir: Path
    _: KW_ONLY
    tuning: FlowerTuning = _STOCK
    extra_pythonpath: Sequence[Path | str] = ()
    env_overrides: dict[str, str] = field(default_factory=dict)
    proc: ManagedProcess | None = field(default=None, repr=False)

    if TYPE_CHECKING:  # a field in one subclass, a property in another
        @property
        def name(self) -> str: ...

        @property
        def flwr_home(self) -> Path: ...

    def command(self) -> list[str]:
        raise NotImplementedError

    def fast_poll_shims(self) -> list[Path]:
        """The `flwr-serverapp`/`flwr-clientapp` shims with the poll cap, when there is one."""
        cap = self.tuning.poll_cap
        return [] if cap is None else [write_fast_poll_shims(self.run_dir / "shims" / "fast", cap)]

    def path_shims(self) -> list[Path]:
        """Directories put first on the process's PATH (first wins)."""
        return self.fast_poll_shims()

    def env(self) -> dict[str, str]:
        env = flower_env(
            self.flwr_home,
            extra_pythonpath=self.extra_pythonpath,
            extra_path=self.path_shims(),
            superexec_poll_interval=self.tuning.superexec_poll_interval,
        )
        env.update(self.env_overrides)
        return env

    def launch(self, name: str, argv: list[str]) -> ManagedProcess:
        """Start `argv` supervised, in this process's home and environment, logging to
        ``run_dir/logs/<name>.log``."""
        log = self.run_dir / "logs" / f"{name}.log"
        return ManagedProcess(name, argv, log, self.env(), self.flwr_home).start()

    def start(self) -> Self:
        self.proc = self.launch(self.name, self.command())
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            self.proc.stop(timeout)


@dataclass
class SuperLinkProcess(FlowerProcess):
    """``flower-superlink``: Fleet + Control + Runtime API on one HTTP port."""

    port: int
    host: str = LOCALHOST
    isolation: Isolation = "process"
    #: SQLite state file (runs, nodes, FABs survive a restart). ``None`` -> in memory.
    database: Path | None = None
    name: str = "superlink"

    @property
    def address(self) -> str:
        """Fleet API = Control API = Runtime API address."""
        return f"{self.host}:{self.port}"

    @property
    def flwr_home(self) -> Path:
        return self.run_dir / "homes" / self.name

    def command(self) -> list[str]:
        cmd = [
            *exec_argv("flower-superlink", self.tuning.poll_cap,
                       http=superlink_http_implementation(),
                       superlink_middleware=self.tuning.superlink_middleware,
                       long_poll_s=self.tuning.long_poll_s),
            "--insecure",
            "--isolation", self.isolation,
            "--disable-runtime-dependency-installation",
            "--host", self.host, "--port", str(self.port),
        ]  # fmt: skip
        if self.database is not None:
            cmd += ["--database", str(self.database)]
        return cmd

    def path_shims(self) -> list[Path]:
        # In-process isolation runs the ServerApp inside the SuperLink: no app process to shim.
        return self.fast_poll_shims() if self.isolation == "subprocess" else []

    def start(self) -> Self:
        if self.database is not None:
            self.database.parent.mkdir(parents=True, exist_ok=True)
        return super().start()

    def wait_ready(self, timeout: float = 60.0) -> None:
        wait_http_ok(f"http://{self.address}/health", timeout, self.proc)


@dataclass
class SuperExecProcess(FlowerProcess):
    """``flower-superexec``: the long-lived launcher of ServerApp (against the SuperLink's
    Runtime API) or ClientApp (against a SuperNode's Runtime API) processes."""

    name: str
    runtime_api_address: str
    flwr_home: Path
    #: Directories put first on PATH (shims replacing `flwr-serverapp`/`flwr-clientapp`).
    extra_path: Sequence[Path] = ()

    def command(self) -> list[str]:
        return [
            str(BIN_DIR / "flower-superexec"), "--insecure",
            "--runtime-api-address", self.runtime_api_address,
        ]  # fmt: skip

    def path_shims(self) -> list[Path]:
        return [*self.extra_path, *self.fast_poll_shims()]


@dataclass
class SuperNodeProcess(FlowerProcess):
    """``flower-supernode`` (+ its ClientApp SuperExec when ``isolation == 'process'``, + the
    warm ClientApp process when ``tuning.warm_clientapp``).

    ``superlink_address`` is the Fleet API address the node dials. It may be a plain TCP relay
    (e.g. the PQC sidecar) in front of the SuperLink port: the Fleet protocol is
    protobuf-over-HTTP/1.1 to ``http://<that address>/v1/fleet/...`` and node auth signs only a
    timestamp, so nothing breaks when the bytes are relayed.
    """

    index: int
    superlink_address: str
    runtime_port: int
    node_config: dict[str, ConfigValue] = field(default_factory=dict)
    host: str = LOCALHOST
    isolation: Isolation = "process"
    max_retries: int | None = None
    max_wait_time: float | None = None
    executor: SuperExecProcess | None = field(default=None, repr=False)
    zygote: ManagedProcess | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return f"supernode-{self.index}"

    @property
    def runtime_api_address(self) -> str:
        """The node's ClientApp Runtime API (what `flwr-clientapp`/SuperExec connect to)."""
        return f"{self.host}:{self.runtime_port}"

    @property
    def flwr_home(self) -> Path:
        return self.run_dir / "homes" / self.name

    def command(self) -> list[str]:
        cmd = exec_argv("flower-supernode", self.tuning.poll_cap,
                        idle_backoff=self.tuning.idle_backoff)
        cmd += [
            "--insecure",
            "--isolation", self.isolation,
            "--superlink", self.superlink_address,
            "--host", self.host, "--port", str(self.runtime_port),
        ]  # fmt: skip
        if self.node_config:
            cmd += ["--node-config", format_config_args(self.node_config)]
        if self.max_retries is not None:
            cmd += ["--max-retries", str(self.max_retries)]
        if self.max_wait_time is not None:
            cmd += ["--max-wait-time", str(self.max_wait_time)]
        return cmd

    @property
    def zygote_socket(self) -> Path:
        path = self.run_dir / "sock" / f"clientapp-{self.index}.sock"
        if len(str(path)) > 100:  # AF_UNIX path limit (108 bytes on Linux)
            digest = zlib.crc32(str(self.run_dir).encode())
            path = Path("/tmp") / f"pqfed-{digest}-clientapp-{self.index}.sock"  # noqa: S108
        return path

    def zygote_command(self) -> list[str]:
        """The warm ClientApp process (services/flower/warm_clientapp.py)."""
        argv = [sys.executable, "-m", LAUNCHER, "zygote", "--socket", str(self.zygote_socket)]
        for module in self.tuning.preload:
            argv += ["--preload", module]
        if self.tuning.poll_cap is not None:
            argv += ["--poll-cap", str(self.tuning.poll_cap)]
        return argv

    def path_shims(self) -> list[Path]:
        """PATH entries for the SuperExec that spawns this node's ClientApps (first wins; with
        subprocess isolation, the SuperNode's own SuperExec)."""
        dirs = []
        if self.tuning.warm_clientapp:
            shim_dir = self.run_dir / "shims" / f"clientapp-{self.index}"
            dirs.append(write_warm_clientapp_shim(shim_dir, self.zygote_socket))
        return [*dirs, *self.fast_poll_shims()]

    def start(self, timeout: float = 60.0) -> Self:
        if self.tuning.warm_clientapp:
            self.zygote_socket.parent.mkdir(parents=True, exist_ok=True)
            self.zygote = self.launch(f"clientapp-zygote-{self.index}", self.zygote_command())
            wait_unix_socket(self.zygote_socket, timeout, self.zygote)
        super().start()
        if self.isolation == "process":
            self.executor = SuperExecProcess(
                run_dir=self.run_dir,
                name=f"clientapp-superexec-{self.index}",
                runtime_api_address=self.runtime_api_address,
                flwr_home=self.flwr_home,  # same home: FABs install where the node expects
                # the shims below already carry the poll cap: no second shim dir
                tuning=FlowerTuning(superexec_poll_interval=self.tuning.superexec_poll_interval),
                extra_pythonpath=self.extra_pythonpath,
                env_overrides=self.env_overrides,
                extra_path=self.path_shims(),
            ).start()
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Runtime API is up (registration with the SuperLink is checked by wait_nodes)."""
        wait_http_ok(f"http://{self.runtime_api_address}/health", timeout, self.proc)

    def stop(self, timeout: float = 10.0) -> None:
        if self.executor is not None:
            self.executor.stop(timeout)
        if self.proc is not None:
            self.proc.stop(timeout)
        if self.zygote is not None:
            self.zygote.stop(timeout)
            with contextlib.suppress(FileNotFoundError):
                self.zygote_socket.unlink()
