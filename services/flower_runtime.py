"""Flower 1.42 deployment runtime on one machine: SuperLink, SuperNodes and app executors as
separate OS processes (the process layout of the Kubernetes pods), driven from Python.

Process recipe (Flower 1.42, everything on 127.0.0.1, explicit ports)::

    # 1. SuperLink: ONE HTTP port serves the Fleet, Control and Runtime (ServerApp) APIs.
    flower-superlink --insecure --isolation process --disable-runtime-dependency-installation \
        --host 127.0.0.1 --port $LINK --database $STATE/superlink.db
    #    (run as `python -m pqfed.services.flower_runtime exec --http httptools
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
``Grid.send_and_receive`` 3 s, object pulls back off 1 s doubling to 10 s). Two opt-ins:

* ``fast_poll=S`` (~6.5 s/round): SuperNode runs via ``python -m pqfed.services.flower_runtime
  exec``; ``flwr-serverapp``/``flwr-clientapp`` shims go first on the SuperExec's PATH; all cap
  those sleeps/back-offs at S seconds. The SuperNode's wait for its ClientApp's reply (and
  that reply's objects) also ends as soon as they are stored, and the SuperLink's SQL state
  sweeps expired task claims at most once a second instead of on nearly every request.
  Patches module attributes of the pinned flwr==1.42.0 and falls back to stock behaviour
  (with a warning) where they are missing.
* ``warm_clientapp=True`` (+ ``preload=[modules]``; with fast_poll ~2.4 s/round): a per-node
  zygote imports ``flwr-clientapp`` and the app once; the ``flwr-clientapp`` shim on the
  SuperExec's PATH hands argv/env/cwd/stdio to it over a unix socket and the zygote forks one
  pristine child per task (same per-message isolation as a fresh process, without the imports).
  Keep preloaded modules free of import-time thread pools (e.g. no torch ops at import).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

log = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
Isolation = Literal["process", "subprocess"]
ConfigValue = bool | int | float | str

#: The Flower App shipped with the package (components: pqfed.services.apps).
FLOWER_APP_DIR = Path(__file__).resolve().parent / "flower_app"
#: Name of the SuperLink connection written to each FLWR_HOME/config.toml.
DEFAULT_CONNECTION = "pqfed"

_BIN_DIR = Path(sys.executable).parent
_SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


# --------------------------------------------------------------------------- ports, env, config


def free_ports(count: int, host: str = LOCALHOST) -> list[int]:
    """Return ``count`` distinct currently-free TCP ports on ``host`` (all bound at once)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = LOCALHOST) -> int:
    return free_ports(1, host)[0]


def flower_env(
    flwr_home: Path,
    *,
    extra_pythonpath: Sequence[Path | str] = (),
    extra_path: Sequence[Path | str] = (),
    superexec_poll_interval: float | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Environment for every Flower process: isolated FLWR_HOME, no telemetry, no update check,
    no runtime ``uv sync``, proxies bypassed for loopback, this interpreter's bin dir first on
    PATH (SuperExec spawns ``flwr-serverapp``/``flwr-clientapp`` by bare name)."""
    env = dict(os.environ if base is None else base)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    no_proxy = ",".join(p for p in (env.get("NO_PROXY", ""), "127.0.0.1,localhost") if p)
    env["NO_PROXY"] = env["no_proxy"] = no_proxy
    env["PATH"] = os.pathsep.join(
        [*(str(p) for p in extra_path), str(_BIN_DIR), env.get("PATH", "")]
    ).rstrip(os.pathsep)
    if extra_pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(
            [*(str(p) for p in extra_pythonpath), env.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep)
    if superexec_poll_interval is not None:
        env[_SUPEREXEC_POLL_ENV] = str(superexec_poll_interval)
    return env


def _toml_value(value: ConfigValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if any(c in value for c in "\"'\\\n\r\t"):
        raise ValueError(f"config string {value!r} must not contain quotes/backslashes/newlines")
    return f'"{value}"'


def format_config_args(config: Mapping[str, ConfigValue]) -> str:
    """``{'partition-id': 0, 'data': 'x y'}`` -> ``partition-id=0 data="x y"`` (the syntax of
    ``--node-config`` and ``flwr run --run-config``)."""
    for key in config:
        if not key or any(c.isspace() or c in "=\"'" for c in key):
            raise ValueError(f"invalid config key {key!r}")
    return " ".join(f"{k}={_toml_value(v)}" for k, v in config.items())


def write_flower_config(
    flwr_home: Path,
    control_address: str,
    connection: str = DEFAULT_CONNECTION,
) -> Path:
    """Write ``FLWR_HOME/config.toml`` with one insecure SuperLink connection (the 1.42 place
    for what older releases put in ``[tool.flwr.federations]`` of the app's pyproject)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(
        f'[superlink]\ndefault = "{connection}"\n\n'
        f'[superlink.{connection}]\naddress = "{control_address}"\ninsecure = true\n',
        encoding="utf-8",
    )
    return path


def app_run_config_defaults(app_dir: Path) -> dict[str, Any]:
    """Flattened ``[tool.flwr.app.config]`` of a Flower App (the keys a run may override)."""
    with (app_dir / "pyproject.toml").open("rb") as f:
        cfg = tomllib.load(f)
    return _flatten(cfg.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}))


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, Mapping):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def stage_app_dir(
    dest: Path,
    *,
    src: Path = FLOWER_APP_DIR,
    serverapp: str | None = None,
    clientapp: str | None = None,
    config_defaults: Mapping[str, ConfigValue] | None = None,
) -> Path:
    """Copy a Flower App dir to ``dest``, optionally replacing the component import strings and
    adding/replacing run-config defaults (so a run may override keys the source lacks)."""
    import tomli_w

    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", ".flwr"))
    pyproject = dest / "pyproject.toml"
    with pyproject.open("rb") as f:
        cfg = tomllib.load(f)
    app = cfg.setdefault("tool", {}).setdefault("flwr", {}).setdefault("app", {})
    components = app.setdefault("components", {})
    if serverapp is not None:
        components["serverapp"] = serverapp
    if clientapp is not None:
        components["clientapp"] = clientapp
    if config_defaults:
        app.setdefault("config", {}).update(dict(config_defaults))
    pyproject.write_text(tomli_w.dumps(cfg), encoding="utf-8")
    return dest


