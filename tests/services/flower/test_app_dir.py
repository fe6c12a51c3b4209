"""The Flower App dir (FAB source) and Flower's config-argument syntax."""

from __future__ import annotations

from pathlib import Path

import pytest

from pqfed.services import flower as fr


def test_format_config_args() -> None:
    s = fr.format_config_args({"partition-id": 0, "lr": 0.5, "iid": True, "dir": "/a b"})
    assert s == 'partition-id=0 lr=0.5 iid=true dir="/a b"'
    with pytest.raises(ValueError):
        fr.format_config_args({"x": 'say "hi"'})
    with pytest.raises(ValueError, match="invalid config key"):
        fr.format_config_args({"a b": 1})


def test_stage_app_and_run_config_keys(tmp_path: Path, mini_app: Path) -> None:
    defaults = fr.app_run_config_defaults(mini_app)
    assert defaults["client-scale"] == 1.0 and defaults["num-server-rounds"] == 3
    shipped = fr.app_run_config_defaults(fr.FLOWER_APP_DIR)
    assert {"spec", "job", "state-dir", "identity-dir"} <= set(shipped)
    assert "client-scale" not in shipped
    with pytest.raises(ValueError, match="not-a-key"):
        fr.submit_run(mini_app, {"not-a-key": 1}, "127.0.0.1:1", flwr_home=tmp_path / "h")


def test_shipped_app_builds_and_validates() -> None:
    """services/flower_app: components are import strings of installed modules (serverapp,
    clientapp; validated like `flwr run` does: find_spec + AST scan); the FAB carries no code."""
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
