"""Fixtures of the Flower runtime tests: the numpy stand-in Flower App (minimal_app/mini.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pqfed.services import flower as fr

MINI_DIR = Path(__file__).resolve().parent / "minimal_app"


@pytest.fixture
def mini_dir() -> Path:
    """Put this on the PYTHONPATH of the Flower processes: it holds the `mini` module."""
    return MINI_DIR


@pytest.fixture
def mini_app(tmp_path: Path) -> Path:
    """The stand-in app staged as a Flower App dir, with its run-config keys."""
    return fr.stage_app_dir(
        tmp_path / "app",
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
