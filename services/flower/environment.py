"""Where Flower's executables are and what every Flower process gets: its own ``FLWR_HOME``
(with the SuperLink connection of the ``flwr`` CLI), no telemetry, no update check, no
runtime dependency installation, proxies bypassed for loopback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pqfed.services.ports import LOCALHOST

#: The bin dir of this interpreter: flwr's console scripts, and first on every Flower
#: process's PATH (SuperExec spawns ``flwr-serverapp``/``flwr-clientapp`` by bare name).
BIN_DIR = Path(sys.executable).parent
#: Name of the SuperLink connection written to each FLWR_HOME/config.toml.
DEFAULT_CONNECTION = "pqfed"
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


def flower_env(
    flwr_home: Path,
    *,
    extra_pythonpath: Sequence[Path | str] = (),
    extra_path: Sequence[Path | str] = (),
    superexec_poll_interval: float | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Environment for every Flower process: isolated FLWR_HOME, no telemetry, no update check,
    no runtime ``uv sync``, proxies bypassed for loopback, ``extra_path`` then this
    interpreter's bin dir first on PATH."""
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
        [*(str(p) for p in extra_path), str(BIN_DIR), env.get("PATH", "")]
    ).rstrip(os.pathsep)
    if extra_pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(
            [*(str(p) for p in extra_pythonpath), env.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep)
    if superexec_poll_interval is not None:
        env[SUPEREXEC_POLL_ENV] = str(superexec_poll_interval)
    return env


def bypass_proxy_for_loopback() -> None:
    """httpx (flwr's Control API client) honours HTTP(S)_PROXY: keep loopback off any proxy
    in this process."""
    for var in ("NO_PROXY", "no_proxy"):
        entries = [e for e in os.environ.get(var, "").split(",") if e]
        if LOCALHOST not in entries:
            os.environ[var] = ",".join([*entries, LOCALHOST, "localhost"])


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


def console_script(name: str) -> Callable[[], Any]:
    """The entry point of the installed console script ``name`` (e.g. ``flower-superlink``),
    to run it inside this interpreter after patching."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="console_scripts", name=name):
        fn: Callable[[], Any] = ep.load()
        return fn
    raise SystemExit(f"console script {name!r} not installed")
