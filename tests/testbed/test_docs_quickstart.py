"""Every command of the docs' quickstarts runs, so none can rot.

The command blocks are marked in the markdown with `<!-- doc-test: NAME -->` on the line
before the fence: docs/helm.md's quickstart and its air-gapped Raspberry Pi k3s install,
and README.md's quickstart. The test reads them from the files, runs each command as written
(bash, from the repository root, `pqfed` and `helm` on PATH, KUBECONFIG of the session's
real-node cluster, tests/testbed/conftest.py) and fails when one fails or does not do what
the doc says. What cannot run on this host is in HERE below, with the reason and what runs
instead; nothing else is changed.
"""

from __future__ import annotations

import os
import re
import selectors
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pqfed.testbed.testing import wait_for

REPO = Path(__file__).resolve().parents[2]
MARKED = {"docs/helm.md": ("helm-quickstart", "airgap-build", "airgap-import",
                           "airgap-install"),
          "README.md": ("readme-quickstart",)}
BLOCK = re.compile(r"^<!-- doc-test: (?P<name>[a-z0-9-]+) -->\n```(?:sh|bash|console)\n"
                   r"(?P<body>.*?)^```$", re.S | re.M)
PI = "pi-0"  # the docs' Raspberry Pi
K3S_AIRGAP = "/var/lib/rancher/k3s/agent/images"


@dataclass(frozen=True)
class DocCommand:
    block: str
    text: str       # as written in the doc (continuations joined, comment dropped)


@dataclass(frozen=True)
class Here:
    """How a doc command runs on this host: `run` is None when it runs as written."""
    command: DocCommand
    run: str
    reason: str = ""


def _strip_comment(line: str) -> str:
    """The line without a trailing `# comment` (a `#` outside quotes after a blank)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def doc_commands(path: str) -> dict[str, list[DocCommand]]:
    """The marked blocks of `path` (relative to the repository), by name, as commands."""
    blocks: dict[str, list[DocCommand]] = {}
    for found in BLOCK.finditer((REPO / path).read_text()):
        name, body = found["name"], found["body"]
        assert name not in blocks, f"{path}: two blocks marked {name}"
        logical = re.sub(r"\\\n\s*", " ", body)  # continuation lines joined
        blocks[name] = [DocCommand(name, text) for line in logical.splitlines()
                        if (text := _strip_comment(line))]
    return blocks


def all_commands() -> list[DocCommand]:
    found: list[DocCommand] = []
    for path, names in MARKED.items():
        blocks = doc_commands(path)
        assert set(blocks) == set(names), (
            f"{path}: marked blocks {sorted(blocks)}, expected {sorted(names)}: a quickstart "
            "block lost its `<!-- doc-test: NAME -->` marker, or a new one needs an entry here")
        for name in names:
            assert blocks[name], f"{path}: block {name} has no command"
            found += blocks[name]
    return found


# ---- what cannot run here, and what runs instead ----

NOT_RECURSIVE = "it is the command that runs this test; `make -n test` checks the target"
NO_PI = (f"no Raspberry Pi here: `{PI}` is a directory on this host and `ssh {PI} 'CMD'` "
         "runs CMD with bash as root (no sudo), archives hard-linked rather than copied "
         "(3 GB)")
K3S = ("no k3s here: the real node's containerd plays k3s's (`k3s ctr` = `node.sh ctr`, same "
       f"`k8s.io` namespace; the air-gap directory {K3S_AIRGAP} = the node's "
       "$PQFED_AIRGAP_DIR, which it imports from at start, as k3s does)")
WATCH = "`-w` watches until Ctrl-C: stopped (SIGINT) once it shows the job Succeeded"


def on_this_host(cmd: DocCommand, pi_root: Path, airgap: str) -> Here:
    """The command to run here for `cmd`, and why it differs from the doc (if it does)."""
    text = cmd.text
    if text == "make test":
        return Here(cmd, "make -n test", NOT_RECURSIVE)
    words = shlex.split(text)
    if words[0] == "scp":
        *sources, dest = words[1:]
        assert dest.startswith(f"{PI}:"), f"scp to an unknown host: {text}"
        target = str(pi_root) + dest.removeprefix(f"{PI}:")
        return Here(cmd, f"cp -l {' '.join(sources)} {shlex.quote(target)}", NO_PI)
    if words[0] == "ssh":
        assert words[1] == PI and len(words) == 3, f"ssh to an unknown host or form: {text}"
        remote = words[2].replace("sudo ", "")
        remote = re.sub(r"\bcp /tmp/", "cp -l /tmp/", remote)
        # The Pi's /tmp first: the air-gap directory on this host may itself be under /tmp.
        remote = remote.replace("/tmp/", f"{pi_root}/tmp/")
        remote = remote.replace(K3S_AIRGAP, airgap)
        uses_k3s = "k3s " in remote
        remote = remote.replace("k3s ctr ", f"bash {REPO}/testbed/cluster/node.sh ctr ")
        reason = NO_PI + ("; " + K3S if uses_k3s else "")
        return Here(cmd, remote, reason)
    if words[-1] in ("-w", "--watch"):
        return Here(cmd, text, WATCH)
    return Here(cmd, text)


def test_every_quickstart_block_is_marked_and_each_command_has_a_way_to_run(
        tmp_path: Path) -> None:
    """No cluster needed: the marked blocks are all there and every command either runs
    as written or has its reason and equivalent in on_this_host."""
    commands = all_commands()
    plans = [on_this_host(c, tmp_path, "/airgap") for c in commands]
    changed = {p.command.text: p.reason for p in plans if p.reason}
    as_written = [p.command.text for p in plans if not p.reason]
    assert "helm install pqfed charts/pqfed -n pqfed-system --create-namespace" in as_written
    assert "kubectl apply -f examples/jobs/demo.yaml" in as_written
    assert "make images" in as_written and "make demo" in as_written
    assert all(changed.values()), changed
    # Only the Pi, k3s, the watch and `make test` itself are run differently.
    assert {p.reason for p in plans if p.reason} <= {NOT_RECURSIVE, NO_PI, f"{NO_PI}; {K3S}",
                                                     WATCH}
    for p in plans:
        assert "k3s" not in p.run and "ssh" not in p.run and "sudo" not in p.run, p


def test_the_air_gap_directory_is_not_moved_under_the_pis_tmp(tmp_path: Path) -> None:
    """The test cluster's air-gap directory is under /tmp (pytest's basetemp); rewriting the
    Pi's /tmp must not rewrite it too (CI copied the archives into pi-0/tmp/tmp/...)."""
    pi_root, airgap = tmp_path / "pi-0", "/tmp/pytest-of-root/realnode0/node/agent/images"
    runs = " ".join(on_this_host(c, pi_root, airgap).run for c in all_commands())
    assert f"{pi_root}/tmp/pqfed-*-0.1.0.oci.tar {airgap}/" in runs, runs
    assert f"{pi_root}{airgap}" not in runs and f"{pi_root}/tmp{airgap}" not in runs, runs


