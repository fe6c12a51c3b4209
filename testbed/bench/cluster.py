"""``--mode cluster``: one benchmark pod per selected node plus an aggregator pod.

Works on a real k3s cluster (container image, pod logs through the API) and on the emulated
cluster (testbed/cluster/up.sh + ``pqfed node-agent``: the image is ignored, `pqfed` comes
from the agent's venv, logs are read from the pod's ``pqfed.io/log-dir`` annotation). Pods
are bound with ``nodeName`` (no scheduler decisions, one per node); node pods get the
aggregator pod's IP, so neither DNS nor Services are needed. Results come back in the pod
logs (common.emit_result).
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import time
from pathlib import Path
from typing import Any

from pqfed.services import (
    API_GROUP,
    API_VERSION,
    LOG_DIR_ANNOTATION,
    NET_ANNOTATION,
    PLURAL,
    TESTBED_LABEL,
)
from pqfed.testbed.bench.common import effective_cores, make_material
from pqfed.testbed.bench.watch import BenchError, watch

MOUNT = "/etc/pqfed-bench"
CONTAINER = "bench"
FATAL_WAITING = {"ErrImageNeverPull", "InvalidImageName", "CreateContainerConfigError",
                 "CreateContainerError", "NoCommand"}


def _client(args: argparse.Namespace) -> Any:
    try:
        from kubernetes import config
    except ImportError as exc:  # pragma: no cover - the k8s extra is missing
        raise BenchError("--mode cluster needs the kubernetes client: pip install -e '.[k8s]'"
                         ) from exc
    try:
        return config.new_client_from_config(config_file=args.kubeconfig, context=args.context)
    except (config.ConfigException, OSError) as exc:
        raise BenchError(f"cannot load the kubeconfig ({args.kubeconfig or '$KUBECONFIG'}): "
                         f"{exc}") from exc


def _ready(node: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True"
               for c in (node.status.conditions or []))


class PodWatch:
    """A pod, followed through its phase and its log (API, else the agent's log dir)."""

    def __init__(self, core: Any, namespace: str, pod: str, name: str) -> None:
        self.core = core
        self.namespace = namespace
        self.pod = pod
        self.name = name
        self.last: Any = None
        self._api_logs = True

    def _read(self) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            self.last = self.core.read_namespaced_pod(self.pod, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                self.last = None
                return None
            raise
        return self.last

    def log(self) -> str:
        from kubernetes.client.exceptions import ApiException

        pod = self._read()
        if pod is None:
            return ""
        log_dir = (pod.metadata.annotations or {}).get(LOG_DIR_ANNOTATION)
        if log_dir and (Path(log_dir) / f"{CONTAINER}.log").exists():
            return (Path(log_dir) / f"{CONTAINER}.log").read_text(errors="replace")
        if not self._api_logs or pod.status.phase == "Pending":
            return ""
        try:
            return str(self.core.read_namespaced_pod_log(self.pod, self.namespace,
                                                         container=CONTAINER))
        except ApiException:
            return ""
        except ValueError:  # the client cannot decode a non-UTF-8 tail: read raw
            resp = self.core.read_namespaced_pod_log(self.pod, self.namespace,
                                                     container=CONTAINER,
                                                     _preload_content=False)
            return bytes(resp.data).decode(errors="replace")

    def state(self) -> str | None:
        pod = self.last if self.last is not None else self._read()
        if pod is None:
            return "the pod was deleted"
        phase = pod.status.phase
        if phase == "Succeeded":
            return "ok"
        statuses = pod.status.container_statuses or []
        if phase == "Failed":
            term = statuses[0].state.terminated if statuses and statuses[0].state else None
            if term is not None:
                return f"exit code {term.exit_code} ({term.reason})"
            return f"pod Failed: {pod.status.reason or ''} {pod.status.message or ''}".strip()
        for st in statuses:
            waiting = st.state.waiting if st.state else None
            if waiting is not None and waiting.reason in FATAL_WAITING:
                return f"{waiting.reason}: {waiting.message or ''}"
        return None


def _pod(client: Any, name: str, run: str, role: str, node: str, secret: str,
         argv: list[str], args: argparse.Namespace) -> Any:
    container = client.V1Container(
        name=CONTAINER, image=args.image, image_pull_policy=args.image_pull_policy,
        command=["pqfed", "bench", *argv],
        env=[client.V1EnvVar(name="PYTHONUNBUFFERED", value="1"),
             *(client.V1EnvVar(name=k, value=v) for k, v in
               (e.split("=", 1) for e in args.pod_env))],
        volume_mounts=[client.V1VolumeMount(name="keys", mount_path=MOUNT, read_only=True)],
    )
    labels = {"app.kubernetes.io/name": "pqfed-bench", "pqfed.io/bench-run": run,
              "pqfed.io/bench-role": role}
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels=labels),
        spec=client.V1PodSpec(
            containers=[container], restart_policy="Never", node_name=node,
            termination_grace_period_seconds=5, automount_service_account_token=False,
            enable_service_links=False,
            tolerations=[client.V1Toleration(operator="Exists")],
            volumes=[client.V1Volume(name="keys", secret=client.V1SecretVolumeSource(
                secret_name=secret))]),
    )


