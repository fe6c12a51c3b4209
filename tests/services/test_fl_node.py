"""services/fl_node.py: an edge keeps serving when its SuperLink's Control API is slow."""

from __future__ import annotations

import httpx
import pytest

from pqfed.services import fl_node
from pqfed.services import flower as fr
from pqfed.services.flower import control


def test_an_edge_takes_a_control_api_timeout_as_no_answer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    answers: list[object] = [httpx.ReadTimeout("timed out"),
                             fr.RunStatus(7, "running", "", ""),
                             fr.RunStatus(7, "finished", "completed", "")]

    def status(run_id: int, address: str) -> fr.RunStatus:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, fr.RunStatus)
        return answer

    monkeypatch.setattr(control, "get_run_status", status)
    # before: the timeout ended the edge (run_edge exited, its aggregator lost the node)
    assert [fl_node._run_finished(7, "127.0.0.1:1") for _ in range(3)] == [False, False, True]
    monkeypatch.setattr(control, "get_run_status",
                        lambda *_: (_ for _ in ()).throw(KeyError(7)))
    with pytest.raises(KeyError):  # anything else still ends it
        fl_node._run_finished(7, "127.0.0.1:1")