# ---- running them on the real node ----


def _tools(cluster: dict[str, str], home: Path) -> dict[str, str]:
    cache = Path(os.environ.get("PQFED_CACHE", Path.home() / ".cache" / "pqfed"))
    helm = cache / "bin" / "helm"
    if not helm.is_file():
        pytest.skip("no helm binary: run `make cluster-binaries` (make test does)")
    venv_bin = Path(sys.executable).parent
    path = os.pathsep.join([str(venv_bin), str(helm.parent), os.environ.get("PATH", "")])
    # HOME is the test's own (helm's config and cache); the project's caches stay shared.
    env = {**cluster, "PATH": path, "HOME": str(home), "VENV": str(venv_bin.parent),
           "PQFED_CACHE": str(cache)}
    kubectl = subprocess.run(["bash", "-c", "command -v kubectl"], env=env,
                             capture_output=True, text=True, check=False).stdout.strip()
    if not kubectl:
        pytest.skip("kubectl is not installed (the docs use it; the project builds none)")
    return env


def _run(here: Here, env: dict[str, str], timeout: float = 900) -> str:
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", here.run], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, (
        f"doc command failed ({proc.returncode}) in block {here.command.block}:\n"
        f"  doc:  {here.command.text}\n  ran:  {here.run}\n{proc.stdout[-3000:]}\n"
        f"{proc.stderr[-3000:]}")
    return proc.stdout


