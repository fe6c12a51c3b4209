"""`pqfed operator run|check`, `pqfed submit|status|logs|cancel` against a kubeconfig."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

from pqfed.operator.reconcile import CANCEL_ANNOTATION
from pqfed.services import (
    API_GROUP,
    API_VERSION,
    JOB_LABEL,
    KIND,
    LOG_DIR_ANNOTATION,
    PLURAL,
    FederationJobSpec,
    JobSpecError,
    load_job,
)

__all__ = ["CANCEL_ANNOTATION", "register"]


def _clients(args: argparse.Namespace) -> Any:
    from pqfed.operator.kube import load_clients

    return load_clients(getattr(args, "kubeconfig", None))


def _submit(args: argparse.Namespace) -> int:
    from kubernetes.client.exceptions import ApiException

    try:
        job = load_job(Path(args.file))
    except JobSpecError as exc:  # refuse before anything reaches the cluster
        print(f"pqfed: {exc}", file=sys.stderr)
        return 2
    ns = args.namespace or job.namespace
    body = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND,
            "metadata": {"name": job.name, "namespace": ns},
            "spec": job.spec.model_dump(by_alias=True, exclude_none=True)}
    c = _clients(args)
    try:
        c.custom.create_namespaced_custom_object(API_GROUP, API_VERSION, ns, PLURAL, body)
    except ApiException as exc:
        print(f"pqfed: the API server refused {job.name}: {_api_reason(exc)}", file=sys.stderr)
        return 2
    print(f"federationjob.pqfed.io/{job.name} created in {ns}")
    return 0


def _api_reason(exc: Any) -> str:
    try:
        body = json.loads(exc.body)
        return str(body.get("message", exc.reason))
    except (TypeError, ValueError):
        return str(exc.reason)


def _age(ts: str | None) -> str:
    if not ts:
        return "-"
    t = dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))
    s = int((dt.datetime.now(dt.UTC) - t).total_seconds())
    return f"{s // 3600}h{s % 3600 // 60}m" if s >= 3600 else f"{s // 60}m{s % 60}s"


def _status(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from pqfed.operator.kube import get_job, list_jobs

    c = _clients(args)
    console = Console()
    while True:
        if args.name:
            job = get_job(c, args.namespace or "default", args.name)
            _print_job(console, job)
        else:
            table = Table(title="FederationJobs")
            for col in ("NAMESPACE", "NAME", "PHASE", "ROUND", "ACCURACY", "AGE"):
                table.add_column(col)
            for job in list_jobs(c, args.namespace):
                st = job.get("status", {})
                acc = st.get("accuracy")
                table.add_row(job["metadata"]["namespace"], job["metadata"]["name"],
                              st.get("phase", "Pending"),
                              f"{st.get('currentRound', 0)}/{job['spec'].get('rounds', '?')}",
                              f"{acc:.3f}" if isinstance(acc, float) else "-",
                              _age(job["metadata"].get("creationTimestamp")))
            console.print(table)
        if not args.watch:
            return 0
        time.sleep(2)
        console.clear()


def _print_job(console: Any, job: dict[str, Any]) -> None:
    from rich.table import Table

    st = job.get("status", {})
    console.print(f"[bold]{job['metadata']['name']}[/] ({job['metadata']['namespace']}): "
                  f"{st.get('phase', 'Pending')}, round {st.get('currentRound', 0)}/"
                  f"{job['spec'].get('rounds')}  {st.get('message', '')}")
    rounds = Table(title="rounds")
    for col in ("round", "accuracy", "loss", "bytes sent", "bytes received", "crypto s",
                "duration s", "participants", "rejected"):
        rounds.add_column(col)
    for r in st.get("rounds", []):
        rounds.add_row(str(r.get("round")), f"{r.get('accuracy', 0):.4f}",
                       f"{r.get('loss', 0):.4f}", str(r.get("bytesSent")),
                       str(r.get("bytesReceived")), f"{r.get('cryptoSeconds', 0):.3f}",
                       f"{r.get('durationSeconds', 0):.1f}",
                       ",".join(r.get("participants", [])), str(r.get("rejectedUpdates", 0)))
    console.print(rounds)
    conds = Table(title="conditions")
    for col in ("type", "status", "reason", "message"):
        conds.add_column(col)
    for cond in st.get("conditions", []):
        conds.add_row(cond.get("type", ""), cond.get("status", ""), cond.get("reason", ""),
                      cond.get("message", ""))
    console.print(conds)


def _logs(args: argparse.Namespace) -> int:
    from kubernetes.client.exceptions import ApiException

    c = _clients(args)
    ns = args.namespace or "default"
    pods = c.core.list_namespaced_pod(ns, label_selector=f"{JOB_LABEL}={args.name}").items
    if args.pod:
        pods = [p for p in pods if p.metadata.name.endswith(args.pod)]
    if not pods:
        print(f"pqfed: no pods of job {args.name!r} in {ns}", file=sys.stderr)
        return 1
    for pod in pods:
        for container in pod.spec.containers:
            if args.container and container.name != args.container:
                continue
            print(f"==> {pod.metadata.name}/{container.name} <==")
            try:
                text = c.core.read_namespaced_pod_log(pod.metadata.name, ns,
                                                      container=container.name,
                                                      tail_lines=args.tail)
            except ApiException:
                # The emulated Pi nodes keep logs in files named by an annotation.
                log_dir = (pod.metadata.annotations or {}).get(LOG_DIR_ANNOTATION)
                path = Path(log_dir or "/nonexistent") / f"{container.name}.log"
                text = ("\n".join(path.read_text().splitlines()[-args.tail:])
                        if path.exists() else "(no logs available)")
            print(text)
    return 0


def _cancel(args: argparse.Namespace) -> int:
    c = _clients(args)
    ns = args.namespace or "default"
    c.custom.patch_namespaced_custom_object(
        API_GROUP, API_VERSION, ns, PLURAL, args.name,
        {"metadata": {"annotations": {CANCEL_ANNOTATION: "true"}}})
    print(f"federationjob.pqfed.io/{args.name} cancellation requested")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    """Adds `revoke.pqfed.io/<node>: <reason>` (a merge patch: concurrent revocations of other
    nodes never overwrite each other). The operator signs the next revocation list with the
    job's CA and every pod's sidecar cuts the node off once the list arrives."""
    from pqfed.operator.reconcile import REVOKE_PREFIX
    from pqfed.pqc import RevocationReason, check_name

    check_name("--node", args.node)
    reason = RevocationReason.parse(args.reason)
    c = _clients(args)
    ns = args.namespace or "default"
    c.custom.patch_namespaced_custom_object(
        API_GROUP, API_VERSION, ns, PLURAL, args.job,
        {"metadata": {"annotations": {f"{REVOKE_PREFIX}{args.node}": reason.label}}})
    print(f"federationjob.pqfed.io/{args.job}: revocation of {args.node} ({reason.label}) "
          "requested; see the NodesRevoked condition (pqfed status)")
    return 0


def _approve(args: argparse.Namespace) -> int:
    """Checks the site's request ConfigMap as the operator will, shows what it approves, and
    annotates the job `approve.pqfed.io/<node>: sha256:<key fingerprint>` (operator/
    enrolment.py); `--deny REASON` annotates `deny.pqfed.io/<node>` instead."""
    from kubernetes.client.exceptions import ApiException

    from pqfed.operator import enrolment
    from pqfed.operator.reconcile import CHANNEL_PROTOCOL, validate

    c = _clients(args)
    ns = args.namespace or "default"
    if args.deny is not None:
        note = {f"{enrolment.DENY_PREFIX}{args.node}": args.deny}
        c.custom.patch_namespaced_custom_object(API_GROUP, API_VERSION, ns, PLURAL, args.job,
                                                {"metadata": {"annotations": note}})
        print(f"federationjob.pqfed.io/{args.job}: request of {args.node} denied")
        return 0
    try:
        job = c.custom.get_namespaced_custom_object(API_GROUP, API_VERSION, ns, PLURAL,
                                                    args.job)
        cm = c.core.read_namespaced_config_map(
            enrolment.request_configmap_name(args.job, args.node), ns)
    except ApiException as exc:
        print(f"pqfed: {_api_reason(exc)}", file=sys.stderr)
        return 2
    spec = validate(args.job, job.get("spec") or {}, None,
                    (job.get("status") or {}).get(CHANNEL_PROTOCOL))
    if not isinstance(spec, FederationJobSpec):
        print(f"pqfed: job {args.job} is invalid: {spec}", file=sys.stderr)
        return 2
    try:
        uri, fingerprint = enrolment.approval(args.job, spec, args.node,
                                              (cm.data or {}).get(enrolment.CSR_KEY))
    except enrolment.EnrolmentRefused as exc:
        print(f"pqfed: not approved: {exc}", file=sys.stderr)
        return 2
    note = {f"{enrolment.APPROVE_PREFIX}{args.node}": fingerprint}
    c.custom.patch_namespaced_custom_object(API_GROUP, API_VERSION, ns, PLURAL, args.job,
                                            {"metadata": {"annotations": note}})
    print(f"approved {uri} key {fingerprint}; the operator publishes its certificate in "
          f"ConfigMap {enrolment.certificate_configmap_name(args.job, args.node)}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from pqfed.operator.kube import list_jobs

    c = _clients(args)
    from kubernetes import client

    groups = client.ApisApi(c.api).get_api_versions().groups
    served = any(g.name == API_GROUP and any(v.version == API_VERSION for v in g.versions)
                 for g in groups)
    if not served:
        print(f"{API_GROUP}/{API_VERSION} is not served: is the CRD installed?", file=sys.stderr)
        return 1
    jobs = list_jobs(c, args.namespace)
    print(f"ok: {API_GROUP}/{API_VERSION} {PLURAL} served, {len(jobs)} in "
          f"{args.namespace or 'all namespaces'}")
    return 0


def _run_operator(args: argparse.Namespace) -> int:
    from pqfed.operator.handlers import run_operator

    return run_operator(args)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def kube(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--kubeconfig")
        p.add_argument("-n", "--namespace")
        return p

    op = sub.add_parser("operator", help="the FederationJob operator")
    op_sub = op.add_subparsers(dest="operator_command", required=True)
    run = op_sub.add_parser("run", help="run the kopf operator")
    run.add_argument("--kubeconfig")
    run.add_argument("--namespace", action="append", default=[])
    run.add_argument("--all-namespaces", action="store_true")
    run.add_argument("--standalone", action="store_true")
    run.add_argument("--peering")
    run.add_argument("--metrics-port", type=int, default=8080)
    run.add_argument("--log-level", default="info")
    run.set_defaults(func=_run_operator)
    check = kube(op_sub.add_parser("check", help="is the CRD served? (helm test)"))
    check.set_defaults(func=_check)

    submit = kube(sub.add_parser("submit", help="submit a FederationJob YAML"))
    submit.add_argument("file")
    submit.set_defaults(func=_submit)
    status = kube(sub.add_parser("status", help="FederationJob status (rich table)"))
    status.add_argument("name", nargs="?")
    status.add_argument("-w", "--watch", action="store_true")
    status.set_defaults(func=_status)
    logs = kube(sub.add_parser("logs", help="logs of a FederationJob's pods"))
    logs.add_argument("name")
    logs.add_argument("--pod", help="aggregator or client-N")
    logs.add_argument("-c", "--container")
    logs.add_argument("--tail", type=int, default=200)
    logs.set_defaults(func=_logs)
    cancel = kube(sub.add_parser("cancel", help="cancel a FederationJob (keeps its record)"))
    cancel.add_argument("name")
    cancel.set_defaults(func=_cancel)
    revoke = kube(sub.add_parser("revoke", help="revoke a node of a running FederationJob: its "
                                 "certificates go on the job CA's revocation list"))
    revoke.add_argument("--job", required=True)
    revoke.add_argument("--node", required=True, help="node id, e.g. client-2, edge-0 or an "
                        "external client's (spec.externalClients)")
    revoke.add_argument("--reason", default="unspecified",
                        help="RFC 5280 reason: unspecified, key-compromise, "
                             "affiliation-changed, superseded, cessation-of-operation, "
                             "privilege-withdrawn")
    revoke.set_defaults(func=_revoke)
    approve = kube(sub.add_parser("approve", help="approve a site's certificate request "
                                  "(ConfigMap JOB-csr-NODE from `pqfed ca csr`) for a tls13 "
                                  "FederationJob; the key stays at the site"))
    approve.add_argument("--job", required=True)
    approve.add_argument("--node", required=True, help="the node id the site requested")
    approve.add_argument("--deny", metavar="REASON", help="deny the request instead")
    approve.set_defaults(func=_approve)
    from pqfed.operator import site

    site.register(sub)
