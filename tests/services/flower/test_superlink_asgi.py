"""The SuperLink's middlewares as pure ASGI (services/flower/patches.py,
`SuperLinkAsgiMiddleware`) keep Flower's checks and responses: on a real SuperLink, with the
stock stack and with the ASGI one, a Fleet request without node authentication, with a forged
signature, or signed by another key than the node it names is refused with the same 401;
Flower's own SuperNode client registers and pulls; the Control API answers. With the long
poll (services/flower/longpoll.py) as well, the refusals still come at once, and an
authenticated pull that finds nothing is held for the hold time, then answered empty."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pqfed.services import flower as fr
from pqfed.services.ports import free_port

FLEET = "/v1/fleet/pull-messages"
PROTOBUF = {"Content-Type": "application/protobuf"}
HOLD_S = 1.5
TUNINGS = {
    "stock": fr.FlowerTuning(poll_cap=0.5),
    "asgi": fr.FlowerTuning(poll_cap=0.5, superlink_middleware="asgi"),
    "longpoll": fr.FlowerTuning(poll_cap=0.5, superlink_middleware="asgi", long_poll_s=HOLD_S),
}

LOGS: dict[str, Path] = {}


@pytest.fixture(scope="module", params=list(TUNINGS))
def superlink(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[tuple[str, str]]:
    stack = str(request.param)
    run_dir = tmp_path_factory.mktemp(f"link-{stack}")
    LOGS[stack] = run_dir / "logs" / "superlink.log"
    link = fr.SuperLinkProcess(run_dir, free_port(), tuning=TUNINGS[stack])
    try:
        link.start().wait_ready(90)
        yield stack, link.address
    finally:
        link.stop()


def test_the_asgi_stack_is_what_the_superlink_runs(superlink: tuple[str, str],
                                                   tmp_path: Path) -> None:
    stack, _ = superlink
    cmd = fr.SuperLinkProcess(tmp_path, 1, tuning=TUNINGS[stack]).command()
    assert ("--superlink-middleware" in cmd) == (stack != "stock")
    assert ("--long-poll" in cmd) == (stack == "longpoll")


def test_an_empty_pull_is_held_only_with_the_long_poll(superlink: tuple[str, str],
                                                       tmp_path: Path) -> None:
    """Flower's own SuperNode client: the pull that finds nothing comes back empty, after
    the hold with the long poll and at once without; the SuperLink logs what it held."""
    import time

    from flwr.supernode.fleet_http_connection import http_request_response

    stack, address = superlink
    with http_request_response(address, insecure=True) as conn:
        receive = conn[1]
        started = time.monotonic()
        assert receive() is None
        took = time.monotonic() - started
    logged = "pqfed long poll: held 1, woken 0, delivered 0, expired 1" in \
        LOGS[stack].read_text()
    if stack == "longpoll":
        assert took >= HOLD_S * 0.9 and logged, took
    else:
        assert took < HOLD_S * 0.9 and not logged, took


def _pull_request(node_id: int) -> bytes:
    from flwr.proto.fleet_pb2 import PullMessagesRequest  # type: ignore[attr-defined]
    from flwr.proto.node_pb2 import Node  # type: ignore[attr-defined]

    return bytes(PullMessagesRequest(node=Node(node_id=node_id)).SerializeToString())


def _signed_headers(private_key: object, public_key: object) -> dict[str, str]:
    """The headers Flower's SuperNode client signs (NodeAuthHttpInterceptor), for a key."""
    from flwr.common.constant import TIMESTAMP_HEADER
    from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
    from flwr.supercore.date import now
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message

    timestamp = now().isoformat()
    signature = sign_message(private_key, timestamp.encode("ascii"))  # type: ignore[arg-type]
    return {
        FLEET_HTTP_PUBLIC_KEY_HEADER: base64.b64encode(
            public_key_to_bytes(public_key)).decode("ascii"),  # type: ignore[arg-type]
        TIMESTAMP_HEADER: timestamp,
        FLEET_HTTP_SIGNATURE_HEADER: base64.b64encode(signature).decode("ascii"),
    }


def test_flowers_client_registers_pulls_and_the_control_api_answers(
        superlink: tuple[str, str]) -> None:
    from flwr.supernode.fleet_http_connection import http_request_response

    _, address = superlink
    with http_request_response(address, insecure=True) as conn:
        node_id, receive, *_ = conn
        assert receive() is None  # authenticated pull: nothing queued for this node
        assert node_id in fr.list_nodes(address)  # Control API through its middlewares


