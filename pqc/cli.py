"""`pqfed ca|sidecar|audit|bench-pqc` subcommands (registered by pqfed.cli)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from pqfed.pqc.backends import BACKEND_ENV
from pqfed.pqc.errors import CertificateError
from pqfed.pqc.handshake import Group
from pqfed.pqc.identity import Certificate, CertificateAuthority, Identity, Role, TrustAnchor
from pqfed.pqc.revocation import RevocationList, RevocationReason
from pqfed.pqc.sidecar.config import ADMIN_PORT, PROBE_PORT
from pqfed.pqc.truststore import CRL_FILE

if TYPE_CHECKING:
    from pqfed.pqc.sidecar.config import SidecarConfig


def _ca_init(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority.generate(args.federation, algorithm=args.algorithm,
                                       validity_s=args.days * 86400)
    ca.identity.save(out / "ca.crt", out / "ca.key")
    print(f"CA for federation {args.federation!r} written to {out}/ca.crt and {out}/ca.key "
          f"(fingerprint {ca.root.fingerprint[:16]})")
    return 0


def _ca_issue(args: argparse.Namespace) -> int:
    ca_dir, out = Path(args.ca), Path(args.out)
    ca = CertificateAuthority(Identity.load_files(ca_dir / "ca.crt", ca_dir / "ca.key"))
    out.mkdir(parents=True, exist_ok=True)
    ident = ca.new_identity(args.node_id, Role.parse(args.role), algorithm=args.algorithm,
                            validity_s=args.days * 86400)
    ident.save(out / "tls.crt", out / "tls.key")
    (out / "ca.crt").write_text(ca.root.to_pem())
    if (ca_dir / CRL_FILE).exists():  # the sidecar's --crl; later lists replace it
        (out / CRL_FILE).write_text((ca_dir / CRL_FILE).read_text())
    print(f"{args.role} {args.node_id!r}: {out}/tls.crt, {out}/tls.key, {out}/ca.crt")
    return 0


def _load_crl(path: Path, root: Certificate) -> RevocationList | None:
    """The list at `path` verified against `root` (None if there is no file yet)."""
    if not path.exists():
        return None
    return TrustAnchor(root, RevocationList.from_pem(path.read_text())).crl


def crl_summary(crl: RevocationList | None) -> dict[str, object]:
    if crl is None:
        return {"number": None, "revoked": []}
    return {"federation": crl.federation, "issuer": crl.issuer.hex(), "number": crl.number,
            "thisUpdate": crl.this_update, "nextUpdate": crl.next_update,
            "revoked": [{"serial": e.serial, "revokedAt": e.revoked_at,
                         "reason": e.reason.label} for e in crl.revoked]}


def _ca_revoke(args: argparse.Namespace) -> int:
    ca_dir = Path(args.ca)
    ca = CertificateAuthority(Identity.load_files(ca_dir / "ca.crt", ca_dir / "ca.key"))
    if args.cert:
        cert = Certificate.from_pem(Path(args.cert).read_text())
        if cert.issuer != ca.root.key_id:
            raise CertificateError("issuer", f"--cert {args.cert} was not issued by the CA in "
                                   f"{ca_dir}")
        serial = cert.serial
    else:
        serial = int(args.serial)
    path = ca_dir / CRL_FILE
    crl = ca.revoke(_load_crl(path, ca.root), serial, RevocationReason.parse(args.reason),
                    validity_s=args.days * 86400)
    path.write_text(crl.to_pem())
    print(f"serial {serial} revoked ({args.reason}); revocation list {crl.number} written to "
          f"{path} (next update due {crl.next_update}): distribute it to every node")
    return 0


def _ca_crl(args: argparse.Namespace) -> int:
    ca_dir = Path(args.ca)
    root = Certificate.from_pem((ca_dir / "ca.crt").read_text())
    path = Path(args.file) if args.file else ca_dir / CRL_FILE
    crl = _load_crl(path, root)
    if args.renew:
        ca = CertificateAuthority(Identity.load_files(ca_dir / "ca.crt", ca_dir / "ca.key"))
        crl = ca.sign_crl(crl.number + 1 if crl else 1, crl.revoked if crl else (),
                          validity_s=args.days * 86400)
        path.write_text(crl.to_pem())
    print(json.dumps(crl_summary(crl), indent=2))
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    from pqfed.pqc.audit import verify_audit_log

    trust = TrustAnchor(Certificate.from_pem(Path(args.ca).read_text()))
    if args.crl:
        trust = trust.with_crl(RevocationList.from_pem(Path(args.crl).read_text()))
    summary = verify_audit_log(Path(args.log), trust)
    print(json.dumps({"ok": True, "entries": summary.entries, "head": summary.head,
                      "signer": summary.signer, "signers": list(summary.signers),
                      "events": summary.events,
                      "crl": summary.crl}, indent=2))
    return 0


def sidecar_config(args: argparse.Namespace) -> SidecarConfig:
    """The sidecar's config from `pqfed sidecar` flags, or from --config YAML."""
    from pqfed.pqc.sidecar.config import (
        ChannelProtocolName,
        DataPath,
        Endpoint,
        Route,
        SidecarConfig,
    )

    if args.config:
        return SidecarConfig.from_yaml(Path(args.config))
    return SidecarConfig(
        cert=Path(args.cert), key=Path(args.key), ca=Path(args.ca),
        listen=Endpoint.parse(args.listen, "--listen") if args.listen else None,
        upstream=Endpoint.parse(args.upstream, "--upstream") if args.upstream else None,
        routes=tuple(Route.parse(r) for r in args.route),
        admin=Endpoint.parse(args.admin, "--admin") if args.admin else None,
        probes=Endpoint.parse(args.probes, "--probes") if args.probes else None,
        handshake_timeout_s=args.handshake_timeout,
        groups=tuple(Group[g] for g in args.group) or (Group.X25519_MLKEM768,),
        allow_path_prefixes=tuple(args.allow_path_prefix),
        operator_upstream=(Endpoint.parse(args.operator_upstream, "--operator-upstream")
                           if args.operator_upstream else None),
        allowed_client_roles=(tuple(Role.parse(r) for r in args.peer_role)
                              or (Role.CLIENT, Role.EDGE)),
        crl=Path(args.crl) if args.crl else None,
        reload_interval_s=args.reload_interval,
        protocol=ChannelProtocolName.parse(args.protocol, "--protocol"),
        data_path=DataPath.parse(args.data_path, "--data-path"),
        max_pump_channels=args.max_pump_channels,
    )


