"""`pqfed ca x509-init|csr|sign|crl`: the X.509 CA and the site-held-key enrolment flow.

    (CA admin)  pqfed ca x509-init --federation F --out ca/
    (the site)  pqfed ca csr --federation F --role client --node-id hosp-a --out id/
                # id/tls.key stays on the site; id/tls.csr goes to the CA admin
    (CA admin)  pqfed ca sign --ca ca/ --csr tls.csr --role client --node-id hosp-a --out tls.crt
    (CA admin)  pqfed ca x509-crl --ca ca/ --number 2 --revoke 0x1f... --out ca.crl
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from pqfed.pqc.identity import Role
from pqfed.pqc.pki.csr import (
    NODE_ROLES,
    IssuancePolicy,
    load_request_pem,
    make_request,
    request_pem,
    sign_request,
)
from pqfed.pqc.pki.profile import (
    X509CertificateAuthority,
    certificate_pem,
    read_node_uri,
    write_private_key,
)
from pqfed.pqc.pki.uri import NodeURI

_ROLE_NAMES = [r.name.lower() for r in NODE_ROLES]


def _x509_init(args: argparse.Namespace) -> int:
    ca = X509CertificateAuthority.generate(args.federation, validity_s=args.days * 86400)
    out = Path(args.out)
    ca.save(out)
    print(f"X.509 CA for federation {args.federation!r}: {out}/ca.crt, {out}/ca.key "
          f"(serial {ca.certificate.serial_number:#x})")
    return 0


def _csr(args: argparse.Namespace) -> int:
    uri = NodeURI(args.federation, Role.parse(args.role), args.node_id)
    key, csr = make_request(uri)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_private_key(out / "tls.key", key)
    (out / "tls.csr").write_bytes(request_pem(csr))
    print(f"{uri}: key {out}/tls.key (stays here), request {out}/tls.csr (send to the CA)")
    return 0


def _sign(args: argparse.Namespace) -> int:
    ca = X509CertificateAuthority.load(Path(args.ca))
    policy = IssuancePolicy(roles=tuple(Role.parse(r) for r in args.role) or NODE_ROLES,
                            node_id=args.node_id, validity_s=args.days * 86400)
    cert = sign_request(ca, load_request_pem(Path(args.csr).read_bytes()), policy)
    Path(args.out).write_bytes(certificate_pem(cert))
    print(f"issued {read_node_uri(cert)} serial {cert.serial_number:#x} until "
          f"{cert.not_valid_after_utc.isoformat()}: {args.out}")
    return 0


def _crl(args: argparse.Namespace) -> int:
    ca = X509CertificateAuthority.load(Path(args.ca))
    crl = ca.revocation_list([int(s, 0) for s in args.revoke], args.number,
                             validity_s=args.hours * 3600)
    Path(args.out).write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    print(f"CRL number {args.number} with {len(args.revoke)} serial(s): {args.out}")
    return 0


def register(ca_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds the X.509 subcommands under `pqfed ca`."""
    init = ca_sub.add_parser("x509-init", help="create a federation X.509 CA (ML-DSA-65)")
    init.add_argument("--federation", required=True)
    init.add_argument("--out", required=True, help="directory for ca.crt and ca.key")
    init.add_argument("--days", type=int, default=365)
    init.set_defaults(func=_x509_init)

    csr = ca_sub.add_parser("csr", help="on the site: make an ML-DSA-65 key and a PKCS#10 "
                                        "request (the key never leaves the site)")
    csr.add_argument("--federation", required=True)
    csr.add_argument("--role", required=True, choices=_ROLE_NAMES)
    csr.add_argument("--node-id", required=True)
    csr.add_argument("--out", required=True, help="directory for tls.key and tls.csr")
    csr.set_defaults(func=_csr)

    sign = ca_sub.add_parser("sign", help="CA admin: issue an X.509 certificate from a request")
    sign.add_argument("--ca", required=True, help="directory with the X.509 ca.crt and ca.key")
    sign.add_argument("--csr", required=True)
    sign.add_argument("--role", action="append", default=[], choices=_ROLE_NAMES,
                      help="role(s) this request may have (repeatable; default any node role)")
    sign.add_argument("--node-id", help="the node id the request must name")
    sign.add_argument("--days", type=int, default=7, help="validity (at most 30)")
    sign.add_argument("--out", required=True, help="certificate file (PEM)")
    sign.set_defaults(func=_sign)

    crl = ca_sub.add_parser("x509-crl",
                             help="CA admin: publish an X.509 CRL (ML-DSA-65 signed)")
    crl.add_argument("--ca", required=True)
    crl.add_argument("--number", type=int, required=True,
                     help="CRL number; larger than every CRL published before")
    crl.add_argument("--revoke", action="append", default=[], help="serial (0x... or decimal)")
    crl.add_argument("--hours", type=int, default=24, help="until nextUpdate")
    crl.add_argument("--out", required=True)
    crl.set_defaults(func=_crl)
