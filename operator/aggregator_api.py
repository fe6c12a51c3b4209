"""Client of the aggregator's status API (`pqfed fl aggregator --status-port`, fl_node.py):
GET /status (the RoundRecorder's status.json) and GET /checkpoint (the last round's weights).

Plain HTTP to the pod IP on the pod network, never through a proxy: the operator pod shares
the pod network with the aggregator, and the API only describes training progress.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Final

TIMEOUT_S: Final = 2.0
# A ConfigMap holds at most 1 MiB; leave room for status.json and the object's metadata.
MAX_CHECKPOINT_BYTES: Final = 900 * 1024

# Environment proxies (HTTP_PROXY) must never see pod traffic.
_OPENER: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class AggregatorUnreachable(Exception):
    """The status API did not answer (pod starting, restarting or gone)."""


@dataclass(frozen=True)
class Checkpoint:
    round: int
    data: bytes
    status: dict[str, Any]


def _get(url: str) -> tuple[bytes, Any]:
    try:
        with _OPENER.open(url, timeout=TIMEOUT_S) as resp:
            return resp.read(), resp.headers
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise AggregatorUnreachable(f"{url}: {exc}") from None


def _base(pod_ip: str, port: int) -> str:
    host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
    return f"http://{host}:{port}"


def fetch_status(pod_ip: str, port: int, job: str) -> dict[str, Any]:
    """The aggregator's status.json. Refuses another job's (a reused pod IP)."""
    body, _ = _get(f"{_base(pod_ip, port)}/status")
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise AggregatorUnreachable(f"/status is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("job", job) != job:
        raise AggregatorUnreachable(f"{pod_ip} does not serve job {job}")
    return data


def fetch_checkpoint(pod_ip: str, port: int, job: str) -> Checkpoint | None:
    """The last completed round's checkpoint with the status that describes it, or None if
    a round completed between the two requests (try again on the next tick)."""
    status = fetch_status(pod_ip, port, job)
    data, headers = _get(f"{_base(pod_ip, port)}/checkpoint")
    try:
        round_ = int(headers.get("X-Pqfed-Round", "0"))
    except ValueError:
        return None
    if round_ != int(status.get("currentRound") or 0) or round_ < 1:
        return None
    return Checkpoint(round_, data, status)
