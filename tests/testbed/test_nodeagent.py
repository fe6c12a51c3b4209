"""End-to-end check of the process-based node agent (testbed/nodeagent) on a real control plane.

Starts etcd + kube-apiserver + controller-manager + scheduler with
testbed/cluster/up.sh in a private state dir, on free ports, with its own pod
bridge and /16 (so a developer's cluster on pqfed0 is never touched), then two
``pqfed node-agent`` processes (emulated Raspberry Pis). Workloads are created
with the official ``kubernetes`` client; the real scheduler places them, the
agents run them as processes in per-pod network and mount namespaces, the real
controller-manager turns their IPs and readiness into EndpointSlices.

The end-to-end tests (class ``TestEmulatedCluster``, marked cluster + slow) need
root (namespaces, veth, cgroups) and the binaries from build.sh and skip
otherwise; the unit tests at the end need neither.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pqfed.testbed.testing import cluster_env, free_subnet, wait_for

kubernetes = pytest.importorskip(
    "kubernetes", reason="the kubernetes client is not installed (pip install -e '.[k8s]')"
)
client = kubernetes.client
ApiException = kubernetes.client.rest.ApiException

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "testbed" / "cluster"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
RUN_ID = secrets.token_hex(3)
NODES = (f"pqt{RUN_ID}-0", f"pqt{RUN_ID}-1")
BRIDGE = f"pqt{RUN_ID}"
CPU_LIMIT = 1.0  # --cpu-limit-cores of node 0


def _free_subnet() -> str:
    subnet = free_subnet(100 + int(RUN_ID, 16) % 50, 200)
    if subnet is None:
        pytest.skip("no free 10.X.0.0/16 for the test pod network")
    return subnet


def _skip_unless_possible() -> None:
    if os.geteuid() != 0:
        pytest.skip("the node agent needs root (network/mount namespaces, veth, cgroups)")
    for tool in ("ip", "nsenter", "tc", "curl"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    proc = subprocess.run(["bash", str(SCRIPTS / "build.sh"), "--check", *COMPONENTS],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip("Kubernetes control-plane binaries are not built; run "
                    f"testbed/cluster/build.sh:\n{proc.stdout.strip()}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    _skip_unless_possible()
    cluster_dir = tmp_path_factory.mktemp("nodeagent-cluster")
    env = cluster_env(cluster_dir, NODES, bridge=BRIDGE, pod_subnet=_free_subnet())
    agents: list[subprocess.Popen[bytes]] = []
    try:
        up = subprocess.run(["bash", str(SCRIPTS / "up.sh")], env=env, capture_output=True,
                            text=True, timeout=300, check=False)
        assert up.returncode == 0, f"up.sh failed ({up.returncode}):\n{up.stderr}"
        extra = [["--cpu-limit-cores", str(CPU_LIMIT), "--labels", "pqfed.io/role=aggregator"],
                 ["--rate-mbit", "100", "--labels", "pqfed.io/role=client"]]
        for node, args in zip(NODES, extra, strict=True):
            log = open(cluster_dir / f"agent-{node}.log", "wb")  # noqa: SIM115
            agents.append(subprocess.Popen(
                [sys.executable, "-m", "pqfed.cli", "node-agent", "--name", node,
                 "--restart-backoff", "1", "--shutdown-grace", "5", *args],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            ))
        yield {"env": env, "dir": cluster_dir, "kubeconfig": str(cluster_dir / "kubeconfig"),
               "agents": agents}
    finally:
        down = subprocess.run(["bash", str(SCRIPTS / "down.sh"), "--wipe"], env=env,
                              capture_output=True, text=True, timeout=180, check=False)
        for proc in agents:  # down.sh stops them by their pidfiles; this is only a safety net
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert down.returncode == 0, f"down.sh failed:\n{down.stderr}"
        leftover = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                  check=False).stdout
        assert not [n for n in NODES if f"pqfed-{n}-" in leftover], leftover
        bridge = subprocess.run(["ip", "link", "show", "dev", BRIDGE], capture_output=True,
                                check=False)
        assert bridge.returncode != 0, f"bridge {BRIDGE} left behind"
        root = Path("/sys/fs/cgroup")
        cgroups = [p for p in [*root.glob("*/pqfed/*"), *root.glob("pqfed/*")] if p.name in NODES]
        assert not cgroups, f"node cgroups left behind: {cgroups}"


@pytest.fixture(scope="module")
def api(cluster: dict[str, Any]) -> Any:
    return kubernetes.config.new_client_from_config(config_file=cluster["kubeconfig"])


@pytest.fixture(scope="module")
def core(api: Any) -> Any:
    return client.CoreV1Api(api)


@pytest.fixture(scope="module")
def ready_nodes(cluster: dict[str, Any], core: Any) -> list[Any]:
    def ready() -> list[Any]:
        for proc in cluster["agents"]:
            assert proc.poll() is None, _agent_logs(cluster)
        nodes = [n for n in core.list_node().items if n.metadata.name in NODES]
        ok = [n for n in nodes if any(c.type == "Ready" and c.status == "True"
                                      for c in n.status.conditions or [])]
        return ok if len(ok) == len(NODES) else []

    return list(wait_for(ready, 60, "both emulated nodes Ready"))


def _agent_logs(cluster: dict[str, Any]) -> str:
    return "\n".join(p.read_text(errors="replace")[-3000:]
                     for p in sorted(Path(cluster["dir"]).glob("agent-*.log")))


@pytest.fixture(scope="module")
def ns(core: Any, ready_nodes: list[Any]) -> Iterator[str]:
    name = f"pqt-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    wait_for(lambda: core.list_namespaced_service_account(
        name, field_selector="metadata.name=default").items, 60, "service account default")
    yield name


def _pod(name: str, script: str, *, node: str | None = None, restart: str = "Never",
         **spec: Any) -> Any:
    container = client.V1Container(
        name="main", image="registry.invalid/ignored:1", command=["sh", "-c", script],
        env=spec.pop("env", None), volume_mounts=spec.pop("volume_mounts", None),
        resources=spec.pop("resources", None),
    )
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels={"test": name}),
        spec=client.V1PodSpec(containers=[container], restart_policy=restart, node_name=node,
                              termination_grace_period_seconds=2, **spec),
    )


def _phase(core: Any, ns: str, name: str, phases: tuple[str, ...] = ("Succeeded", "Failed")
           ) -> Callable[[], Any]:
    def check() -> Any:
        pod = core.read_namespaced_pod(name, ns)
        return pod if pod.status.phase in phases else None
    return check


def _log(pod: Any) -> str:
    log_dir = Path(pod.metadata.annotations["pqfed.io/log-dir"])
    return (log_dir / "main.log").read_text(errors="replace")


# -- end-to-end --------------------------------------------------------------------------------
@pytest.mark.cluster
@pytest.mark.slow
class TestEmulatedCluster:

    def test_nodes_look_like_raspberry_pis(self, core: Any, ready_nodes: list[Any]) -> None:
        for node in ready_nodes:
            labels = node.metadata.labels
            assert labels["kubernetes.io/arch"] == "arm64"
            assert labels["kubernetes.io/os"] == "linux"
            assert labels["node.kubernetes.io/instance-type"] == "raspberrypi-4b"
            assert labels["pqfed.io/testbed"] == "emulated"
            assert labels["kubernetes.io/hostname"] == node.metadata.name
            assert node.status.capacity["cpu"] == "4"
            assert node.status.capacity["memory"] == "4Gi"
            assert node.status.capacity["pods"] == "20"
            assert node.status.allocatable["cpu"] == "4"
            assert node.status.node_info.architecture == "arm64"
            assert node.spec.pod_cidr and node.spec.pod_cidr.endswith(".0/24")
        roles = {n.metadata.name: n.metadata.labels.get("pqfed.io/role") for n in ready_nodes}
        assert roles == {NODES[0]: "aggregator", NODES[1]: "client"}


    def test_lease_is_renewed(self, api: Any, ready_nodes: list[Any]) -> None:
        coord = client.CoordinationV1Api(api)
        first = coord.read_namespaced_lease(NODES[0], "kube-node-lease")
        assert first.spec.holder_identity == NODES[0]

        def renewed_lease() -> Any:
            lease = coord.read_namespaced_lease(NODES[0], "kube-node-lease")
            return lease if lease.spec.renew_time > first.spec.renew_time else None

        renewed = wait_for(renewed_lease, 25, "the node Lease to be renewed")
        assert renewed.spec.lease_duration_seconds == 40


    def test_deployment_behind_service_reached_by_name(self, api: Any, core: Any, ns: str) -> None:
        apps = client.AppsV1Api(api)
        port = 8080
        labels = {"app": "web"}
        probe = client.V1Probe(http_get=client.V1HTTPGetAction(path="/", port="http"),
                               period_seconds=1)
        web = client.V1Container(
            name="web", image="python:3.11-slim",
            command=["python", "-m", "http.server", str(port)],
            ports=[client.V1ContainerPort(container_port=port, name="http")],
            readiness_probe=probe,
        )
        apps.create_namespaced_deployment(ns, client.V1Deployment(
            metadata=client.V1ObjectMeta(name="web"),
            spec=client.V1DeploymentSpec(
                replicas=2, selector=client.V1LabelSelector(match_labels=labels),
                template=client.V1PodTemplateSpec(
                    metadata=client.V1ObjectMeta(labels=labels),
                    spec=client.V1PodSpec(containers=[web], termination_grace_period_seconds=2)),
            ),
        ))
        core.create_namespaced_service(ns, client.V1Service(
            metadata=client.V1ObjectMeta(name="web"),
            spec=client.V1ServiceSpec(selector=labels,
                                      ports=[client.V1ServicePort(port=port, target_port=port)]),
        ))

        def ready_pods() -> list[Any]:
            pods = core.list_namespaced_pod(ns, label_selector="app=web").items
            ok = [p for p in pods if p.status.phase == "Running" and any(
                c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])]
            return ok if len(ok) == 2 else []

        pods = wait_for(ready_pods, 90, "2 Ready web pods")
        assert {p.spec.node_name for p in pods} <= set(NODES)  # placed by the scheduler
        ips = {p.status.pod_ip for p in pods}
        assert all(ip and not ip.startswith("127.") for ip in ips)

        discovery = client.DiscoveryV1Api(api)

        def slice_ips() -> set[str]:
            slices = discovery.list_namespaced_endpoint_slice(
                ns, label_selector="kubernetes.io/service-name=web").items
            return {a for s in slices for e in s.endpoints or []
                    if e.conditions.ready for a in e.addresses}

        wait_for(lambda: slice_ips() == ips, 30, f"EndpointSlice with the pod IPs {ips}")

        script = (f"for i in $(seq 30); do curl -sf -o /dev/null http://web:{port}/ && break; "
                  "sleep 1; done; "
                  f"curl -sf -o /dev/null -w 'status=%{{http_code}}\\n' http://web:{port}/ && "
                  f"curl -sf -o /dev/null http://web.{ns}.svc.cluster.local:{port}/ && "
                  "grep -w web /etc/hosts")
        core.create_namespaced_pod(ns, _pod("curl", script))
        pod = wait_for(_phase(core, ns, "curl"), 60, "the client pod to finish")
        log = _log(pod)
        assert pod.status.phase == "Succeeded", log
        assert "status=200" in log
        assert pod.status.container_statuses[0].state.terminated.exit_code == 0
        hosts_line = next(line for line in log.splitlines() if line.split()[1:2] == ["web"])
        assert hosts_line.split()[0] in ips


    def test_secret_volume_env_and_in_cluster_api(self, core: Any, ns: str) -> None:
        core.create_namespaced_secret(ns, client.V1Secret(
            metadata=client.V1ObjectMeta(name="identity"),
            string_data={"tls.crt": "-----BEGIN CERTIFICATE-----\nfake\n", "token": "s3cr3t"},
        ))
        env = [
            client.V1EnvVar(name="POD_NAME", value_from=client.V1EnvVarSource(
                field_ref=client.V1ObjectFieldSelector(field_path="metadata.name"))),
            client.V1EnvVar(name="POD_NS", value_from=client.V1EnvVarSource(
                field_ref=client.V1ObjectFieldSelector(field_path="metadata.namespace"))),
            client.V1EnvVar(name="POD_IP", value_from=client.V1EnvVarSource(
                field_ref=client.V1ObjectFieldSelector(field_path="status.podIP"))),
            client.V1EnvVar(name="NODE", value_from=client.V1EnvVarSource(
                field_ref=client.V1ObjectFieldSelector(field_path="spec.nodeName"))),
            client.V1EnvVar(name="TOKEN", value_from=client.V1EnvVarSource(
                secret_key_ref=client.V1SecretKeySelector(name="identity", key="token"))),
        ]
        check_api = ("from kubernetes import client, config; config.load_incluster_config(); "
                     "print('api=' + client.VersionApi().get_code().git_version)")
        script = (
            "cat /etc/pqfed/identity/tls.crt && "
            'echo "name=$POD_NAME ns=$POD_NS ip=$POD_IP node=$NODE token=$TOKEN" && '
            "test -s /var/run/secrets/kubernetes.io/serviceaccount/token && "
            f'python -c "{check_api}"'
        )
        core.create_namespaced_pod(ns, _pod(
            "identity", script, env=env,
            volumes=[client.V1Volume(name="id", secret=client.V1SecretVolumeSource(
                secret_name="identity"))],
            volume_mounts=[client.V1VolumeMount(name="id", mount_path="/etc/pqfed/identity",
                                                read_only=True)],
        ))
        pod = wait_for(_phase(core, ns, "identity"), 60, "the identity pod to finish")
        log = _log(pod)
        assert pod.status.phase == "Succeeded", log
        assert "-----BEGIN CERTIFICATE-----" in log
        assert (f"name=identity ns={ns} ip={pod.status.pod_ip} node={pod.spec.node_name} "
                "token=s3cr3t") in log
        assert re.search(r"^api=v1\.\d+", log, re.M), log
        assert not Path("/etc/pqfed/identity/tls.crt").exists()  # only inside the pod's mount ns


    def test_delete_kills_processes_and_cpu_limits(self, core: Any, ns: str) -> None:
        resources = client.V1ResourceRequirements(limits={"cpu": "250m"})
        core.create_namespaced_pod(ns, _pod("sleeper", "sleep 3600", node=NODES[0],
                                            resources=resources, restart="Always"))
        pod = wait_for(_phase(core, ns, "sleeper", ("Running",)), 60, "the sleeper to run")
        wait_for(lambda: core.read_namespaced_pod("sleeper", ns).status.container_statuses[0].started,
              30, "the container to start")
        uid = pod.metadata.uid

        # CPU emulation: the node's quota and the container's limit (cgroup v1 or v2).
        v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
        base = Path("/sys/fs/cgroup") if v2 else Path("/sys/fs/cgroup/cpu")
        node_cg = base / "pqfed" / NODES[0]
        ctr_cg = node_cg / f"pod-{uid}" / "main"
        if v2:
            assert (node_cg / "cpu.max").read_text().split()[0] == str(int(CPU_LIMIT * 100000))
            assert (ctr_cg / "cpu.max").read_text().split()[0] == "25000"
        else:
            assert int((node_cg / "cpu.cfs_quota_us").read_text()) == int(CPU_LIMIT * 100000)
            assert int((ctr_cg / "cpu.cfs_quota_us").read_text()) == 25000
        pids = [int(p) for p in (ctr_cg / "cgroup.procs").read_text().split()]
        assert len(pids) >= 2  # the shim and `sleep`
        netns = f"pqfed-{NODES[0]}-{uid[:8]}"
        assert netns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                       check=False).stdout

        core.delete_namespaced_pod("sleeper", ns)

        def gone() -> bool:
            try:
                core.read_namespaced_pod("sleeper", ns)
            except ApiException as exc:
                return exc.status == 404
            return False

        wait_for(gone, 30, "the pod object to be removed by the agent")
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists() or \
                Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z", f"pid {pid} survived"
        assert netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                           check=False).stdout


    def test_restart_policy_and_backoff(self, core: Any, ns: str) -> None:
        core.create_namespaced_pod(ns, _pod("flaky", "echo attempt; exit 3", restart="OnFailure"))

        def restarted() -> Any:
            st = (core.read_namespaced_pod("flaky", ns).status.container_statuses or [None])[0]
            return st if st is not None and st.restart_count >= 2 else None

        status = wait_for(restarted, 40, "two restarts of a failing OnFailure container")
        assert status.last_state.terminated.exit_code == 3
        core.create_namespaced_pod(ns, _pod("noop", "exit 0", restart="OnFailure"))
        assert wait_for(_phase(core, ns, "noop"), 30, "noop").status.phase == "Succeeded"
        core.create_namespaced_pod(ns, client.V1Pod(
            metadata=client.V1ObjectMeta(name="nocmd"),
            spec=client.V1PodSpec(restart_policy="Never", containers=[
                client.V1Container(name="main", image="busybox")])))
        pod = wait_for(_phase(core, ns, "nocmd"), 30, "nocmd")
        assert pod.status.phase == "Failed"
        assert pod.status.container_statuses[0].state.terminated.reason == "NoCommand"


    def test_stopped_agent_marks_node_not_ready(self, cluster: dict[str, Any], core: Any,
                                               ready_nodes: list[Any]) -> None:
        stop = subprocess.run(
            [sys.executable, "-m", "pqfed.cli", "node-agent", "--name", NODES[1], "--stop"],
            env=cluster["env"], capture_output=True, text=True, timeout=60, check=False)
        assert stop.returncode == 0, stop.stderr
        node = core.read_node(NODES[1])
        ready = next(c for c in node.status.conditions if c.type == "Ready")
        assert ready.status == "False"
        assert cluster["agents"][1].wait(timeout=10) == 0


# -- units (no root, no cluster) ----------------------------------------------------------------
def test_quantities_and_labels() -> None:
    from pqfed.testbed.nodeagent.config import default_node_index, parse_labels, parse_quantity

    assert parse_quantity("500m") == 0.5
    assert parse_quantity("4Gi") == 4 * 2**30
    assert parse_quantity("1.5") == 1.5
    assert parse_quantity("128974848") == 128974848
    assert parse_quantity("1e3") == 1000
    with pytest.raises(ValueError):
        parse_quantity("4 GB")
    assert parse_labels("a=b, c=d") == {"a": "b", "c": "d"}
    assert default_node_index("pi-0") == 1
    assert default_node_index("pi-12") == 13
    assert 1 <= default_node_index("aggregator") <= 254


def test_env_resolution_and_expansion() -> None:
    from pqfed.testbed.nodeagent.podspec import container_argv, container_env, expand

    assert expand("$(A)-$$(A)-$(B)-$(", {"A": "x"}) == "x-$(A)-$(B)-$("

    class Refs:  # stands in for RefResolver (no API server)
        def data(self, kind: str, name: str, optional: bool = False) -> dict[str, bytes]:
            return {"ROUND": b"3", "KEM": b"ML-KEM-768"} if name == "cfg" else {}

        def key(self, kind: str, ref: dict[str, Any]) -> str:
            return f"{kind}:{ref['name']}/{ref['key']}"

    pod = {"metadata": {"name": "p", "namespace": "ns", "uid": "u", "labels": {"a": "1"}},
           "spec": {"nodeName": "pi-0", "containers": []},
           "status": {"podIP": "10.88.1.2"}}
    ctr = {
        "name": "main",
        "command": ["echo", "$(GREETING)"],
        "args": ["$(POD)"],
        "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
        "env": [
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "LABEL", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['a']"}}},
            {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
            {"name": "GREETING", "value": "hi $(POD) round $(CFG_ROUND)"},
        ],
    }
    env = container_env(pod, ctr, {"PATH": "/bin"}, Refs(), {})
    assert env["CFG_KEM"] == "ML-KEM-768"
    assert (env["POD"], env["IP"], env["LABEL"]) == ("p", "10.88.1.2", "1")
    assert env["PW"] == "Secret:s/k"
    assert env["GREETING"] == "hi p round 3"
    assert container_argv(ctr, env) == ["echo", "hi p round 3", "p"]
    assert container_argv({"name": "x", "args": ["serve"]}, env) == ["serve"]


def test_atomic_volume_writer(tmp_path: Path) -> None:
    from pqfed.testbed.nodeagent.volumes import write_atomic

    vol = tmp_path / "vol"
    assert write_atomic(vol, {"tls.crt": (b"one", 0o644), "dir/key": (b"k", 0o600)})
    assert (vol / "tls.crt").read_bytes() == b"one"
    assert (vol / "tls.crt").is_symlink() and (vol / "..data").is_symlink()
    assert oct((vol / "dir" / "key").stat().st_mode & 0o777) == oct(0o600)
    assert not write_atomic(vol, {"tls.crt": (b"one", 0o644), "dir/key": (b"k", 0o600)})
    assert write_atomic(vol, {"tls.crt": (b"two", 0o644)})
    assert (vol / "tls.crt").read_bytes() == b"two"
    assert not (vol / "dir").exists()
    assert len([p for p in vol.iterdir() if p.name.startswith("..")]) == 2  # ..data + payload


def test_hosts_file_maps_services_to_ready_endpoints() -> None:
    from pqfed.testbed.nodeagent.hosts import ServiceHosts

    hosts = ServiceHosts(None, "10.88.0.1", lambda: None)

    def eps(ns: str, svc: str, *endpoints: tuple[str, bool, str | None]) -> dict[str, Any]:
        return {"metadata": {"namespace": ns, "name": f"{svc}-x",
                             "labels": {"kubernetes.io/service-name": svc}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": [ip], "conditions": {"ready": ready},
                               **({"hostname": h} if h else {})} for ip, ready, h in endpoints]}

    hosts._slices = {
        ("fl", "agg-x"): eps("fl", "agg", ("10.88.1.2", True, "agg-0"), ("10.88.2.2", False, None)),
        ("fl", "web-x"): eps("fl", "web", ("10.88.1.3", True, None), ("10.88.2.3", True, None)),
        ("other", "db-x"): eps("other", "db", ("10.88.3.2", True, None)),
        ("other", "down-x"): eps("other", "down", ("10.88.3.3", False, None)),
    }
    assert hosts._recompute()
    pod = {"metadata": {"name": "c", "namespace": "fl", "uid": "u1"}, "spec": {}}
    text = hosts.render(pod, "10.88.1.9")
    lines = {line.split("\t")[1].split()[0]: line.split("\t")[0]
             for line in text.splitlines() if "\t" in line}
    assert lines["agg"] == "10.88.1.2"  # the only ready endpoint
    assert lines["agg-0.agg"] == "10.88.1.2"
    assert lines["db.other"] == "10.88.3.2"  # other namespace: no short name
    assert "db" not in lines and "down.other" not in lines
    assert lines["c"] == "10.88.1.9"
    assert lines["kubernetes.default"] == "10.88.0.1"
    chosen = lines["web"]
    assert chosen in ("10.88.1.3", "10.88.2.3")
    assert "web.fl.svc.cluster.local" in text
    # Sticky while ready, even when another endpoint appears.
    hosts._slices[("fl", "web-x")] = eps("fl", "web", ("10.88.1.3", True, None),
                                         ("10.88.2.3", True, None), ("10.88.3.9", True, None))
    hosts._recompute()
    assert f"{chosen}\tweb " in hosts.render(pod, "10.88.1.9")


def test_cgroup_v2_layout(tmp_path: Path) -> None:
    from pqfed.testbed.nodeagent.cgroups import Cgroups, Limits

    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    cg = Cgroups("pi-0", root=tmp_path)
    assert cg.version == 2 and cg.available
    cg.ensure(None, Limits(cpu_cores=1.0))
    procs = cg.ensure(Path("pod-u") / "main", Limits(cpu_cores=0.25, memory_bytes=64 << 20))
    assert procs == [tmp_path / "pqfed" / "pi-0" / "pod-u" / "main" / "cgroup.procs"]
    assert (tmp_path / "pqfed" / "pi-0" / "cpu.max").read_text() == "100000 100000"
    assert cg.cpu_file(Path("pod-u/main")).read_text() == "25000 100000"
    assert (tmp_path / "pqfed" / "pi-0" / "pod-u" / "main" / "memory.max").read_text() == str(
        64 << 20)
    assert "+cpu" in (tmp_path / "pqfed" / "cgroup.subtree_control").read_text()


def test_ipam_next_fit() -> None:
    from pqfed.testbed.nodeagent.network import Ipam

    ipam = Ipam("10.88", 3)
    a, b = ipam.allocate("a"), ipam.allocate("b")
    assert (a, b) == ("10.88.3.2", "10.88.3.3")
    assert ipam.allocate("a") == a
    ipam.release("a")
    assert ipam.allocate("c") == "10.88.3.4"  # a's address is not reused at once


def test_shim_records_exit_codes_and_start_errors(tmp_path: Path) -> None:
    shim = REPO / "testbed" / "nodeagent" / "shim.py"

    def run(argv: list[str]) -> tuple[dict[str, Any], str]:
        spec = tmp_path / "spec.json"
        exit_file, pid_file, log = tmp_path / "c.exit", tmp_path / "c.pid", tmp_path / "c.log"
        for f in (exit_file, pid_file):
            f.unlink(missing_ok=True)
        spec.write_text(json.dumps({
            "argv": argv, "env": {"PATH": "/usr/bin:/bin", "X": "42"}, "cwd": str(tmp_path),
            "netns": None, "hostname": None, "mount_namespace": False, "mounts": [],
            "cgroups": [], "exit_file": str(exit_file), "pid_file": str(pid_file),
        }))
        with open(log, "wb") as out:
            subprocess.run([sys.executable, "-I", "-S", str(shim), str(spec)], stdout=out,
                           stderr=subprocess.STDOUT, start_new_session=True, timeout=30,
                           check=False)
        assert not spec.exists()  # may hold secrets: deleted once read
        return json.loads(exit_file.read_text()), log.read_text()

    result, out = run(["sh", "-c", "echo x=$X in $(pwd); exit 7"])
    assert result["exitCode"] == 7
    assert f"x=42 in {tmp_path}" in out
    result, _ = run(["sh", "-c", "kill -TERM $$"])
    assert (result["exitCode"], result["signal"]) == (143, 15)
    result, out = run(["no-such-program-pqfed"])
    assert (result["exitCode"], result["reason"]) == (128, "StartError")
    assert "no-such-program-pqfed" in out


@pytest.mark.skipif(os.geteuid() != 0, reason="a private mount namespace needs root")
def test_volume_over_the_clone_does_not_hide_the_runtime() -> None:
    """The chart's emptyDir at /tmp hid a clone under /tmp: every e2e pod failed to exec."""
    from pqfed.testbed.nodeagent.config import runtime_paths

    shim = REPO / "testbed" / "nodeagent" / "shim.py"
    runtime = runtime_paths()
    assert REPO in runtime or any(REPO.is_relative_to(p) for p in runtime)
    # The shim writes its exit file after the volumes are mounted: keep its files outside the
    # folder the volume hides (with a clone under /tmp, pytest's tmp_path is hidden too).
    outside = next(Path(d) for d in ("/var/tmp", "/run", "/dev/shm")
                   if Path(d).is_dir() and not Path(d).resolve().is_relative_to(REPO.parent))
    state = Path(tempfile.mkdtemp(prefix="pqfed-shim-", dir=outside))
    empty = state / "empty"
    empty.mkdir()
    spec = state / "spec.json"
    exit_file, pid_file, log = state / "c.exit", state / "c.pid", state / "c.log"
    # A volume mounted on the clone's parent folder, as an emptyDir at /tmp is for /tmp/clone.
    spec.write_text(json.dumps({
        "argv": [sys.executable, "-c", "import pqfed.cli, pathlib, sys; "
                 f"print('ok', pathlib.Path({str(REPO)!r}, 'pyproject.toml').is_file(), "
                 f"sorted(p.name for p in pathlib.Path({str(REPO.parent)!r}).iterdir()))"],
        "env": {"PATH": "/usr/bin:/bin"}, "cwd": "/", "netns": None, "hostname": None,
        "mount_namespace": True, "cgroups": [], "runtime": [str(p) for p in runtime],
        "mounts": [{"source": str(empty), "target": str(REPO.parent), "readonly": False}],
        "exit_file": str(exit_file), "pid_file": str(pid_file),
    }))
    with open(log, "wb") as out:
        subprocess.run([sys.executable, "-I", "-S", str(shim), str(spec)], stdout=out,
                       stderr=subprocess.STDOUT, start_new_session=True, timeout=60, check=False)
    try:
        output = log.read_text()
        assert json.loads(exit_file.read_text())["exitCode"] == 0, output
        # The volume is there (only the runtime's folder shows through it), the runtime runs.
        assert f"ok True {[REPO.name]!r}" in output, output
        assert any(REPO.parent.iterdir())  # the host's folder is untouched
    finally:
        shutil.rmtree(state, ignore_errors=True)
