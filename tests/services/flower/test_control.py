"""The Control API client against the installed flwr: the private client class and the
protobuf messages it uses exist with the shape the client relies on (the live calls run in
test_deployment.py and test_peer_binding.py)."""

from __future__ import annotations

import inspect

import pytest

from pqfed.services import flower as fr
from pqfed.services.flower.control import control_client


def test_control_http_client_constructor() -> None:
    from flwr.supercore.control.control_http_client import ControlHttpClient

    params = list(inspect.signature(ControlHttpClient.from_server_address).parameters)
    assert params[:4] == ["server_address", "insecure", "root_certificates", "interceptors"]
    client = control_client("127.0.0.1:1")  # builds, connects only on a call
    try:
        for rpc in ("ListRuns", "StopRun", "ListNodes"):
            assert callable(getattr(client, rpc))
    finally:
        client.close()


def test_control_messages_have_the_fields_read() -> None:
    from flwr.proto.control_pb2 import (
        ListNodesRequest,
        ListNodesResponse,
        ListRunsRequest,
        ListRunsResponse,
        StopRunRequest,
        StopRunResponse,
    )

    assert ListRunsRequest(run_id=7).run_id == 7
    assert StopRunRequest(run_id=7).run_id == 7
    ListNodesRequest()
    assert "run_dict" in ListRunsResponse.DESCRIPTOR.fields_by_name
    assert "nodes_info" in ListNodesResponse.DESCRIPTOR.fields_by_name
    assert "success" in StopRunResponse.DESCRIPTOR.fields_by_name
    run = ListRunsResponse().run_dict.get_or_create(1)
    assert {"status", "sub_status", "details"} <= set(run.status.DESCRIPTOR.fields_by_name)


def test_run_status() -> None:
    assert fr.RunStatus(1, "finished", "completed", "").succeeded
    assert not fr.RunStatus(1, "finished", "failed", "x").succeeded
    assert not fr.RunStatus(1, "running", "", "").finished


def test_wait_nodes_outlasts_a_superlink_that_answers_late(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A ListNodes call that times out (a SuperLink busy with 100 nodes' polls, measured by
    `pqfed bench capacity`) is retried until wait_nodes' own timeout, not fatal. The SuperLink
    is replaced here: making a real one answer late on cue is not reliable."""
    import httpx

    from pqfed.services.flower import control

    answers: list[dict[int, str] | Exception] = [
        httpx.ReadTimeout("timed out"), {1: "online"}, {1: "online", 2: "online"}]

    def late(address: str) -> dict[int, str]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(control, "list_nodes", late)
    assert sorted(control.wait_nodes("127.0.0.1:1", 2, timeout=30)) == [1, 2]
    assert not answers


def test_wait_run_outlasts_a_superlink_that_answers_late(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same for the run's status: the 100-client capacity run's aggregator died on a ListRuns
    call that timed out while the run was fine."""
    import httpx

    from pqfed.services.flower import control

    running = control.RunStatus(7, "running", "", "")
    done = control.RunStatus(7, "finished", "completed", "")
    answers: list[control.RunStatus | Exception] = [running, httpx.ReadTimeout("timed out"),
                                                    done]

    def late(run_id: int, address: str) -> control.RunStatus:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(control, "get_run_status", late)
    assert control.wait_run(7, "127.0.0.1:1", timeout=30, poll=0.01) == done
    assert not answers
