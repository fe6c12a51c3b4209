"""`pqfed selftest`: is this installation (an image, a Pi, a virtualenv) able to do its job?

It runs the PQC known-answer checks (pqc/kat.py), one full pqfed1 handshake with a record
round trip over loopback, and, where torch is installed, one training step; and it prints the
versions that matter when two nodes disagree. Exit status 0 only when every check passed.
The operator and sidecar images carry no torch: there the training step is reported as not
run (and fails only with ``--require-torch``, which the fl image's test passes).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.metadata
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Check", "register", "run_selftest"]


@dataclass(frozen=True)
class Check:
    """One line of the report: status is "ok", "FAIL" or "not run"."""

    name: str
    status: str
    detail: str = ""
    seconds: float = 0.0


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    out = {"pqfed": _version("pqfed"), "python": platform.python_version(),
           "machine": platform.machine(), "cryptography": _version("cryptography")}
    try:
        from cryptography.hazmat.backends.openssl.backend import backend

        out["openssl"] = str(backend.openssl_version_text())
    except ImportError as exc:  # pragma: no cover - cryptography is a core dependency
        out["openssl"] = f"unavailable ({exc})"
    for dist in ("flwr", "torch", "numpy", "kubernetes", "kopf"):
        out[dist] = _version(dist)
    try:
        from pqfed.pqc.backends import backend_report

        report = backend_report()
        out["pqc_backend"] = f"{report['backend']} ({report.get('description', '')})"
    except Exception as exc:
        out["pqc_backend"] = f"unavailable ({exc})"
    return out


def _kat() -> list[Check]:
    from pqfed.pqc.kat import run_known_answer_tests

    return [Check(f"kat: {r.name}", "ok" if r.ok else "FAIL", r.detail)
            for r in run_known_answer_tests()]


async def _handshake_round_trip() -> str:
    from pqfed.pqc import (
        CertificateAuthority,
        ChannelClosed,
        HandshakeConfig,
        Role,
        SecureChannel,
        connect,
        server_channel,
    )

    ca = CertificateAuthority.generate("selftest")
    server_cfg = HandshakeConfig(ca.new_identity("aggregator", Role.AGGREGATOR), ca.trust,
                                 timeout_s=30, max_plaintext=4096, key_update_after=4)
    client_cfg = HandshakeConfig(ca.new_identity("client-0", Role.CLIENT), ca.trust,
                                 timeout_s=30, max_plaintext=4096, key_update_after=4)
    failures: list[BaseException] = []
    served = asyncio.Event()

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ch: SecureChannel | None = None
        try:
            ch = await server_channel(r, w, server_cfg)
            while True:
                await ch.send(await ch.recv())
        except ChannelClosed:
            pass
        except Exception as exc:
            failures.append(exc)
        finally:
            if ch is not None:
                await ch.close()
            served.set()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    payload = bytes(range(256)) * 128  # 32 KiB: 8 records, so keys update in both directions
    try:
        ch = await connect("127.0.0.1", port, client_cfg)
        await ch.send(payload)
        echoed = b""
        while len(echoed) < len(payload):
            echoed += await ch.recv()
        peer = ch.peer.node_id
        await ch.close()
        await asyncio.wait_for(served.wait(), 30)  # the echo side saw the close and ended
    finally:
        server.close()
        await server.wait_closed()
    if failures:
        raise failures[0]
    if echoed != payload:
        raise AssertionError("the echoed records differ from what was sent")
    return f"peer {peer}, {len(payload)} bytes echoed through the channel"


def _training_step() -> str:
    import torch

    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = (x[:, 0] > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss_fn = torch.nn.CrossEntropyLoss()
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    if not losses[-1] < losses[0]:
        raise AssertionError(f"the loss did not decrease: {losses}")
    return (f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, torch threads "
            f"{torch.get_num_threads()}, cuda available {torch.cuda.is_available()}")


def _timed(name: str, fn: Any) -> Check:
    start = time.perf_counter()
    try:
        detail = fn()
    except Exception as exc:
        return Check(name, "FAIL", f"{type(exc).__name__}: {exc}", time.perf_counter() - start)
    return Check(name, "ok", detail, time.perf_counter() - start)


def _backends() -> list[Check]:
    from pqfed.pqc.backends import cross_backend_checks

    return [Check(f"backends: {pair}", "ok" if result == "ok" else "FAIL",
                  "" if result == "ok" else result)
            for pair, result in cross_backend_checks().items()]


def run_selftest(require_torch: bool = False) -> list[Check]:
    checks = _kat() + _backends()
    checks.append(_timed("pqfed1 handshake + records over loopback",
                         lambda: asyncio.run(_handshake_round_trip())))
    try:
        importlib.import_module("torch")
    except ImportError as exc:
        status = "FAIL" if require_torch else "not run"
        checks.append(Check("torch training step", status,
                            f"torch is not installed here ({exc.msg})"))
    else:
        checks.append(_timed("torch training step", _training_step))
    return checks


def _main(args: argparse.Namespace) -> int:
    if getattr(args, "backend", None):
        from pqfed.pqc.backends import BACKEND_ENV, get_backend

        os.environ[BACKEND_ENV] = args.backend
        get_backend.cache_clear()
    ver = versions()
    checks = run_selftest(require_torch=args.require_torch)
    failed = [c for c in checks if c.status == "FAIL"]
    if args.json:
        print(json.dumps({"versions": ver, "checks": [asdict(c) for c in checks],
                          "ok": not failed}, indent=1))
    else:
        for k, v in ver.items():
            print(f"{k:>13}: {v}")
        for c in checks:
            extra = f" ({c.detail})" if c.detail else ""
            print(f"{c.status:>7}  {c.name}{extra}")
        print(f"selftest: {len(checks) - len(failed)}/{len(checks)} passed or not applicable"
              + (f", {len(failed)} FAILED" if failed else ""))
    return 1 if failed else 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("selftest", help="PQC known answers, a loopback handshake, a training "
                                        "step; print versions (exit 1 on any failure)")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument("--require-torch", action="store_true",
                   help="fail when torch is missing (the fl image)")
    p.add_argument("--backend", choices=["auto", "pyca", "liboqs"],
                   help="check this crypto backend (default: $PQFED_CRYPTO_BACKEND, else auto)")
    p.set_defaults(func=_main)


if __name__ == "__main__":
    sys.exit(_main(argparse.Namespace(json=False, require_torch=False, backend=None)))
