"""`pqfed site fetch|run` before anything starts (operator/site.py): the site directory is
checked with real keys, requests and certificates from the job's real X.509 CA, and each
problem names its file or field. The run itself is tests/e2e/test_external_node_e2e.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from pqfed.operator import enrolment
from pqfed.operator import pods as m
from pqfed.operator.site import SiteError, check_site, node_commands, write_fetched
from pqfed.pqc.identity import Role
from pqfed.pqc.pki import (
    IssuancePolicy,
    NodeURI,
    X509CertificateAuthority,
    make_request,
    sign_request,
)
from pqfed.pqc.pki.profile import certificate_pem, private_key_pem
from pqfed.services.spec import parse_spec

JOB = "fed-s"
NODE = "hospital-1"
SPEC = parse_spec({"clients": 2, "minClients": 3, "channel": {"protocol": "tls13"},
                   "externalClients": [{"nodeId": NODE}]})


@pytest.fixture(scope="module")
def ca() -> X509CertificateAuthority:
    return X509CertificateAuthority.generate(JOB)


def _site(tmp: Path, ca: X509CertificateAuthority, node: str = NODE,
          spec: dict[str, object] | None = None) -> Path:
    """`pqfed ca csr` + what `pqfed site fetch` writes from the operator's ConfigMap."""
    d = tmp / "site"
    key, csr = make_request(NodeURI(ca.federation, Role.CLIENT, node))
    d.mkdir()
    (d / "tls.key").write_bytes(private_key_pem(key))
    cert = sign_request(ca, csr, IssuancePolicy(roles=(Role.CLIENT,), node_id=node))
    cm = enrolment.certificate_configmap(
        m.JobRef(JOB, "fl", "u"), node, certificate_pem(cert).decode(),
        certificate_pem(ca.certificate).decode(),
        ca.revocation_list([], 1).public_bytes(Encoding.PEM).decode(),
        parse_spec(spec) if spec is not None else SPEC)
    assert sorted(write_fetched(cm["data"], d)) == ["ca.crt", "crl.pem", "spec.json", "tls.crt"]
    assert write_fetched(cm["data"], d) == []  # unchanged: nothing rewritten
    return d


def test_a_fetched_site_is_ready_to_run(tmp_path: Path, ca: X509CertificateAuthority) -> None:
    site = check_site(_site(tmp_path, ca))
    assert (site.job, site.node.node_id, site.spec.external_node_ids) == (JOB, NODE, (NODE,))
    cmds = node_commands(site, "10.0.0.5:7443", 1, tmp_path / "state", route_port=1,
                         runtime_port=2, admin_port=3)
    sidecar, fl = " ".join(cmds["sidecar"]), " ".join(cmds["fl"])
    assert "--protocol tls13" in sidecar and "127.0.0.1:1=10.0.0.5:7443@aggregator" in sidecar
    assert f"--key {site.directory}/tls.key" in sidecar
    assert f"--identity-dir {site.directory}" in fl and "--superlink 127.0.0.1:1" in fl


def test_missing_files_name_the_command_that_makes_them(tmp_path: Path,
                                                        ca: X509CertificateAuthority) -> None:
    d = _site(tmp_path, ca)
    (d / "crl.pem").unlink()
    with pytest.raises(SiteError, match="crl.pem: missing .* `pqfed site fetch`"):
        check_site(d)
    (d / "tls.key").unlink()
    with pytest.raises(SiteError, match="tls.key: missing .* `pqfed ca csr"):
        check_site(d)
    with pytest.raises(SiteError, match="spec.json: not in the ConfigMap yet"):
        write_fetched({"tls.crt": "x", "ca.crt": "x", "crl.pem": "x"}, d)


def test_a_certificate_from_another_ca_is_refused(tmp_path: Path,
                                                  ca: X509CertificateAuthority) -> None:
    d = _site(tmp_path, ca)
    rogue = X509CertificateAuthority.generate(JOB)
    (d / "ca.crt").write_bytes(certificate_pem(rogue.certificate))
    with pytest.raises(SiteError, match=r"tls.crt.issuer"):
        check_site(d)


def test_a_key_that_is_not_the_certificates_is_refused(tmp_path: Path,
                                                       ca: X509CertificateAuthority) -> None:
    d = _site(tmp_path, ca)
    other, _ = make_request(NodeURI(JOB, Role.CLIENT, NODE))
    (d / "tls.key").write_bytes(private_key_pem(other))
    with pytest.raises(SiteError, match="tls.key: is not the key of tls.crt"):
        check_site(d)


def test_a_node_the_job_does_not_list_is_refused(tmp_path: Path,
                                                 ca: X509CertificateAuthority) -> None:
    d = _site(tmp_path, ca, "hospital-9")
    with pytest.raises(SiteError, match="spec.externalClients: 'hospital-9' is not listed"):
        check_site(d)


def test_a_spec_of_another_job_is_refused(tmp_path: Path,
                                          ca: X509CertificateAuthority) -> None:
    d = _site(tmp_path, ca)
    doc = json.loads((d / "spec.json").read_text())
    (d / "spec.json").write_text(json.dumps({**doc, "name": "fed-other"}))
    with pytest.raises(SiteError, match="spec.json: job 'fed-other'"):
        check_site(d)
