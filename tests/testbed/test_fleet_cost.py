"""testbed/bench/fleet_cost.py: `pqfed bench fleet-cost` drives a real SuperLink with Flower's
own SuperNode client and reports the SuperLink's CPU per pull."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pqfed.cli import main
from pqfed.testbed.bench.fleet_cost import measure


def test_the_command_reports_the_superlinks_cpu_per_pull(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    out = tmp_path / "cost.json"
    assert main(["bench", "fleet-cost", "--nodes", "2", "--pulls", "5", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["stack"], result["nodes"], result["pulls"]) == ("asgi", 2, 10)
    assert result["cpu_s"] > 0 and result["cpu_ms_per_pull"] > 0  # the SuperLink did the work
    assert result["cpu_s"] == pytest.approx(result["user_s"] + result["system_s"])
    assert "10 pulls" in capsys.readouterr().out


@pytest.mark.parametrize(("stack", "nodes", "pulls"), [("nope", 1, 1), ("asgi", 0, 1),
                                                        ("asgi", 1, 0)])
def test_bad_arguments_are_refused_before_anything_starts(tmp_path: Path, stack: str,
                                                          nodes: int, pulls: int) -> None:
    with pytest.raises(ValueError, match="stack"):
        measure(stack, nodes, pulls, tmp_path)
    assert not any(tmp_path.iterdir())  # no SuperLink was started
