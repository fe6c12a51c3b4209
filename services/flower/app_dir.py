"""The Flower App (FAB source) a run submits, and the run/node config syntax of Flower 1.42."""

from __future__ import annotations

import shutil
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ConfigValue = bool | int | float | str

#: The Flower App shipped with the package (components in services/serverapp.py, clientapp.py).
FLOWER_APP_DIR = Path(__file__).resolve().parent.parent / "flower_app"


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