def _node_facts(node: Any) -> dict[str, Any]:
    labels = node.metadata.labels or {}
    info = node.status.node_info
    return {
        "arch": labels.get("kubernetes.io/arch"),
        "instance_type": labels.get("node.kubernetes.io/instance-type"),
        "testbed": labels.get(TESTBED_LABEL, "real"),
        "cpu_capacity": (node.status.capacity or {}).get("cpu"),
        "memory_capacity": (node.status.capacity or {}).get("memory"),
        "os_image": info.os_image if info else None,
        "kernel": info.kernel_version if info else None,
        "kubelet": info.kubelet_version if info else None,
    }


def _federation_job(api: Any, ref: str) -> dict[str, Any]:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    ns, _, name = ref.rpartition("/")
    try:
        custom: Any = client.CustomObjectsApi(api)
        obj = custom.get_namespaced_custom_object(
            API_GROUP, API_VERSION, ns or "default", PLURAL, name)
    except ApiException as exc:
        return {"skipped": f"FederationJob {ref}: {exc.status} {exc.reason}"}
    rounds = (obj.get("status") or {}).get("rounds") or []
    if not rounds:
        return {"skipped": f"FederationJob {ref} has no completed rounds in its status"}
    return {"job": f"FederationJob {ref} (its status keeps durationSeconds and cryptoSeconds)",
            "rounds": rounds, "wallSeconds": 0.0}


def run(args: argparse.Namespace, out: Path, progress: Any, common: list[str]
        ) -> dict[str, Any]:
    api = _client(args)
    import urllib3
    from kubernetes.client.exceptions import ApiException

    try:
        return _run(args, api, out, progress, common)
    except ApiException as exc:
        raise BenchError(f"Kubernetes API: {exc.status} {exc.reason}: "
                         f"{(exc.body or '')[:500]}") from exc
    except urllib3.exceptions.HTTPError as exc:
        raise BenchError(f"cannot reach the Kubernetes API server: {exc}") from exc


