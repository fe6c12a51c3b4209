"""`pqfed site fetch|run`: an external node run by its site, from what the site holds.

A site enrolled into a tls13 FederationJob (operator/enrolment.py, docs/pki.md) holds its own
ML-DSA-65 key (`pqfed ca csr`, tls.key, never sent anywhere) and fetches from ConfigMap
`JOB-cert-NODE` its X.509 certificate, the job's X.509 CA and CRL and the job's spec
(`pqfed site fetch`: tls.crt, ca.crt, crl.pem, spec.json beside tls.key). `pqfed site run`
then runs what an operator-run client pod runs, as two host processes:

* `pqfed sidecar --protocol tls13` on the site's certificate and key, with a route from a
  loopback port to the aggregator's PQC port pinned to the node id `aggregator`;
* `pqfed fl client` (SuperNode + ClientApp) dialling that route, with the site directory as
  its identity directory: its updates are signed with the site's key
  (services/mods.py, pqc/signing.py `sign_update_x509`).

No new transport: the aggregator sees one more TLS 1.3 client of its job's CA. Before
starting, the directory is checked (`check_site`): every file present, the certificate the
job's CA issued for this key, a client of this job listed in `spec.externalClients`; each
problem is a `SiteError` naming the file or field and the fix. With `--job`,
`run` re-fetches the ConfigMap every `--refresh` seconds, so the site's sidecar takes every
newer CRL the operator publishes (and stays inside its nextUpdate).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pqfed.operator import enrolment
from pqfed.operator import pods as m
from pqfed.pqc import CertificateError, Role
from pqfed.pqc.pki import Usage, X509TrustAnchor
from pqfed.pqc.pki.profile import NodeCertificate, load_certificate_pem, load_private_key_pem
from pqfed.pqc.sidecar.config import ADMIN_PORT
from pqfed.pqc.truststore import CRL_FILE
from pqfed.services import (
    ROUTE_PORT,
    RUNTIME_PORT,
    FederationJobSpec,
    JobSpecError,
    ManagedProcess,
    load_spec,
)

KEY_FILE: Final = "tls.key"
FETCHED: Final = (enrolment.CERT_KEY, enrolment.CA_KEY, CRL_FILE, m.SPEC_FILE)


class SiteError(ValueError):
    """The site directory cannot run a node: `field` names the file or field, the message
    says how to fix it."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class Site:
    """A checked site directory: who it is and for which job."""

    directory: Path
    job: str
    spec: FederationJobSpec
    node: NodeCertificate


def check_site(directory: Path) -> Site:
    """Everything `pqfed site run` needs, checked before anything starts."""
    if not (directory / KEY_FILE).is_file():
        raise SiteError(KEY_FILE, f"missing in {directory}; make the key and request on this "
                                  "site with `pqfed ca csr --out DIR` (docs/pki.md)")
    for name in FETCHED:
        if not (directory / name).is_file():
            raise SiteError(name, f"missing in {directory}; fetch the job's ConfigMap "
                                  "JOB-cert-NODE with `pqfed site fetch` once the request "
                                  "is approved")
    try:
        job_name, spec = load_spec(directory / m.SPEC_FILE)
    except (JobSpecError, ValueError, KeyError) as exc:
        raise SiteError(m.SPEC_FILE, f"not a job spec: {exc}; fetch it again") from None
    try:
        key = load_private_key_pem((directory / KEY_FILE).read_bytes(), KEY_FILE)
        cert = load_certificate_pem((directory / enrolment.CERT_KEY).read_bytes(),
                                    enrolment.CERT_KEY)
        trust = X509TrustAnchor(load_certificate_pem(
            (directory / enrolment.CA_KEY).read_bytes(), enrolment.CA_KEY))
        node = trust.verify(cert, roles=(Role.CLIENT,), usage=Usage.CLIENT)
    except CertificateError as exc:
        raise SiteError(f"{enrolment.CERT_KEY}.{exc.field}", f"{exc.reason}; fetch the "
                        "certificate the job's CA issued for this site again") from None
    if cert.public_key() != key.public_key():
        raise SiteError(KEY_FILE, f"is not the key of {enrolment.CERT_KEY} ({node.uri}); the "
                                  "certificate was issued for another request")
    if node.federation != job_name:
        raise SiteError(m.SPEC_FILE, f"job {job_name!r} is not the certificate's "
                                     f"{node.federation!r}; fetch both from the same job")
    if spec.channel.protocol != "tls13":
        raise SiteError("spec.channel.protocol", "external nodes join tls13 jobs only")
    if node.node_id not in spec.external_node_ids:
        raise SiteError("spec.externalClients", f"{node.node_id!r} is not listed; ask the job "
                                                "admin to add it to spec.externalClients")
    return Site(directory, job_name, spec, node)


