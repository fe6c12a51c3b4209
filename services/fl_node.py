"""`pqfed fl aggregator` and `pqfed fl client`: one FL node's process set.

The same commands run as a container in a Kubernetes pod (next to the PQC sidecar) and as a
local process under `pqfed run`, so both paths exercise identical code.

Aggregator: SuperLink (Fleet + Control + ServerApp APIs on one loopback port; only the sidecar
reaches it), a SuperExec that launches the ServerApp per run, the job driver that submits the
run and waits for it, and a small HTTP API (`/healthz`, `/status`, `/checkpoint`) for the
operator, on loopback only: the checkpoint is the global model, so the operator reads it
through the sidecar with its own PQC identity (`pqfed sidecar --operator-upstream`).
Client: SuperNode dialling the SuperLink through its local sidecar route, and the SuperExec
that runs the ClientApp for each message.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

from pqfed.services import flower as fr
from pqfed.services.node_defaults import (
    FLEET_PORT,
    IDENTITY_DIR,
    RUNTIME_PORT,
    STATE_DIR,
    STATUS_FILE,
    STATUS_PORT,
    SUPERLINK_ROUTE,
)
from pqfed.services.rounds import read_status
from pqfed.services.spec import check_runnable, load_spec

log = logging.getLogger("pqfed.fl")

# Flower 1.42 sleeps 3 s in its SuperNode/ServerApp polling loops; capping them and forking
# ClientApps from a warm process cut a round from ~12 s to ~2 s (docs/BENCHMARKS.md).
# PQFED_FLOWER_STOCK=1 runs stock Flower (the baseline of that benchmark).
FAST_POLL_S = 0.1
# The SuperLink keeps its state in memory: with its SQLite file it is CPU-bound on per-request
# commits and a round costs ~2.2 s beyond compute instead of ~1.05 s (docs/BENCHMARKS.md).
# Nothing is lost that resuming needs: a restarted aggregator resumes from its own status.json
# and checkpoint (the operator keeps a copy), submits a new run, and SuperNodes re-register.
# PQFED_SUPERLINK_DB=1 keeps the file (the baseline of that benchmark).
SERVERAPP_LAUNCH_POLL_S = 1.0  # SuperExec only starts the ServerApp once per run
STATUS_HOST = "127.0.0.1"  # the status API; its only remote reader comes through the sidecar


def _superlink_db(state: Path) -> Path | None:
    return state / "superlink.db" if os.environ.get("PQFED_SUPERLINK_DB", "") == "1" else None
PRELOAD = ("torch", "pqfed.services.clientapp", "pqfed.services.models", "pqfed.services.data",
           "pqfed.services.warmup")


# An idle SuperNode backs off from FAST_POLL_S (services/flower/polling.py): fast for 1 s
# after a message or reply, then doubling to 2 s, so a new round reaches a node idle for
# longer at most ~2 s later, and an idle node sends 0.5 instead of 10 requests/s.
# PQFED_POLL_BACKOFF=0 polls every FAST_POLL_S (the baseline of that benchmark).
IDLE_BACKOFF = fr.IdleBackoff(window_s=1.0, cap_s=2.0, factor=2.0)
# The SuperLink's middlewares without the BaseHTTPMiddleware layers that only pass a Fleet
# request on (services/flower/patches.py). PQFED_SUPERLINK_MIDDLEWARE=stock: Flower's stack.
SUPERLINK_MIDDLEWARE = "asgi"
# The SuperLink holds an empty Fleet pull up to this long, answering as soon as the node has
# an instruction (services/flower/longpoll.py): idle nodes ask once per hold instead of once
# per back-off cap, and a new instruction reaches them at once. PQFED_LONG_POLL=0: answered at
# once (the node-side back-off alone); PQFED_LONG_POLL=S holds up to S seconds.
LONG_POLL_S = 10.0


def _stock() -> bool:
    return os.environ.get("PQFED_FLOWER_STOCK", "") == "1"


def _idle_backoff() -> fr.IdleBackoff | None:
    return None if os.environ.get("PQFED_POLL_BACKOFF", "") == "0" else IDLE_BACKOFF


def _superlink_middleware() -> str:
    return os.environ.get("PQFED_SUPERLINK_MIDDLEWARE", "") or SUPERLINK_MIDDLEWARE


def _long_poll() -> float | None:
    value = os.environ.get("PQFED_LONG_POLL", "")
    if value == "":
        return LONG_POLL_S if _superlink_middleware() == "asgi" else None
    try:
        seconds = float(value)
    except ValueError:
        raise fr.FlowerTuningError("long_poll_s", f"PQFED_LONG_POLL={value!r} is not a "
                                   "number of seconds (0 turns the long poll off)") from None
    return seconds or None


def _tuning(preload: tuple[str, ...]) -> fr.FlowerTuning:
    """A SuperNode's tuning: capped polls backing off while idle and warm ClientApps, or
    stock Flower."""
    return fr.FlowerTuning() if _stock() else fr.FlowerTuning.fast(
        FAST_POLL_S, preload, idle_backoff=_idle_backoff())


def _serve_status(state_dir: Path, port: int) -> None:
    import uvicorn
    from fastapi import FastAPI, HTTPException, Response

    app = FastAPI(title="pqfed aggregator", docs_url=None, redoc_url=None)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/status")
    def status() -> dict[str, Any]:
        return read_status(state_dir) or {"phase": "Pending", "currentRound": 0, "rounds": []}

    @app.get("/checkpoint")
    def checkpoint() -> Response:
        st = read_status(state_dir) or {}
        done = int(st.get("currentRound", 0))
        path = state_dir / "checkpoints" / f"round-{done:05d}.npz"
        if not done or not path.exists():
            raise HTTPException(404, "no completed round yet")
        return Response(path.read_bytes(), media_type="application/octet-stream",
                        headers={"X-Pqfed-Round": str(done)})

    # Loopback only: nothing that carries the model listens beside the PQC channel. The
    # operator's requests reach it through the sidecar's filter: same HTTP parser as there.
    from pqfed.pqc.sidecar.httpfilter import UPSTREAM_HTTP_IMPLEMENTATION

    config = uvicorn.Config(app, host=STATUS_HOST, port=port, log_level="warning",
                            lifespan="off", http=UPSTREAM_HTTP_IMPLEMENTATION)
    threading.Thread(target=uvicorn.Server(config).run, daemon=True,
                     name="status-api").start()


def _superlink(run_dir: Path, state: Path, args: argparse.Namespace, executor_name: str
               ) -> tuple[fr.SuperLinkProcess, fr.SuperExecProcess]:
    """The server side of an aggregator or an edge: SuperLink + the ServerApp launcher."""
    tuning = fr.FlowerTuning() if _stock() else fr.FlowerTuning(
        poll_cap=FAST_POLL_S, superlink_middleware=_superlink_middleware(),
        long_poll_s=_long_poll())
    link = fr.SuperLinkProcess(run_dir=run_dir, port=args.fleet_port, host=args.host,
                               isolation="process", database=_superlink_db(state),
                               tuning=tuning)
    if not tuning.stock:
        tuning = tuning.replace(superexec_poll_interval=SERVERAPP_LAUNCH_POLL_S)
    executor = fr.SuperExecProcess(run_dir=run_dir, name=executor_name,
                                   runtime_api_address=link.address,
                                   flwr_home=run_dir / "homes" / "serverapp", tuning=tuning)
    return link, executor


def restore_state(restore: Path, state_dir: Path) -> int:
    """Copies a saved status + checkpoint (the operator's copy) into an empty state dir, so
    the ServerApp resumes after the last completed round. Returns that round."""
    st = read_status(restore)
    if not st or (state_dir / STATUS_FILE).exists():
        return 0
    done = int(st.get("currentRound", 0))
    ckpt = restore / f"round-{done:05d}.npz"
    if done == 0 or not ckpt.exists():
        return 0
    (state_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copy(ckpt, state_dir / "checkpoints" / ckpt.name)
    shutil.copy(restore / STATUS_FILE, state_dir / STATUS_FILE)
    return done


def run_aggregator(args: argparse.Namespace) -> int:
    _setup_logging()
    name, spec = load_spec(Path(args.spec))
    check_runnable(spec, args.spec)
    state = Path(args.state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    if args.restore and (done := restore_state(Path(args.restore), state)):
        log.info("restored job %s at round %d", name, done)
    run_dir = state / "flower"
    # --- secure aggregation (services/secagg.py): Flower SecAgg+ components instead of apps ---
    app_dir = fr.FLOWER_APP_DIR
    if spec.secure_aggregation.enabled:
        from pqfed.services import secagg

        secagg.check_secagg_spec(spec, args.spec)
        app_dir = secagg.stage_secagg_app(run_dir / "app-secagg")
    # --- end secure aggregation ---
    if args.poisoning:  # benchmarks: clients started with --attack emulate it
        from pqfed.services.poisoning import stage_poisoning_app

        app_dir = stage_poisoning_app(run_dir / "app-poisoning", spec)
    link, executor = _superlink(run_dir, state, args, "serverapp-superexec")
    procs: list[Any] = [link, executor]
    _stop_on_signal(procs)
    try:
        link.start().wait_ready(120)
        executor.start()
        if args.status_port:
            _serve_status(state, args.status_port)
        # Hierarchical jobs: the central SuperLink's nodes are the edge aggregators.
        upstream_nodes = spec.hierarchy.edges if spec.hierarchy.enabled else spec.min_clients
        fr.wait_nodes(link.address, upstream_nodes, spec.timeouts.round_seconds,
                      watch=[p.proc for p in procs if p.proc])
        run_config: dict[str, fr.ConfigValue] = {
            "spec": spec.model_dump_json(by_alias=True), "job": name,
            "state-dir": str(state), "identity-dir": str(Path(args.identity_dir).resolve()),
        }
        run_id = fr.submit_run(app_dir, run_config, link.address,
                               flwr_home=run_dir / "homes" / "cli",
                               log_path=run_dir / "logs" / "flwr-run.log")
        log.info("job %s submitted as Flower run %d", name, run_id)
        budget = spec.timeouts.round_seconds * (spec.rounds + 1)
        result = fr.wait_run(run_id, link.address, budget,
                             watch=[p.proc for p in procs if p.proc])
        logs = fr.fetch_run_logs(run_id, link.address, flwr_home=run_dir / "homes" / "cli")
        (run_dir / "logs" / "serverapp.log").write_text(logs)
        status = read_status(state) or {}
        ok = result.succeeded and status.get("phase") == "Succeeded"
        log.info("job %s: run %d %s/%s, phase %s", name, run_id, result.status,
                 result.sub_status, status.get("phase"))
        if args.linger and args.status_port:
            time.sleep(args.linger)  # let the operator read the final status
        return 0 if ok else 1
    finally:
        for p in reversed(procs):
            p.stop()


def run_client(args: argparse.Namespace) -> int:
    _setup_logging()
    _, spec = load_spec(Path(args.spec))
    state = Path(args.state_dir).resolve()
    node_config: dict[str, fr.ConfigValue] = {
        "partition-id": args.index, "num-partitions": spec.clients,
        "identity-dir": str(Path(args.identity_dir).resolve()),
    }
    if spec.hierarchy.enabled:  # behind an edge: train only on the centre's signed model
        from pqfed.services.records import AGGREGATOR_NODE_ID, MODEL_SIGNER_KEY

        node_config[MODEL_SIGNER_KEY] = AGGREGATOR_NODE_ID
    if args.attack:
        node_config["attack"] = args.attack
    node = fr.SuperNodeProcess(run_dir=state / "flower", index=args.index,
                               superlink_address=args.superlink, runtime_port=args.runtime_port,
                               node_config=node_config, isolation="process",
                               tuning=_tuning(PRELOAD),
                               env_overrides={"PQFED_WARM_SPEC": str(Path(args.spec).resolve()),
                                              "PQFED_WARM_PARTITION": str(args.index)})
    _stop_on_signal([node])
    try:
        node.start(timeout=120)
        assert node.proc is not None
        while node.proc.running:
            time.sleep(0.5)
        return node.proc.returncode or 0
    finally:
        node.stop()


def run_edge(args: argparse.Namespace) -> int:
    """An edge aggregator (services/edge.py): a SuperLink + edge ServerApp for its member
    clients, and an upstream SuperNode towards the central aggregator."""
    from pqfed.services import edge, hierarchy
    from pqfed.services.records import EDGE_SOCKET_KEY

    _setup_logging()
    name, spec = load_spec(Path(args.spec))
    if not spec.hierarchy.enabled:
        raise SystemExit(f"{args.spec}: spec.hierarchy.enabled is false; edges run only in "
                         "hierarchical jobs")
    if not 0 <= args.index < spec.hierarchy.edges:
        raise SystemExit(f"--index {args.index}: must be in [0, {spec.hierarchy.edges})")
    state = Path(args.state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    identity_dir = str(Path(args.identity_dir).resolve())
    sock = edge.socket_path(state)
    members = hierarchy.edge_members(spec, args.index)
    run_dir = state / "flower"
    link, executor = _superlink(run_dir, state, args, "edge-serverapp-superexec")
    upstream = fr.SuperNodeProcess(
        run_dir=state / "upstream", index=args.index, superlink_address=args.superlink,
        runtime_port=args.runtime_port, isolation="process",
        tuning=_tuning(("pqfed.services.clientapp",)),
        node_config={"partition-id": args.index, "num-partitions": spec.hierarchy.edges,
                     "identity-dir": identity_dir, EDGE_SOCKET_KEY: str(sock)})
    procs: list[Any] = [link, executor, upstream]
    _stop_on_signal(procs)
    try:
        link.start().wait_ready(120)
        executor.start()
        if args.status_port:
            _serve_status(state, args.status_port)
        watch = [p.proc for p in (link, executor) if p.proc]
        wait_s = min(120.0, float(spec.timeouts.round_seconds))
        try:
            fr.wait_nodes(link.address, len(members), wait_s, watch=watch)
        except TimeoutError as exc:  # go on with the members that are up
            log.warning("edge %d: %s; starting with those online", args.index, exc)
            fr.wait_nodes(link.address, 1, spec.timeouts.round_seconds, watch=watch)
        app_dir = fr.stage_app_dir(run_dir / "app-edge",
                                   serverapp="pqfed.services.edge:edge_server_app",
                                   config_defaults={EDGE_SOCKET_KEY: ""})
        run_id = fr.submit_run(app_dir, {
            "spec": spec.model_dump_json(by_alias=True), "job": name,
            "state-dir": str(state), "identity-dir": identity_dir,
            EDGE_SOCKET_KEY: str(sock)}, link.address,
            flwr_home=run_dir / "homes" / "cli", log_path=run_dir / "logs" / "flwr-run.log")
        log.info("edge %d of job %s: clients %s, edge run %d", args.index, name, members, run_id)
        deadline = time.monotonic() + 120
        while not sock.exists():  # the edge ServerApp binds it once it runs
            if time.monotonic() > deadline or _run_finished(run_id, link.address):
                raise RuntimeError(f"edge ServerApp (run {run_id}) did not open {sock}")
            time.sleep(0.1)
        upstream.start(timeout=120)
        while True:
            for p in procs:
                if p.proc:
                    p.proc.check_alive()
            if _run_finished(run_id, link.address):
                logs = fr.fetch_run_logs(run_id, link.address, flwr_home=run_dir / "homes" / "cli")
                (run_dir / "logs" / "edge-serverapp.log").write_text(logs)
                raise RuntimeError(f"edge ServerApp run {run_id} ended; see {run_dir}/logs")
            time.sleep(1.0)
    finally:
        for p in reversed(procs):
            p.stop()


def _run_finished(run_id: int, address: str) -> bool:
    """The edge's own run has finished. A Control API call that times out on a busy
    SuperLink is no answer (`fr.try_run_status`): the edge keeps serving instead of exiting,
    which its aggregator would see as a lost node (300 clients behind 6 edges on 2 cores)."""
    status = fr.try_run_status(run_id, address)
    if status is None:
        log.warning("edge: the SuperLink's Control API did not answer in time; asking again")
    return status is not None and status.finished


def _setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("PQFED_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _stop_on_signal(procs: list[Any]) -> None:
    def handler(signum: int, _frame: Any) -> None:
        for p in reversed(procs):
            p.stop()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fl = sub.add_parser("fl", help="run one federated-learning node (used in pods)")
    fl_sub = fl.add_subparsers(dest="fl_command", required=True)
    agg = fl_sub.add_parser("aggregator", help="SuperLink + ServerApp + job driver")
    agg.add_argument("--spec", required=True, help="job YAML or JSON {name, spec}")
    agg.add_argument("--identity-dir", default=IDENTITY_DIR)
    agg.add_argument("--state-dir", default=STATE_DIR)
    agg.add_argument("--restore", help="dir with a saved status.json + checkpoint to resume")
    agg.add_argument("--host", default="127.0.0.1", help="SuperLink bind address")
    agg.add_argument("--fleet-port", type=int, default=FLEET_PORT)
    agg.add_argument("--status-port", type=int, default=STATUS_PORT,
                     help=f"status API port on {STATUS_HOST} (the sidecar's operator upstream)")
    agg.add_argument("--linger", type=float, default=0.0,
                     help="seconds to keep serving /status after the job ends")
    agg.add_argument("--poisoning", action="store_true",
                     help="benchmarks only: the ClientApp emulates the attacks that clients are "
                          "started with (`fl client --attack`); without it they train honestly")
    agg.set_defaults(func=run_aggregator)
    cli = fl_sub.add_parser("client", help="SuperNode + ClientApp executor")
    cli.add_argument("--spec", required=True)
    cli.add_argument("--index", type=int, required=True, help="partition index of this node")
    cli.add_argument("--identity-dir", default=IDENTITY_DIR)
    cli.add_argument("--state-dir", default=STATE_DIR)
    cli.add_argument("--superlink", default=SUPERLINK_ROUTE,
                     help="Fleet address: the local sidecar route to the aggregator")
    cli.add_argument("--runtime-port", type=int, default=RUNTIME_PORT)
    cli.add_argument("--attack", choices=["label-flip", "label-flip-boost"],
                     help="poisoning emulation (benchmarks; the aggregator needs --poisoning)")
    cli.set_defaults(func=run_client)
    edge = fl_sub.add_parser("edge", help="edge aggregator (hierarchical jobs): SuperLink + "
                                          "edge ServerApp downstream, SuperNode upstream")
    edge.add_argument("--spec", required=True)
    edge.add_argument("--index", type=int, required=True, help="edge index")
    edge.add_argument("--identity-dir", default=IDENTITY_DIR)
    edge.add_argument("--state-dir", default=STATE_DIR)
    edge.add_argument("--host", default="127.0.0.1", help="edge SuperLink bind address")
    edge.add_argument("--fleet-port", type=int, default=FLEET_PORT,
                      help="edge SuperLink port (its clients reach it through the sidecar)")
    edge.add_argument("--superlink", default=SUPERLINK_ROUTE,
                      help="central Fleet address: the local sidecar route to the aggregator")
    edge.add_argument("--runtime-port", type=int, default=RUNTIME_PORT)
    edge.add_argument("--status-port", type=int, default=0,
                      help="serve the edge's /status here (0: off)")
    edge.set_defaults(func=run_edge)
