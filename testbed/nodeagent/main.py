"""``pqfed node-agent``: command-line options and entry point."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from pqfed.cache import cache_dir
from pqfed.testbed.nodeagent.config import (
    NET_PRESETS,
    AgentConfig,
    NetShaping,
    parse_labels,
)


def cluster_dir(kubeconfig: Path | None) -> Path:
    """up.sh's state dir: $PQFED_CLUSTER_DIR, the dir above ``nodes/NAME.kubeconfig``, or
    the default ``$PQFED_CACHE/cluster``."""
    if os.environ.get("PQFED_CLUSTER_DIR"):
        return Path(os.environ["PQFED_CLUSTER_DIR"])
    if kubeconfig is not None and kubeconfig.parent.name == "nodes":
        return kubeconfig.parent.parent
    return cache_dir() / "cluster"


def cluster_env(directory: Path) -> dict[str, str]:
    """KEY=VALUE lines of ``<cluster>/env`` (written by up.sh)."""
    env: dict[str, str] = {}
    try:
        for line in (directory / "env").read_text().splitlines():
            key, sep, val = line.partition("=")
            if sep:
                env[key.strip()] = val.strip()
    except OSError:
        pass
    return env


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", required=True, help="Node name (DNS label), e.g. pi-0")
    p.add_argument("--kubeconfig", type=Path,
                   help="node credentials (default: <cluster>/nodes/NAME.kubeconfig from up.sh)")
    p.add_argument("--proxy-kubeconfig", type=Path,
                   help="credentials to watch EndpointSlices for /etc/hosts "
                        "(default: <cluster>/kube-proxy.kubeconfig if present, else --kubeconfig)")
    p.add_argument("--state-dir", type=Path, help="default: <cluster>/agents/NAME")
    p.add_argument("--labels", default="", help="extra node labels k=v,k2=v2")
    p.add_argument("--cpu", default="4", help="advertised CPU capacity (Pi 4: 4)")
    p.add_argument("--memory", default="4Gi", help="advertised memory capacity (Pi 4: 4Gi)")
    p.add_argument("--pods", type=int, default=20, help="max pods on the node")
    p.add_argument("--cpu-limit-cores", type=float, default=None,
                   help="real CPU quota for all the node's pods (cgroup cfs quota), e.g. 1.0")
    net = p.add_mutually_exclusive_group()
    net.add_argument("--netns", dest="netns", action="store_true", default=None,
                     help="one network namespace per pod on the bridge (default when root)")
    net.add_argument("--no-netns", dest="netns", action="store_false",
                     help="pods share the host network (podIP = node IP)")
    p.add_argument("--bridge", help="host bridge (default: up.sh's PQFED_BRIDGE or pqfed0)")
    p.add_argument("--pod-subnet",
                   help="A.B.0.0/16 (default: up.sh's PQFED_POD_SUBNET or 10.88.0.0/16)")
    p.add_argument("--node-index", type=int,
                   help="pod IPs are A.B.<index>.x (default: name's trailing number + 1)")
    p.add_argument("--apiserver-host-for-pods",
                   help="address pods use for the apiserver (default: the kubeconfig's host)")
    p.add_argument("--net-preset", choices=sorted(NET_PRESETS), default="none",
                   help="tc netem shaping of every pod's link: pi4-wifi (20±5 ms, 0.1%% loss, "
                        "50 Mbit), pi4-ethernet (0.3 ms, 900 Mbit)")
    p.add_argument("--delay-ms", type=float, help="one-way delay per direction (overrides preset)")
    p.add_argument("--jitter-ms", type=float, help="delay jitter (overrides preset)")
    p.add_argument("--loss-pct", type=float, help="packet loss %% per direction (overrides preset)")
    p.add_argument("--rate-mbit", type=float, help="rate limit per direction (overrides preset)")
    p.add_argument("--restart-backoff", type=float, default=10.0,
                   help="first crash-loop back-off in s (doubles up to 300)")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="max s to give pods when the agent stops")
    p.add_argument("--keep-pods", action="store_true",
                   help="on stop, leave pods running for the next agent run to adopt")
    p.add_argument("--background", action="store_true",
                   help="detach; log to <state-dir>/agent.log")
    p.add_argument("--stop", action="store_true",
                   help="stop the agent running for NAME/--state-dir (node goes NotReady)")
    p.add_argument("--log-level", default="INFO")


def build_config(args: argparse.Namespace) -> AgentConfig:
    cdir = cluster_dir(args.kubeconfig)
    env = cluster_env(cdir)
    kubeconfig = args.kubeconfig or cdir / "nodes" / f"{args.name}.kubeconfig"
    proxy = args.proxy_kubeconfig
    if proxy is None and (cdir / "kube-proxy.kubeconfig").is_file():
        proxy = cdir / "kube-proxy.kubeconfig"
    preset = NET_PRESETS[args.net_preset]
    shaping = NetShaping(
        delay_ms=preset.delay_ms if args.delay_ms is None else args.delay_ms,
        jitter_ms=preset.jitter_ms if args.jitter_ms is None else args.jitter_ms,
        loss_pct=preset.loss_pct if args.loss_pct is None else args.loss_pct,
        rate_mbit=preset.rate_mbit if args.rate_mbit is None else args.rate_mbit,
    )
    netns = args.netns if args.netns is not None else os.geteuid() == 0
    return AgentConfig(
        name=args.name,
        kubeconfig=kubeconfig,
        proxy_kubeconfig=proxy,
        state_dir=(args.state_dir or cdir / "agents" / args.name).absolute(),
        labels=parse_labels(args.labels),
        cpu=args.cpu,
        memory=args.memory,
        pods=args.pods,
        cpu_limit_cores=args.cpu_limit_cores,
        netns=netns,
        bridge=args.bridge or env.get("PQFED_BRIDGE") or "pqfed0",
        pod_subnet=args.pod_subnet or env.get("PQFED_POD_SUBNET") or "10.88.0.0/16",
        node_index=args.node_index,
        shaping=shaping,
        restart_backoff_s=args.restart_backoff,
        shutdown_grace_s=args.shutdown_grace,
        keep_pods_on_exit=args.keep_pods,
        apiserver_pod_host=args.apiserver_host_for_pods,
    )


def _background(config: AgentConfig) -> int:
    from pqfed.testbed.nodeagent.agent import agent_pid

    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_file = config.state_dir / "agent.log"
    argv = [a for a in sys.argv if a != "--background"]
    if Path(argv[0]).name == "pqfed" or argv[0].endswith("cli.py"):
        argv = [sys.executable, "-m", "pqfed.cli", *argv[1:]]
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print(f"node agent {config.name} exited ({proc.returncode}); see {log_file}",
                  file=sys.stderr)
            return 1
        if agent_pid(config.state_dir) == proc.pid and "ready (pod IPs" in log_file.read_text():
            print(f"node agent {config.name}: pid {proc.pid}, log {log_file}")
            return 0
        time.sleep(0.2)
    print(f"node agent {config.name} not ready after 60 s; see {log_file}", file=sys.stderr)
    return 1


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format=f"%(asctime)s {args.name} %(levelname)s %(name)s: %(message)s",
    )
    config = build_config(args)
    if args.stop:
        from pqfed.testbed.nodeagent.agent import stop_agent

        kc = config.kubeconfig if config.kubeconfig.is_file() else None
        return stop_agent(config.state_dir, kc, config.name)
    if not config.kubeconfig.is_file():
        raise ValueError(f"kubeconfig {config.kubeconfig} not found (run testbed/cluster/up.sh "
                         f"with PQFED_NODE_NAMES including {config.name}, or pass --kubeconfig)")
    if args.background:
        return _background(config)
    from pqfed.testbed.nodeagent.agent import NodeAgent

    return NodeAgent(config).run()