def _watch_until(here: Here, env: dict[str, str], done: str, timeout: float) -> str:
    """Runs a watching command until its output shows `done`; then stops it as Ctrl-C would."""
    proc = subprocess.Popen(["bash", "-c", f"exec {here.run}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        while done.encode() not in seen:
            assert time.monotonic() < deadline, (
                f"`{here.command.text}` did not show {done!r} in {timeout:.0f}s:\n"
                f"{seen[-3000:].decode(errors='replace')}")
            if sel.select(timeout=2):
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:  # end of output: it exited
                    raise AssertionError(
                        f"`{here.command.text}` exited ({proc.wait(timeout=30)}) before "
                        f"showing {done!r}:\n{seen[-3000:].decode(errors='replace')}")
                seen += chunk
        assert proc.poll() is None, f"`{here.command.text}` stopped watching by itself"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        sel.close()
        proc.stdout.close()
    return seen.decode(errors="replace")


@pytest.fixture
def doc_env(real_cluster: dict[str, str], real_api: Any,
            tmp_path: Path) -> Iterator[dict[str, str]]:
    """The docs' shell on this host; afterwards the demo job and the release are removed
    (the other real-node tests install the chart under the same name)."""
    env = _tools(real_cluster, tmp_path / "home")
    (tmp_path / "home").mkdir()
    yield env
    from kubernetes import client

    custom = client.CustomObjectsApi(real_api)

    def jobs() -> list[dict[str, Any]]:
        try:
            return list(custom.list_namespaced_custom_object(
                "pqfed.io", "v1alpha1", "default", "federationjobs")["items"])
        except client.exceptions.ApiException as exc:
            if exc.status == 404:  # the CRD was never installed
                return []
            raise

    for job in jobs():
        custom.delete_namespaced_custom_object("pqfed.io", "v1alpha1", "default",
                                               "federationjobs", job["metadata"]["name"])
    wait_for(lambda: not jobs(), 120,
             "the docs' jobs to be deleted (the operator removes its finalizer)")
    gone = subprocess.run(["helm", "uninstall", "pqfed", "-n", "pqfed-system", "--wait",
                           "--timeout", "120s", "--ignore-not-found"], env=env,
                          capture_output=True, text=True, timeout=180, check=False)
    assert gone.returncode == 0, f"helm uninstall failed:\n{gone.stderr}"


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.real_node
@pytest.mark.images
def test_docs_quickstart_commands_run_on_the_real_node(doc_env: dict[str, str],
                                                       real_cluster: dict[str, str],
                                                       real_api: Any, tmp_path: Path) -> None:
    """The air-gapped install (build, import, install, submit, watch), then the rest of the
    Helm quickstart (helm test, kubectl get fj, pqfed status) and README's `make demo`, in
    that order, against one real node; a command that is the same as one already run (the
    quickstart's `helm install`, `kubectl apply`) is not run twice."""
    pi_root = tmp_path / "pi-0"
    (pi_root / "tmp").mkdir(parents=True)
    airgap = real_cluster["PQFED_AIRGAP_DIR"]
    blocks = {**doc_commands("docs/helm.md"), **doc_commands("README.md")}
    order = ("airgap-build", "airgap-import", "airgap-install", "helm-quickstart",
             "readme-quickstart")
    done: set[str] = set()
    outputs: dict[str, str] = {}
    for name in order:
        for cmd in blocks[name]:
            if cmd.text in done:
                continue
            here = on_this_host(cmd, pi_root, airgap)
            if here.reason == WATCH:
                outputs[cmd.text] = _watch_until(here, doc_env, "demo (default): Succeeded",
                                                 900)
            else:
                outputs[cmd.text] = _run(here, doc_env)
            done.add(cmd.text)

    # What the docs say each step shows.
    listing = next(out for text, out in outputs.items() if "ctr images ls" in text)
    for image in ("operator", "sidecar", "fl"):
        assert f"localhost/pqfed/{image}:0.1.0" in listing, listing
    for image in ("operator", "sidecar", "fl"):  # copied into the air-gap directory too
        assert (Path(airgap) / f"pqfed-{image}-0.1.0.oci.tar").is_file()
    get_fj = outputs["kubectl get fj"]
    assert re.search(r"^demo\s+Succeeded\s+5\s+5\s", get_fj, re.M), get_fj
    assert "demo (default): Succeeded, round 5/5" in outputs["pqfed status demo"]
    from kubernetes import client

    st = client.CustomObjectsApi(real_api).get_namespaced_custom_object(
        "pqfed.io", "v1alpha1", "default", "federationjobs", "demo")["status"]
    assert st["phase"] == "Succeeded" and [r["round"] for r in st["rounds"]] == [1, 2, 3, 4, 5]
    (agg,) = client.CoreV1Api(real_api).list_namespaced_pod(
        "default", label_selector="pqfed.io/job=demo,pqfed.io/role=aggregator").items
    assert agg.spec.node_name == real_cluster["PQFED_REAL_NODE_NAME"]