def _run(args: argparse.Namespace, api: Any, out: Path, progress: Any, common: list[str]
         ) -> dict[str, Any]:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core: Any = client.CoreV1Api(api)
    candidates = core.list_node(label_selector=args.node_selector or None).items
    nodes = sorted((n for n in candidates if _ready(n) and not n.spec.unschedulable),
                   key=lambda n: n.metadata.name)
    if not nodes:
        raise BenchError(f"no Ready, schedulable node matches --node-selector "
                         f"{args.node_selector!r} ({len(candidates)} matched in total)")
    names = [n.metadata.name for n in nodes]
    agg_node = args.aggregator_node or names[0]
    run_id = secrets.token_hex(3)
    prefix = f"pqfed-bench-{run_id}"
    ns = args.namespace
    created_ns = False
    try:
        core.read_namespace(ns)
    except ApiException as exc:
        if exc.status != 404:
            raise
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
            name=ns, labels={"app.kubernetes.io/name": "pqfed-bench"})))
        created_ns = True
    secret = f"{prefix}-keys"
    watches: list[PodWatch] = []
    try:
        core.create_namespaced_secret(ns, client.V1Secret(
            metadata=client.V1ObjectMeta(name=secret, labels={"pqfed.io/bench-run": run_id}),
            string_data=make_material()))
        seed_args = [a for pair in zip(common[::2], common[1::2], strict=True)
                     if pair[0] in ("--clients", "--repeats", "--skip", "--timeout")
                     for a in pair]
        agg_argv = ["aggregator", "--name", agg_node, "--nodes", str(len(names)),
                    "--material", MOUNT, *seed_args]
        core.create_namespaced_pod(ns, _pod(client, f"{prefix}-agg", run_id, "aggregator",
                                            agg_node, secret, agg_argv, args))
        agg = PodWatch(core, ns, f"{prefix}-agg", f"aggregator ({agg_node})")
        watches.append(agg)
        watch([agg], progress, args.timeout, until=lambda it, st: st.ready is not None,
              interval=2)
        agg_ip = core.read_namespaced_pod(agg.pod, ns).status.pod_ip
        if not agg_ip:
            raise BenchError("the aggregator pod is ready but has no pod IP")
        for i, node in enumerate(names):
            argv = ["node", "--name", node, "--index", str(i), "--nodes", str(len(names)),
                    "--aggregator", agg_ip, "--material", MOUNT, *common]
            core.create_namespaced_pod(ns, _pod(client, f"{prefix}-n{i}", run_id, "node", node,
                                                secret, argv, args))
            watches.append(PodWatch(core, ns, f"{prefix}-n{i}", node))
        outcomes = watch(watches, progress, args.timeout, interval=2)
    finally:
        logs = out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for w in watches:
            with contextlib.suppress(Exception):
                (logs / f"{w.pod}.log").write_text(w.log())
        shaping = {w.name: ((w.last.metadata.annotations or {}).get(NET_ANNOTATION, "none")
                            if w.last is not None else "?") for w in watches}
        if not args.keep:
            with contextlib.suppress(ApiException):
                core.delete_collection_namespaced_pod(
                    ns, label_selector=f"pqfed.io/bench-run={run_id}", grace_period_seconds=0)
            with contextlib.suppress(ApiException):
                core.delete_namespaced_secret(secret, ns)
            if created_ns:
                with contextlib.suppress(ApiException):
                    core.delete_namespace(ns)
    agg_result = outcomes.pop(agg.name).parsed.result
    if agg_result is None:
        raise BenchError("the aggregator reported no result")
    results = {name: o.parsed.result for name, o in outcomes.items()}
    facts = {n.metadata.name: _node_facts(n) for n in nodes}
    presets = {name: {**facts[name], "network": shaping.get(name, "none")} for name in names}
    emulated = all(f["testbed"] == "emulated" for f in facts.values())
    from pqfed.testbed.bench.common import emulated_node_quota, usable_cpus

    if emulated:  # pods cannot see their cgroup; the node agent's quota is on this host
        for name in names:
            quota = emulated_node_quota(name)
            presets[name]["cpu_limit_cores"] = quota
            hosts = [r["host"] for r in results.values() if r and r.get("node") == name]
            if agg_node == name:
                hosts.append(agg_result["host"])
            for h in hosts:
                if h.get("cpu_quota_cores") is None and quota is not None:
                    h["cpu_quota_cores"] = quota
                    h["cpu_quota_source"] = "the emulated node's cgroup, read on the host"

    node_cores = sum(effective_cores(r["host"]) for r in results.values() if r)
    notes = [f"Cluster mode: {len(names)} node(s) {', '.join(names)} (selector "
             f"{args.node_selector or '-'}); aggregator pod on {agg_node}; pods bound with "
             "nodeName, results read from pod logs."]
    if emulated:
        host_cpus = len(usable_cpus())
        node_cores = min(node_cores, float(host_cpus))
        notes.append(f"Emulated nodes ({TESTBED_LABEL}=emulated): all pods share this "
                     f"host's {host_cpus} CPU(s); per-node CPU quotas and link shaping as "
                     "listed above. tc netem is unavailable on kernels without sch_netem, so "
                     "only rate limits apply (no delay/jitter/loss).")
    federation: dict[str, Any] = {"skipped": "cluster mode: pass --federation-job NS/NAME to "
                                             "include a FederationJob's rounds"}
    if args.federation_job and "federation" not in (args.skip or ""):
        federation = _federation_job(api, args.federation_job)
    return {"aggregator": agg_result, "nodes": results, "presets": presets,
            "cluster": {"namespace": ns, "run": run_id, "aggregator_node": agg_node,
                        "nodes": names, "emulated": emulated,
                        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
            "placement": {"nodes": {n: n for n in names}, "aggregator": agg_node},
            "node_cores": node_cores, "notes": notes, "federation": federation}