def _write_atomic(path: Path, text: str) -> bool:
    """Replaces `path` by `text` in one rename (a running sidecar never reads half a file);
    returns whether it changed."""
    if path.is_file() and path.read_text() == text:
        return False
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return True


def write_fetched(data: dict[str, str], directory: Path) -> list[str]:
    """Writes a JOB-cert-NODE ConfigMap's data into the site directory; returns the names of
    the files that changed."""
    missing = [k for k in FETCHED if not data.get(k)]
    if missing:
        raise SiteError(missing[0], "not in the ConfigMap yet; is the request approved "
                                    "(`pqfed approve`) and the job tls13?")
    directory.mkdir(parents=True, exist_ok=True)
    return [name for name in FETCHED if _write_atomic(directory / name, data[name])]


def _fetch_data(args: argparse.Namespace) -> dict[str, str]:
    from kubernetes.client.exceptions import ApiException

    from pqfed.operator.kube import load_clients

    c = load_clients(args.kubeconfig)
    name = enrolment.certificate_configmap_name(args.job, args.node)
    try:
        cm = c.core.read_namespaced_config_map(name, args.namespace or "default")
    except ApiException as exc:
        raise SiteError(name, f"cannot be read ({exc.status} {exc.reason}); it appears once "
                              "a job admin approved the request (`pqfed approve`)") from None
    return dict(cm.data or {})


def _fetch(args: argparse.Namespace) -> int:
    changed = write_fetched(_fetch_data(args), Path(args.out))
    print(f"{args.out}: {', '.join(changed) if changed else 'nothing'} updated from ConfigMap "
          f"{enrolment.certificate_configmap_name(args.job, args.node)}")
    return 0


def node_commands(site: Site, aggregator: str, partition: int, state: Path, *,
                  route_port: int, runtime_port: int, admin_port: int
                  ) -> dict[str, list[str]]:
    """The two processes of an external node: what a client pod runs (operator/pods.py),
    on the site's files."""
    d = site.directory
    pqfed = [sys.executable, "-m", "pqfed.cli"]
    return {
        "sidecar": [*pqfed, "sidecar", "--protocol", "tls13",
                    "--cert", str(d / enrolment.CERT_KEY), "--key", str(d / KEY_FILE),
                    "--ca", str(d / enrolment.CA_KEY), "--crl", str(d / CRL_FILE),
                    "--route", f"127.0.0.1:{route_port}={aggregator}@{m.AGGREGATOR_NODE_ID}",
                    "--admin", f"127.0.0.1:{admin_port}"],
        "fl": [*pqfed, "fl", "client", "--spec", str(d / m.SPEC_FILE),
               "--index", str(partition), "--identity-dir", str(d),
               "--state-dir", str(state), "--superlink", f"127.0.0.1:{route_port}",
               "--runtime-port", str(runtime_port)],
    }


