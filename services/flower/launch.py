"""``python -m pqfed.services.flower``: run a flwr console script in this interpreter after
installing pqfed's Flower patches (``exec``), or serve as the warm ClientApp fork server
(``zygote``). The process layer (services/flower/processes.py) builds these command lines.

    python -m pqfed.services.flower exec [--poll-cap S] [--idle-backoff W,C,F] [--http IMPL]
        [--superlink-middleware asgi [--long-poll S]] SCRIPT -- ARGS...
    python -m pqfed.services.flower zygote --socket PATH [--preload MOD]... [--poll-cap S]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pqfed.services.flower.settings import SUPERLINK_MIDDLEWARES, IdleBackoff


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pqfed.services.flower")
    sub = p.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("exec", help="run a flwr console script with capped poll sleeps "
                                     "and/or a pinned uvicorn HTTP implementation")
    ex.add_argument("--poll-cap", type=float, default=None)
    ex.add_argument("--idle-backoff", default=None, metavar="WINDOW,CAP,FACTOR",
                    help="flower-supernode: idle polls back off (FlowerTuning.idle_backoff)")
    ex.add_argument("--superlink-middleware", default="stock", choices=SUPERLINK_MIDDLEWARES,
                    help="flower-superlink: HTTP middleware stack "
                         "(FlowerTuning.superlink_middleware)")
    ex.add_argument("--long-poll", type=float, default=None, metavar="SECONDS",
                    help="flower-superlink with the asgi stack: hold an empty Fleet pull "
                         "up to this long (FlowerTuning.long_poll_s)")
    ex.add_argument("--http", default=None, help="uvicorn HTTP/1.1 implementation (h11, "
                                                 "httptools) for every server of the script")
    ex.add_argument("script")
    ex.add_argument("args", nargs=argparse.REMAINDER)
    zy = sub.add_parser("zygote", help="warm fork-server for flwr-clientapp tasks")
    zy.add_argument("--socket", type=Path, required=True)
    zy.add_argument("--preload", action="append", default=[])
    zy.add_argument("--script", default="flwr-clientapp")
    zy.add_argument("--poll-cap", type=float, default=None)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    ns = parser().parse_args(argv)
    if ns.cmd == "zygote":
        from pqfed.services.flower.warm_clientapp import run_zygote

        run_zygote(ns.socket, ns.script, ns.preload, ns.poll_cap)
        return
    from pqfed.services.flower.environment import console_script
    from pqfed.services.flower.patches import (
        install_asgi_middleware,
        install_fast_poll,
        install_idle_backoff,
        install_peer_binding,
        pin_uvicorn_http,
    )

    args = list(ns.args)
    if args[:1] == ["--"]:
        args = args[1:]
    fn = console_script(ns.script)
    if ns.http is not None:
        pin_uvicorn_http(ns.http)
    if ns.poll_cap is not None:
        install_fast_poll(ns.poll_cap)
        if ns.idle_backoff is not None:
            install_idle_backoff(ns.poll_cap, IdleBackoff.from_arg(ns.idle_backoff))
    if ns.script == "flower-superlink":
        if ns.superlink_middleware == "asgi":
            # before the peer binding, which wraps its result
            install_asgi_middleware(ns.long_poll)
        install_peer_binding()
    sys.argv = [ns.script, *args]
    result = fn()
    raise SystemExit(result if isinstance(result, int) else 0)