def _sidecar(args: argparse.Namespace) -> int:
    from pqfed.pqc.sidecar.admin import serve
    from pqfed.pqc.sidecar.proxy import Sidecar

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.backend:
        # The process-wide default read by get_backend(); set before any key is loaded.
        os.environ[BACKEND_ENV] = args.backend
    from pqfed.pqc.backends import backend_report

    logging.getLogger("pqfed.sidecar").info("crypto backend: %s",
                                            backend_report()["description"])
    config = sidecar_config(args)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(Sidecar(config)))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pqfed.pqc.bench import main as bench_main

    return int(bench_main(args))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ca = sub.add_parser("ca", help="federation CA: init, issue node certificates")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True)
    init = ca_sub.add_parser("init", help="create a federation CA (ML-DSA-65)")
    init.add_argument("--federation", required=True)
    init.add_argument("--out", required=True)
    init.add_argument("--algorithm", default="ML-DSA-65")
    init.add_argument("--days", type=int, default=365)
    init.set_defaults(func=_ca_init)
    issue = ca_sub.add_parser("issue", help="issue a node identity")
    issue.add_argument("--ca", required=True, help="directory with ca.crt and ca.key")
    issue.add_argument("--node-id", required=True)
    issue.add_argument("--role", required=True,
                       choices=["aggregator", "client", "edge", "operator"])
    issue.add_argument("--out", required=True)
    issue.add_argument("--algorithm", default="ML-DSA-65")
    issue.add_argument("--days", type=int, default=30)
    issue.set_defaults(func=_ca_issue)
    reasons = [r.label for r in RevocationReason]
    revoke = ca_sub.add_parser("revoke", help="revoke a node certificate: writes the CA's next "
                               "revocation list (DIR/crl.pem)")
    revoke.add_argument("--ca", required=True, help="directory with ca.crt and ca.key")
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--serial", type=int, help="serial of the certificate to revoke")
    which.add_argument("--cert", help="the certificate (PEM) to revoke")
    revoke.add_argument("--reason", default="unspecified", choices=reasons,
                        help="RFC 5280 reason code; key-compromise also voids the "
                             "signatures it made before (audit verify)")
    revoke.add_argument("--days", type=int, default=7,
                        help="the list's lifetime (nextUpdate); publish a new one before")
    revoke.set_defaults(func=_ca_revoke)
    crl = ca_sub.add_parser("crl", help="print the CA's revocation list (verified); --renew "
                            "publishes the next number with a new nextUpdate")
    crl.add_argument("--ca", required=True, help="directory with ca.crt (and ca.key to renew)")
    crl.add_argument("--file", help="the list (default: DIR/crl.pem)")
    crl.add_argument("--renew", action="store_true")
    crl.add_argument("--days", type=int, default=7)
    crl.set_defaults(func=_ca_crl)
    from pqfed.pqc.pki.cli import register as register_x509

    register_x509(ca_sub)  # x509-init, csr, sign, x509-crl (docs/pki.md)

    audit = sub.add_parser("audit", help="verify a signed, hash-chained audit log offline")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser("verify")
    verify.add_argument("log")
    verify.add_argument("--ca", required=True, help="the federation's ca.crt")
    verify.add_argument("--crl", help="the federation's revocation list: entries signed by a "
                        "revoked signer after its revocation (any, on key-compromise) fail")
    verify.set_defaults(func=_audit_verify)

    sc = sub.add_parser("sidecar", help="run the PQC sidecar proxy")
    sc.add_argument("--config", help="YAML config (overrides the flags)")
    sc.add_argument("--cert", default="/etc/pqfed/identity/tls.crt")
    sc.add_argument("--key", default="/etc/pqfed/identity/tls.key")
    sc.add_argument("--ca", default="/etc/pqfed/identity/ca.crt")
    sc.add_argument("--listen", help="inbound secure HOST:PORT (aggregator side)")
    sc.add_argument("--upstream", help="local plaintext app HOST:PORT for inbound channels")
    sc.add_argument("--route", action="append", default=[],
                    help="outbound LISTEN=PEER[@NODE_ID], repeatable")
    sc.add_argument("--admin", default=f"127.0.0.1:{ADMIN_PORT}",
                    help="admin API (/identity, /metrics, /healthz, /readyz): loopback only")
    sc.add_argument("--probes",
                    help="HOST:PORT for the kubelet's probes (/healthz, /readyz, no data), "
                         f"e.g. 0.0.0.0:{PROBE_PORT}; off by default")
    sc.add_argument("--handshake-timeout", type=float, default=10.0)
    sc.add_argument("--group", action="append", default=[],
                    choices=[g.name for g in Group if g is not Group.X25519],
                    help="key-establishment group(s); default X25519_MLKEM768")
    sc.add_argument("--allow-path-prefix", action="append", default=[],
                    help="inbound: only HTTP/1.1 requests under this path (repeatable)")
    sc.add_argument("--peer-role", action="append", default=[], choices=["client", "edge"],
                    help="inbound: roles allowed to reach the upstream (repeatable; default "
                         "client and edge; a hierarchical job's aggregator takes edges only)")
    sc.add_argument("--operator-upstream",
                    help="inbound: channels from an operator identity reach only GET "
                         "/status and /checkpoint at this loopback HOST:PORT")
    sc.add_argument("--crl", help="the CA's revocation list (PEM), re-read while running")
    sc.add_argument("--reload-interval", type=float, default=2.0,
                    help="seconds between checks of --crl, --cert and --key for updates")
    sc.add_argument("--protocol", default=None, choices=["pqfed1", "tls13"],
                    help="channel between sidecars (default: pqfed.pqc.sidecar.config."
                         "DEFAULT_PROTOCOL, pqfed1): pqfed1 (pqfed certificates) or tls13 "
                         "(TLS 1.3; --cert/--key/--ca/--crl are then X.509 PEM: ML-DSA-65 "
                         "certificate, PKCS#8 key, X.509 CA, X.509 CRL)")
    sc.add_argument("--data-path", default=None, choices=["threads", "asyncio"],
                    help="where channel data moves: threads (two pump threads per channel, "
                         "tls13 only; its default) or asyncio (the event loop; pqfed1's)")
    sc.add_argument("--max-pump-channels", type=int, default=64,
                    help="channels on pump threads at most; more stay on the event loop")
    sc.add_argument("--log-level", default="info")
    sc.add_argument("--backend", choices=["auto", "pyca", "liboqs"],
                    help="crypto backend (default: $PQFED_CRYPTO_BACKEND, else auto)")
    sc.set_defaults(func=_sidecar)

    bench = sub.add_parser("bench-pqc", help="PQC micro/macro benchmarks (docs/BENCHMARKS.md)")
    bench.add_argument("--out", default="results/bench-pqc")
    bench.add_argument("--quick", action="store_true", help="fewer iterations (CI smoke run)")
    bench.add_argument("--only", default="", help="comma list of steps: primitives,handshake,"
                                                  "parallel,throughput,backends,protocols")
    bench.set_defaults(func=_bench)