def _run(args: argparse.Namespace) -> int:
    directory = Path(args.dir).resolve()
    refresh = bool(args.job)
    if refresh:
        write_fetched(_fetch_data(argparse.Namespace(**{**vars(args), "node": args.node or
                                                        _node_of(directory)})), directory)
    site = check_site(directory)
    if not 0 <= args.partition < site.spec.clients:
        raise SiteError("--partition", f"{args.partition} is not in [0, {site.spec.clients}) "
                                       "(the task's public dataset has one partition per "
                                       "operator client)")
    state = Path(args.state_dir or directory / "state").resolve()
    cmds = node_commands(site, args.aggregator, args.partition, state,
                         route_port=args.route_port, runtime_port=args.runtime_port,
                         admin_port=args.admin_port)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [ManagedProcess(name, argv, state / "logs" / f"{name}.log", env, state)
             for name, argv in cmds.items()]
    stop = False

    def _stop(_sig: int, _frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"{site.node.uri}: job {site.job}, aggregator {args.aggregator}; logs in "
          f"{state / 'logs'}", flush=True)
    for p in procs:
        p.start()
    next_fetch = time.monotonic() + args.refresh
    try:
        while not stop and all(p.running for p in procs):
            time.sleep(0.5)
            if refresh and time.monotonic() >= next_fetch:
                next_fetch = time.monotonic() + args.refresh
                try:
                    changed = write_fetched(_fetch_data(argparse.Namespace(
                        **{**vars(args), "node": site.node.node_id})), directory)
                except Exception as exc:  # the API server may be away: keep running
                    print(f"refresh failed (next in {args.refresh}s): {exc}", flush=True)
                else:
                    if changed:
                        print(f"refreshed {', '.join(changed)}", flush=True)
        ended = [p for p in procs if not p.running]
        for p in ended:
            print(f"{p.name} exited {p.returncode}:\n{p.tail()}", file=sys.stderr)
        return 0 if stop else 1
    finally:
        for p in reversed(procs):
            p.stop()


def _node_of(directory: Path) -> str:
    """The node id of the site's certificate, or of its request before the first fetch."""
    from cryptography import x509

    from pqfed.pqc.pki.profile import read_node_uri

    crt, csr = directory / enrolment.CERT_KEY, directory / enrolment.CSR_KEY
    if crt.is_file():
        return read_node_uri(load_certificate_pem(crt.read_bytes())).node_id
    if csr.is_file():
        return read_node_uri(x509.load_pem_x509_csr(csr.read_bytes())).node_id
    raise SiteError("--node", "give the node id (no tls.crt or tls.csr in the directory)")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    site = sub.add_parser("site", help="run an external node of a tls13 FederationJob from "
                          "the site's own key (docs/pki.md)")
    site_sub = site.add_subparsers(dest="site_command", required=True)

    def kube(p: argparse.ArgumentParser, required: bool) -> None:
        p.add_argument("--kubeconfig", help="default: $KUBECONFIG, ~/.kube/config")
        p.add_argument("-n", "--namespace")
        p.add_argument("--job", required=required, help="the FederationJob")

    fetch = site_sub.add_parser("fetch", help="write ConfigMap JOB-cert-NODE (certificate, "
                                "CA, CRL, job spec) into the site directory")
    kube(fetch, True)
    fetch.add_argument("--node", required=True, help="the site's node id")
    fetch.add_argument("--out", required=True, help="the site directory (with tls.key)")
    fetch.set_defaults(func=_fetch)
    run = site_sub.add_parser("run", help="the site's TLS 1.3 sidecar + Flower client, until "
                              "stopped (SIGTERM/SIGINT) or one of them exits")
    run.add_argument("--dir", required=True, help="the site directory: tls.key from `pqfed "
                     "ca csr`, the rest from `pqfed site fetch`")
    run.add_argument("--aggregator", required=True,
                     help="HOST:PORT of the aggregator's PQC port (7443), as the job admin "
                          "publishes it")
    run.add_argument("--partition", type=int, default=0,
                     help="which partition of the task's public dataset to train on")
    run.add_argument("--state-dir", help="Flower state and logs (default DIR/state)")
    run.add_argument("--route-port", type=int, default=ROUTE_PORT)
    run.add_argument("--runtime-port", type=int, default=RUNTIME_PORT)
    run.add_argument("--admin-port", type=int, default=ADMIN_PORT)
    kube(run, False)
    run.add_argument("--node", help="the site's node id (default: its certificate's)")
    run.add_argument("--refresh", type=float, default=60.0,
                     help="with --job: re-fetch JOB-cert-NODE this often "
                          "(seconds), so the sidecar takes each newer CRL")
    run.set_defaults(func=_run)


__all__ = ["Site", "SiteError", "check_site", "node_commands", "register", "write_fetched"]