# --------------------------------------------------------------------------- processes


def terminate_process_tree(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM ``pid``, its process group and all descendants; SIGKILL what survives."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=2.0)


@dataclass
class ManagedProcess:
    """One OS process in its own session, stdout+stderr appended to ``log_path``."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str]
    cwd: Path
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> Self:
        if self.running:
            raise RuntimeError(f"{self.name} already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.cwd.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as logf:
            logf.write(f"# {time.strftime('%H:%M:%S')} $ {shlex.join(self.argv)}\n".encode())
            logf.flush()
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        log.debug("started %s pid=%d", self.name, self.popen.pid)
        return self

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll() if self.popen else None

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            terminate_process_tree(self.popen.pid, timeout)
        else:  # leader gone: still sweep its session's group (e.g. orphaned app processes)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        try:
            return self.popen.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            return None

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        if not self.running:
            raise RuntimeError(
                f"{self.name} exited with {self.returncode}; log {self.log_path}:\n{self.tail()}"
            )


def _http_ok(url: str, timeout: float = 1.0) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            return 200 <= int(resp.status) < 300
    except (urllib.error.URLError, OSError):
        return False


def wait_http_ok(url: str, timeout: float, proc: ManagedProcess | None = None) -> None:
    """Poll ``url`` until it answers 2xx; fail fast if ``proc`` dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _http_ok(url):
            return
        if proc is not None:
            proc.check_alive()
        time.sleep(0.1)
    raise TimeoutError(f"{url} not healthy after {timeout:.0f}s")


def _python_exec_argv(script: str, fast_poll: float | None, http: str | None = None
                      ) -> list[str]:
    """argv that runs a flwr console script, optionally with capped poll sleeps and with
    uvicorn's HTTP/1.1 implementation pinned (see pin_uvicorn_http)."""
    if fast_poll is None and http is None:
        return [str(_BIN_DIR / script)]
    return [
        sys.executable, "-m", "pqfed.services.flower_runtime", "exec",
        *(["--poll-cap", str(fast_poll)] if fast_poll is not None else []),
        *(["--http", http] if http is not None else []),
        script, "--",
    ]  # fmt: skip


def superlink_http_implementation() -> str:
    """The HTTP/1.1 implementation the SuperLink's uvicorn must use: the one the sidecar's
    request filter (pqc/sidecar/httpfilter.py) was validated against."""
    from pqfed.pqc.sidecar.httpfilter import UPSTREAM_HTTP_IMPLEMENTATION

    return UPSTREAM_HTTP_IMPLEMENTATION


def pin_uvicorn_http(implementation: str) -> str:
    """Every ``uvicorn.Config`` made in this process from now on (flwr 1.42's
    ``flower-superlink`` calls ``uvicorn.run`` without ``http=``, so uvicorn's default "auto"
    would pick httptools or h11 by what is installed) uses ``implementation``; returns the
    patched name. A caller's explicit different choice is overridden, with a warning."""
    import uvicorn
    from uvicorn.config import HTTP_PROTOCOLS

    if implementation not in HTTP_PROTOCOLS or implementation == "auto":
        raise ValueError(f"--http {implementation!r}: choose one of "
                         f"{sorted(set(HTTP_PROTOCOLS) - {'auto'})}")
    init = uvicorn.Config.__init__
    original = getattr(init, "__pqfed_original__", init)

    @functools.wraps(original)
    def pinned(self: Any, *args: Any, **kwargs: Any) -> None:
        requested = kwargs.get("http", "auto")
        if requested not in ("auto", implementation):
            log.warning("uvicorn http=%r overridden: pinned to %r", requested, implementation)
        kwargs["http"] = implementation
        original(self, *args, **kwargs)

    pinned.__pqfed_original__ = original  # type: ignore[attr-defined]
    pinned.__pqfed_http__ = implementation  # type: ignore[attr-defined]
    uvicorn.Config.__init__ = pinned  # type: ignore[method-assign]
    return "uvicorn.Config.__init__"


def write_fast_poll_shims(bin_dir: Path, poll_cap: float) -> Path:
    """Write ``flwr-serverapp``/``flwr-clientapp`` into ``bin_dir``: put it first on a
    SuperExec's PATH so the app processes it spawns run with capped polling/back-off."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("flwr-serverapp", "flwr-clientapp"):
        script = bin_dir / name
        argv = _python_exec_argv(name, poll_cap)
        script.write_text(f'#!/bin/sh\nexec {shlex.join(argv)} "$@"\n', encoding="utf-8")
        script.chmod(0o755)
    return bin_dir


@dataclass
class SuperLinkProcess:
    """``flower-superlink``: Fleet + Control + Runtime API on one HTTP port."""

    run_dir: Path
    port: int
    host: str = LOCALHOST
    isolation: Isolation = "process"
    #: SQLite state file (runs, nodes, FABs survive a restart). ``None`` -> in memory.
    database: Path | None = None
    env_overrides: dict[str, str] = field(default_factory=dict)
    extra_pythonpath: Sequence[Path | str] = ()
    superexec_poll_interval: float | None = None
    fast_poll: float | None = None
    name: str = "superlink"
    proc: ManagedProcess | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        """Fleet API = Control API = Runtime API address."""
        return f"{self.host}:{self.port}"

    @property
    def flwr_home(self) -> Path:
        return self.run_dir / "homes" / self.name

    def command(self) -> list[str]:
        cmd = [
            *_python_exec_argv("flower-superlink", self.fast_poll,
                               http=superlink_http_implementation()),
            "--insecure",
            "--isolation", self.isolation,
            "--disable-runtime-dependency-installation",
            "--host", self.host, "--port", str(self.port),
        ]  # fmt: skip
        if self.database is not None:
            cmd += ["--database", str(self.database)]
        return cmd

    def env(self) -> dict[str, str]:
        shims: list[Path] = []
        if self.fast_poll is not None and self.isolation == "subprocess":
            shims.append(write_fast_poll_shims(self.run_dir / "shims" / "fast", self.fast_poll))
        env = flower_env(
            self.flwr_home,
            extra_pythonpath=self.extra_pythonpath,
            extra_path=shims,
            superexec_poll_interval=self.superexec_poll_interval,
        )
        env.update(self.env_overrides)
        return env

    def start(self) -> Self:
        if self.database is not None:
            self.database.parent.mkdir(parents=True, exist_ok=True)
        self.proc = ManagedProcess(
            self.name, self.command(), self.run_dir / "logs" / f"{self.name}.log",
            self.env(), self.flwr_home,
        ).start()  # fmt: skip
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        wait_http_ok(f"http://{self.address}/health", timeout, self.proc)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            self.proc.stop(timeout)


@dataclass
class SuperExecProcess:
    """``flower-superexec``: the long-lived launcher of ServerApp (against the SuperLink's
    Runtime API) or ClientApp (against a SuperNode's Runtime API) processes."""

    run_dir: Path
    name: str
    runtime_api_address: str
    flwr_home: Path
    extra_pythonpath: Sequence[Path | str] = ()
    poll_interval: float | None = None
    fast_poll: float | None = None
    env_overrides: dict[str, str] = field(default_factory=dict)
    #: Directories put first on PATH (shims replacing `flwr-serverapp`/`flwr-clientapp`).
    extra_path: Sequence[Path] = ()
    proc: ManagedProcess | None = field(default=None, repr=False)

    def command(self) -> list[str]:
        return [
            str(_BIN_DIR / "flower-superexec"), "--insecure",
            "--runtime-api-address", self.runtime_api_address,
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        shims = list(self.extra_path)
        if self.fast_poll is not None:
            shims.append(write_fast_poll_shims(self.run_dir / "shims" / "fast", self.fast_poll))
        env = flower_env(
            self.flwr_home,
            extra_pythonpath=self.extra_pythonpath,
            extra_path=shims,
            superexec_poll_interval=self.poll_interval,
        )
        env.update(self.env_overrides)
        return env

    def start(self) -> Self:
        self.proc = ManagedProcess(
            self.name, self.command(), self.run_dir / "logs" / f"{self.name}.log",
            self.env(), self.flwr_home,
        ).start()  # fmt: skip
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            self.proc.stop(timeout)


@dataclass
class SuperNodeProcess:
    """``flower-supernode`` (+ its ClientApp SuperExec when ``isolation == 'process'``).

    ``superlink_address`` is the Fleet API address the node dials. It may be a plain TCP relay
    (e.g. the PQC sidecar) in front of the SuperLink port: the Fleet protocol is
    protobuf-over-HTTP/1.1 to ``http://<that address>/v1/fleet/...`` and node auth signs only a
    timestamp, so nothing breaks when the bytes are relayed.
    """

    run_dir: Path
    index: int
    superlink_address: str
    runtime_port: int
    node_config: dict[str, ConfigValue] = field(default_factory=dict)
    host: str = LOCALHOST
    isolation: Isolation = "process"
    extra_pythonpath: Sequence[Path | str] = ()
    superexec_poll_interval: float | None = None
    fast_poll: float | None = None
    max_retries: int | None = None
    max_wait_time: float | None = None
    #: Fork each ClientApp task from a warm zygote (imports done once) instead of a cold
    #: `flwr-clientapp` interpreter; ``preload`` = extra modules to import into the zygote.
    warm_clientapp: bool = False
    preload: Sequence[str] = ()
    env_overrides: dict[str, str] = field(default_factory=dict)
    proc: ManagedProcess | None = field(default=None, repr=False)
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
        cmd = _python_exec_argv("flower-supernode", self.fast_poll)
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

    def _shim_path(self) -> list[Path]:
        """PATH entries for the SuperExec that spawns this node's ClientApps (first wins)."""
        dirs = []
        if self.warm_clientapp:
            shim_dir = self.run_dir / "shims" / f"clientapp-{self.index}"
            dirs.append(write_warm_clientapp_shim(shim_dir, self.zygote_socket))
        if self.fast_poll is not None:
            dirs.append(write_fast_poll_shims(self.run_dir / "shims" / "fast", self.fast_poll))
        return dirs

    def env(self) -> dict[str, str]:
        env = flower_env(
            self.flwr_home,
            extra_pythonpath=self.extra_pythonpath,
            extra_path=self._shim_path(),  # subprocess isolation: SuperNode's own SuperExec
            superexec_poll_interval=self.superexec_poll_interval,
        )
        env.update(self.env_overrides)
        return env

    def start(self, timeout: float = 60.0) -> Self:
        if self.warm_clientapp:
            self.zygote_socket.parent.mkdir(parents=True, exist_ok=True)
            argv = [
                sys.executable, "-m", "pqfed.services.flower_runtime", "zygote",
                "--socket", str(self.zygote_socket),
            ]  # fmt: skip
            for module in self.preload:
                argv += ["--preload", module]
            if self.fast_poll is not None:
                argv += ["--poll-cap", str(self.fast_poll)]
            self.zygote = ManagedProcess(
                f"clientapp-zygote-{self.index}", argv,
                self.run_dir / "logs" / f"clientapp-zygote-{self.index}.log",
                self.env(), self.flwr_home,
            ).start()  # fmt: skip
            _wait_unix_socket(self.zygote_socket, timeout, self.zygote)
        self.proc = ManagedProcess(
            self.name, self.command(), self.run_dir / "logs" / f"{self.name}.log",
            self.env(), self.flwr_home,
        ).start()  # fmt: skip
        if self.isolation == "process":
            self.executor = SuperExecProcess(
                run_dir=self.run_dir,
                name=f"clientapp-superexec-{self.index}",
                runtime_api_address=self.runtime_api_address,
                flwr_home=self.flwr_home,  # same home: FABs install where the node expects
                extra_pythonpath=self.extra_pythonpath,
                poll_interval=self.superexec_poll_interval,
                env_overrides=self.env_overrides,
                extra_path=self._shim_path(),
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


def _wait_unix_socket(path: Path, timeout: float, proc: ManagedProcess) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(path))
                return
            except OSError:
                pass
        proc.check_alive()
        time.sleep(0.05)
    raise TimeoutError(f"{proc.name}: {path} not accepting after {timeout:.0f}s")


# --------------------------------------------------------------------------- Control API


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


def _control_client(control_address: str) -> Any:
    from flwr.supercore.control.control_http_client import ControlHttpClient

    # httpx honours HTTP(S)_PROXY; never route loopback Control API calls through a proxy.
    for var in ("NO_PROXY", "no_proxy"):
        entries = [e for e in os.environ.get(var, "").split(",") if e]
        if LOCALHOST not in entries:
            os.environ[var] = ",".join([*entries, LOCALHOST, "localhost"])

    return ControlHttpClient.from_server_address(control_address, True, None, [])


def get_run_status(run_id: int, control_address: str) -> RunStatus:
    from flwr.proto.control_pb2 import ListRunsRequest

    client = _control_client(control_address)
    try:
        res = client.ListRuns(ListRunsRequest(run_id=run_id))
    finally:
        client.close()
    if run_id not in res.run_dict:
        raise KeyError(f"run {run_id} unknown to SuperLink {control_address}")
    st = res.run_dict[run_id].status
    return RunStatus(run_id, str(st.status), str(st.sub_status), str(st.details))


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
    while True:
        status = get_run_status(run_id, control_address)
        if status.finished:
            return status
        for proc in watch:
            proc.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} not finished after {timeout:.0f}s: {status}")
        time.sleep(poll)


def stop_run(run_id: int, control_address: str) -> bool:
    from flwr.proto.control_pb2 import StopRunRequest

    client = _control_client(control_address)
    try:
        return bool(client.StopRun(StopRunRequest(run_id=run_id)).success)
    finally:
        client.close()


def list_nodes(control_address: str) -> dict[int, str]:
    """node_id -> status (``online``/``offline``/...)."""
    from flwr.proto.control_pb2 import ListNodesRequest

    client = _control_client(control_address)
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
    deadline = time.monotonic() + timeout
    while True:
        online = [nid for nid, st in list_nodes(control_address).items() if st == "online"]
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
    cmd = [str(_BIN_DIR / "flwr"), "run", str(app_dir), connection, "--format", "json"]
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
        [str(_BIN_DIR / "flwr"), "log", str(run_id), connection, "--show"],
        capture_output=True, text=True, env=flower_env(flwr_home), cwd=flwr_home,
        timeout=timeout, check=False,
    )  # fmt: skip
    return res.stdout + res.stderr


# --------------------------------------------------------------------------- whole deployment


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
        isolation: Isolation = "process",
        superlink_port: int | None = None,
        node_runtime_ports: Sequence[int] | None = None,
        fleet_addresses: Sequence[str] | None = None,
        node_config: Callable[[int, int], dict[str, ConfigValue]] | None = None,
        persist_state: bool = True,
        extra_pythonpath: Sequence[Path | str] = (),
        superexec_poll_interval: float | None = None,
        fast_poll: float | None = None,
        warm_clientapp: bool = False,
        preload: Sequence[str] = (),
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
            extra_pythonpath=extra_pythonpath,
            superexec_poll_interval=superexec_poll_interval,
            fast_poll=fast_poll,
        )
        make_cfg = node_config or (lambda i, n: {"partition-id": i, "num-partitions": n})
        nodes = [
            SuperNodeProcess(
                run_dir=run_dir,
                index=i,
                superlink_address=fleet_addresses[i] if fleet_addresses else superlink.address,
                runtime_port=rt_ports[i],
                node_config=make_cfg(i, num_nodes),
                isolation=isolation,
                extra_pythonpath=extra_pythonpath,
                superexec_poll_interval=superexec_poll_interval,
                fast_poll=fast_poll,
                warm_clientapp=warm_clientapp,
                preload=preload,
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
                extra_pythonpath=extra_pythonpath,
                poll_interval=superexec_poll_interval,
                fast_poll=fast_poll,
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


# --------------------------------------------------------------------------- fast-poll exec


class _CappedTime:
    """Stand-in for a module's ``time`` with ``sleep`` capped at ``cap`` seconds."""

    def __init__(self, cap: float) -> None:
        self._cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self._cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


class _WakeableTime(_CappedTime):
    """``_CappedTime`` whose ``sleep`` also ends as soon as ``wakeup`` is set.

    The SuperNode's Fleet loop sleeps while it waits for the ClientApp's reply and for that
    reply's objects; both arrive through the node's Runtime API (another thread of the same
    process), which sets ``wakeup`` when it stores them. The cap stays as a fallback.
    """

    def __init__(self, cap: float, wakeup: threading.Event) -> None:
        super().__init__(cap)
        self._wakeup = wakeup

    def sleep(self, seconds: float) -> None:
        self._wakeup.wait(min(seconds, self._cap))
        self._wakeup.clear()


#: Set whenever this process's SuperNode state stores a message or an object.
_NODE_WAKEUP = threading.Event()

_POLL_PATCHES: dict[str, dict[str, str]] = {
    # module -> {attribute: kind}; kind "module" replaces `time`, "func" replaces `sleep`,
    # "wake" replaces `time` with one whose sleep also ends on _NODE_WAKEUP
    # idle 3 s; waiting 0.5 s for the ClientApp's reply and for each of its objects
    "flwr.supernode.start_client_internal": {"time": "wake"},
    "flwr.superlink.grid.http_grid": {"time": "module"},  # send_and_receive 3 s
    "flwr.serverapp.strategy.strategy_utils": {"sleep": "func"},  # waiting for nodes 1 s
    # Long-poll intervals of the Runtime API routers (SuperLink, SuperNode) and of a task's
    # wait for its reply: 0.25 s each, several per message hop.
    "flwr.supercore.routers.runtime.responses": {"_POLL_INTERVAL": "value"},
    "flwr.supercore.task_process.agent.session": {"_DEFAULT_TASK_REPLY_POLL_INTERVAL": "value"},
}

#: Methods whose completion wakes the SuperNode's Fleet loop (see _WakeableTime).
_NODE_WAKE_HOOKS = (
    ("flwr.supernode.nodestate.in_memory_nodestate", "InMemoryNodeState", "store_message"),
    ("flwr.supercore.object_store.in_memory_object_store", "InMemoryObjectStore", "put"),
)

# Object pulls (ClientApp <- SuperNode, SuperNode <- SuperLink, ServerApp <- SuperLink) retry
# an object that is not there yet after 1 s, doubling up to 10 s; the defaults are bound at
# definition time, so they are patched on the function objects.
_PULL_FUNCS = ("pull_objects", "pull_and_inflate_object_from_tree")

# The SQL state of the SuperLink sweeps expired task claims (one UPDATE + commit) at the
# start of nearly every request: ~17% of its CPU in a 3-node round, measured with py-spy.
# Token checks compare `active_until` themselves, so sweeping at most this often only delays
# when an expired claim is requeued or failed.
_TOKEN_SWEEP_INTERVAL_S = 1.0
_TOKEN_SWEEPS = (
    ("flwr.supercore.corestate.sql_corestate", "SqlCoreState", "_cleanup_expired_task_tokens"),
)


def _after(fn: Callable[..., Any], hook: Callable[[], None]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        finally:
            hook()

    return wrapper


def _throttled(fn: Callable[..., Any], interval: float) -> Callable[..., Any]:
    """``fn(self)`` runs at most once per ``interval`` seconds per instance."""
    last: dict[int, float] = {}

    @functools.wraps(fn)
    def wrapper(self: Any) -> Any:
        now = time.monotonic()
        if now - last.get(id(self), -interval) < interval:
            return None
        last[id(self)] = now
        return fn(self)

    return wrapper


def _patch_method(mod_name: str, cls_name: str, attr: str,
                  wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> str | None:
    import importlib

    try:
        cls = getattr(importlib.import_module(mod_name), cls_name)
    except (ImportError, AttributeError):
        log.warning("fast_poll: %s.%s missing; leaving it stock", mod_name, cls_name)
        return None
    fn = cls.__dict__.get(attr)
    if not callable(fn):
        log.warning("fast_poll: %s.%s.%s missing; leaving it stock", mod_name, cls_name, attr)
        return None
    if getattr(fn, "__pqfed_patched__", False):
        return f"{mod_name}.{cls_name}.{attr}"
    patched = wrap(fn)
    patched.__pqfed_patched__ = True  # type: ignore[attr-defined]
    setattr(cls, attr, patched)
    return f"{mod_name}.{cls_name}.{attr}"


def install_fast_poll(cap: float) -> list[str]:
    """Cap the hard-coded poll sleeps and pull back-offs of flwr 1.42 in this process, wake
    the SuperNode's reply wait on arrival and throttle the SuperLink's expired-token sweep;
    return what was patched."""
    import importlib

    patched = []
    for mod_name, attrs in _POLL_PATCHES.items():
        try:
            mod: Any = importlib.import_module(mod_name)
        except ImportError:
            continue
        for attr, kind in attrs.items():
            if not hasattr(mod, attr):
                log.warning("fast_poll: %s.%s missing; leaving stock polling", mod_name, attr)
                continue
            if kind == "value":
                setattr(mod, attr, min(float(getattr(mod, attr)), cap))
            elif kind == "wake":
                setattr(mod, attr, _WakeableTime(cap, _NODE_WAKEUP))
            else:
                capped = _CappedTime(cap)
                setattr(mod, attr, capped if kind == "module" else capped.sleep)
            patched.append(f"{mod_name}.{attr}")
    for mod_name, cls_name, attr in _NODE_WAKE_HOOKS:
        name = _patch_method(mod_name, cls_name, attr, lambda f: _after(f, _NODE_WAKEUP.set))
        patched += [name] if name else []
    for mod_name, cls_name, attr in _TOKEN_SWEEPS:
        name = _patch_method(mod_name, cls_name, attr,
                             lambda f: _throttled(f, _TOKEN_SWEEP_INTERVAL_S))
        patched += [name] if name else []
    utils: Any = importlib.import_module("flwr.supercore.inflatable.inflatable_utils")
    for name in _PULL_FUNCS:
        defaults = getattr(getattr(utils, name, None), "__kwdefaults__", None) or {}
        if {"initial_backoff", "backoff_cap", "max_tries_per_object"} <= set(defaults):
            # Same overall patience (max_time, 2 h by default), retries every `cap`: an object
            # is usually missing only because its sender is still pushing it, and a 0.5 s
            # back-off then cost up to ~0.4 s per hop (ClientApp <- SuperNode, measured).
            defaults.update(initial_backoff=cap, backoff_cap=cap, max_tries_per_object=None)
            patched.append(f"{utils.__name__}.{name}")
        else:
            log.warning("fast_poll: %s signature changed; leaving stock back-off", name)
    return patched


def _console_script(name: str) -> Callable[[], Any]:
    from importlib.metadata import entry_points

    for ep in entry_points(group="console_scripts", name=name):
        fn: Callable[[], Any] = ep.load()
        return fn
    raise SystemExit(f"console script {name!r} not installed")


# --------------------------------------------------------------------------- warm ClientApp

# The `flwr-clientapp` shim: stdlib only (runs with `python -I -S`), hands argv, env, cwd and
# its stdio fds to the zygote, then mirrors the forked task's exit code.
_ZYGOTE_SHIM = r"""
import json, os, socket, struct, sys, time
sock_path = sys.argv[1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
deadline = time.monotonic() + 60
while True:
    try:
        s.connect(sock_path)
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.stderr.write("flwr-clientapp shim: zygote %s unreachable\n" % sock_path)
            os._exit(1)
        time.sleep(0.05)
body = json.dumps({"argv": sys.argv[2:], "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
socket.send_fds(s, [struct.pack("!I", len(body))], [0, 1, 2])
s.sendall(body)
data = b""
while len(data) < 4:
    chunk = s.recv(4 - len(data))
    if not chunk:
        os._exit(1)
    data += chunk
os._exit(struct.unpack("!i", data)[0])
"""


def write_warm_clientapp_shim(bin_dir: Path, socket_path: Path) -> Path:
    """Write a ``flwr-clientapp`` into ``bin_dir`` that forks the task from a warm zygote."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "flwr-clientapp"
    argv = [sys.executable, "-I", "-S", "-c", _ZYGOTE_SHIM, str(socket_path)]
    script.write_text(f'#!/bin/sh\nexec {shlex.join(argv)} "$@"\n', encoding="utf-8")
    script.chmod(0o755)
    return bin_dir


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    buf = b""
    while len(buf) < size:
        chunk = conn.recv(size - len(buf))
        if not chunk:
            raise ConnectionError("shim closed the connection")
        buf += chunk
    return buf


def _zygote_child(fn: Callable[[], Any], script: str, req: dict[str, Any], fds: list[int]) -> int:
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
    for fd in fds:
        os.close(fd)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    sys.argv = [script, *req["argv"]]
    try:
        result = fn()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # the task must never fall back into the zygote loop
        import traceback

        traceback.print_exc()
        return 1
    return result if isinstance(result, int) else 0


def run_zygote(
    socket_path: Path, script: str, preload: Sequence[str], poll_cap: float | None = None
) -> None:
    """Import ``script``'s entry point and ``preload`` once, then fork one child per request
    (each child is a pristine copy of the warm interpreter, like a fresh process)."""
    import importlib
    import struct

    fn = _console_script(script)
    if poll_cap is not None:
        install_fast_poll(poll_cap)
    for module in preload:
        importlib.import_module(module)
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(socket_path))
    srv.listen(64)
    print(f"zygote for {script} ready on {socket_path} (preloaded {list(preload)})", flush=True)

    def reap(pid: int, conn: socket.socket) -> None:
        _, status = os.waitpid(pid, 0)
        with contextlib.suppress(OSError):
            conn.sendall(struct.pack("!i", os.waitstatus_to_exitcode(status)))
        conn.close()

    while True:
        conn, _ = srv.accept()
        fds: list[int] = []
        try:
            msg, fds, _, _ = socket.recv_fds(conn, 4, 3)
            if not msg:  # readiness probe
                conn.close()
                continue
            req = json.loads(_recv_exact(conn, struct.unpack("!I", msg)[0]))
        except (OSError, ValueError, struct.error) as exc:
            print(f"zygote: bad request: {exc!r}", flush=True)
            for fd in fds:
                os.close(fd)
            conn.close()
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                srv.close()
                conn.close()
                code = _zygote_child(fn, script, req, fds)
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        for fd in fds:
            os.close(fd)
        threading.Thread(target=reap, args=(pid, conn), daemon=True).start()


# ---- one Flower node per certificate (SuperLink side) ---------------------------------------

def install_peer_binding() -> bool:
    """In a SuperLink process: binds Flower node ids to the certificates of the channels they
    registered through. A Fleet `register-node` request carrying the sidecar's peer header
    unregisters the node that certificate registered before, so each certificate holds at
    most one live Flower node: a second SuperNode of one enrolled client replaces the first
    instead of counting twice (in sampling, `min_available_nodes` and Krum's f). Requests
    without the header (no sidecar in front: the plaintext baseline) are unchanged. Patches
    attributes of the pinned flwr==1.42.0; returns False (with a warning) where they moved."""
    from contextvars import ContextVar

    # Set by the inbound PQC sidecar on every request it forwards: the node id of the
    # certificate that authenticated the channel (a value a peer sent itself is dropped).
    from pqfed.pqc.sidecar.httpfilter import PEER_HEADER

    header = PEER_HEADER.lower()
    try:
        from flwr.common.constant import NOOP_FLWR_AID
        from flwr.superlink import main as superlink_main
        from flwr.superlink.servicer.fleet import fleet_handlers
        from starlette.middleware import Middleware
    except ImportError as exc:
        log.warning("peer binding: %s; Flower node ids stay unbound", exc)
        return False
    if not hasattr(superlink_main, "_get_middleware") or not hasattr(fleet_handlers,
                                                                      "register_node"):
        log.warning("peer binding: flwr's SuperLink layout changed; node ids stay unbound")
        return False
    peer_var: ContextVar[str | None] = ContextVar("pqfed_peer", default=None)

    class PeerMiddleware:
        """Outermost ASGI middleware: the request's certified peer, for the handlers."""

        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            peer = None
            if scope.get("type") == "http":
                peer = next((v.decode("ascii", "replace") for k, v in scope.get("headers", ())
                             if k.lower() == header), None)
            token = peer_var.set(peer)
            try:
                await self.app(scope, receive, send)
            finally:
                peer_var.reset(token)

    stock_middleware = superlink_main._get_middleware
    stock_register = fleet_handlers.register_node
    bound: dict[str, int] = {}
    lock = threading.Lock()

    def get_middleware() -> list[Any]:
        return [Middleware(PeerMiddleware), *stock_middleware()]

    def register_node(request: Any, state: Any, enable_supernode_auth: bool) -> Any:
        response = stock_register(request=request, state=state,
                                  enable_supernode_auth=enable_supernode_auth)
        peer = peer_var.get()
        if peer:
            with lock:
                previous, bound[peer] = bound.get(peer), int(response.node_id)
            if previous is not None and previous != response.node_id:
                with contextlib.suppress(ValueError):  # already unregistered
                    state.delete_node(NOOP_FLWR_AID, previous)
                log.warning("peer binding: %s registered node %d; its node %d is unregistered "
                            "(one Flower node per certificate)", peer, response.node_id,
                            previous)
        return response

    superlink_main._get_middleware = get_middleware
    fleet_handlers.register_node = register_node
    return True


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pqfed.services.flower_runtime")
    sub = parser.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("exec", help="run a flwr console script with capped poll sleeps "
                                     "and/or a pinned uvicorn HTTP implementation")
    ex.add_argument("--poll-cap", type=float, default=None)
    ex.add_argument("--http", default=None, help="uvicorn HTTP/1.1 implementation (h11, "
                                                 "httptools) for every server of the script")
    ex.add_argument("script")
    ex.add_argument("args", nargs=argparse.REMAINDER)
    zy = sub.add_parser("zygote", help="warm fork-server for flwr-clientapp tasks")
    zy.add_argument("--socket", type=Path, required=True)
    zy.add_argument("--preload", action="append", default=[])
    zy.add_argument("--script", default="flwr-clientapp")
    zy.add_argument("--poll-cap", type=float, default=None)
    ns = parser.parse_args(argv)
    if ns.cmd == "zygote":
        run_zygote(ns.socket, ns.script, ns.preload, ns.poll_cap)
        return
    args = list(ns.args)
    if args[:1] == ["--"]:
        args = args[1:]
    fn = _console_script(ns.script)
    if ns.http is not None:
        pin_uvicorn_http(ns.http)
    if ns.poll_cap is not None:
        install_fast_poll(ns.poll_cap)
    if ns.script == "flower-superlink":
        install_peer_binding()
    sys.argv = [ns.script, *args]
    result = fn()
    raise SystemExit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