def test_unauthenticated_and_forged_fleet_requests_are_refused_alike(
        superlink: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """No auth headers, a forged signature, and a valid signature by a key that is not the
    named node's: each 401 with Flower's body, on the stock and on the ASGI stack."""
    from flwr.supercore.primitives.asymmetric import generate_key_pairs
    from flwr.supernode import fleet_http_connection

    _, address = superlink
    url = f"http://{address}{FLEET}"
    from flwr.supercore.constant import FLEET_HTTP_SIGNATURE_HEADER

    keys = generate_key_pairs()
    # the client self-registers with a key it generates: this test keeps a copy of it
    monkeypatch.setattr(fleet_http_connection, "generate_key_pairs", lambda: keys)
    with fleet_http_connection.http_request_response(address, insecure=True) as conn:
        victim = conn[0]
        body = _pull_request(victim)
        own = httpx.post(url, content=body, headers={**PROTOBUF, **_signed_headers(*keys)})
        bare = httpx.post(url, content=body, headers=PROTOBUF)
        # the victim's public key, a signature its private key did not make
        forged = {**_signed_headers(*keys),
                  FLEET_HTTP_SIGNATURE_HEADER: base64.b64encode(b"\0" * 70).decode()}
        forged_sig = httpx.post(url, content=body, headers={**PROTOBUF, **forged})
        # a valid signature, by a key that is not the victim's
        other_key = httpx.post(url, content=body, headers={
            **PROTOBUF, **_signed_headers(*generate_key_pairs())})
    assert own.status_code == 200, own.text  # the node itself is served
    for response in (bare, forged_sig, other_key):
        assert response.status_code == 401, response.text
        assert response.elapsed.total_seconds() < HOLD_S * 0.9  # refused, never held
        assert response.json() == {"detail": "Invalid SuperNode authentication"}


ERRORS: dict[str, list[tuple[int, object]]] = {}


def test_a_bad_protobuf_body_gets_flowers_error_response(superlink: tuple[str, str]) -> None:
    """Errors of the protobuf translation and below it, through the asgi stack's error
    translator, become the very responses the stock stack gives: a body that is not
    protobuf, a wrong media type, a method the route lacks, an unknown Fleet path."""
    stack, address = superlink
    url = f"http://{address}{FLEET}"
    bad = httpx.post(url, content=b"\xff\xff\xff", headers=PROTOBUF)
    wrong_type = httpx.post(url, content=b"", headers={"Content-Type": "text/plain"})
    wrong_method = httpx.get(url)
    unknown = httpx.post(f"http://{address}/v1/fleet/no-such-call", content=b"",
                         headers=PROTOBUF)
    assert bad.status_code == 400 and "code" in bad.json()
    assert wrong_type.status_code in (400, 415) and "code" in wrong_type.json()
    ERRORS[stack] = [(r.status_code, r.json()) for r in (bad, wrong_type, wrong_method, unknown)]
    if "stock" in ERRORS:  # the stock stack's module run comes first (TUNINGS order)
        assert ERRORS[stack] == ERRORS["stock"]


def test_a_held_pull_does_not_delay_the_superlinks_stop(tmp_path: Path) -> None:
    """uvicorn waits for open requests before it exits; the long poll answers its held pulls
    when the server shuts down, so a stop is not a hold long."""
    import threading
    import time

    from flwr.supernode.fleet_http_connection import http_request_response

    link = fr.SuperLinkProcess(tmp_path, free_port(), tuning=fr.FlowerTuning(
        poll_cap=0.5, superlink_middleware="asgi", long_poll_s=15.0))
    answers: list[object] = []
    held = threading.Event()

    def hold() -> None:
        with http_request_response(link.address, insecure=True) as conn:
            held.set()
            answers.append(conn[1]())

    try:
        link.start().wait_ready(90)
        threading.Thread(target=hold, daemon=True).start()
        assert held.wait(30)
        time.sleep(1.0)  # the pull is on the SuperLink now, held
    finally:
        started = time.monotonic()
        link.stop()
        took = time.monotonic() - started
    assert took < 10.0, took  # ManagedProcess.stop's kill timeout: it exited by itself
    deadline = time.monotonic() + 10
    while not answers and time.monotonic() < deadline:
        time.sleep(0.1)
    assert answers == [None]  # answered empty, not cut off
