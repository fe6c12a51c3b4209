"""Per-update signatures from a site-held X.509 key (pqc/signing.py, `verify_update_x509`):
real ML-DSA-65 keys, real X.509 certificates and CRLs from a real job CA. Each refusal is a
negative test of one check; each was seen to pass the update with its check removed."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import mldsa
from cryptography.hazmat.primitives.serialization import Encoding

from pqfed.pqc import Role, UpdateRejected
from pqfed.pqc.errors import CertificateError
from pqfed.pqc.pki import NodeURI, X509CertificateAuthority
from pqfed.pqc.pki.profile import certificate_pem
from pqfed.pqc.signing import (
    UPDATE_CONTEXT,
    UpdateManifest,
    X509SignedUpdate,
    X509Verifier,
    sign_update_x509,
    verify_update_x509,
)
from pqfed.pqc.truststore import X509TrustStore

JOB = "fed-x"
SITE = "hospital-1"
OTHER = "hospital-2"
PAYLOAD = b"update bytes " * 100
EXTERNAL = (SITE, OTHER)
Site = tuple[mldsa.MLDSA65PrivateKey, x509.Certificate]


@pytest.fixture(scope="module")
def ca() -> X509CertificateAuthority:
    return X509CertificateAuthority.generate(JOB)


def _node(ca: X509CertificateAuthority, node: str, role: Role = Role.CLIENT
          ) -> Site:
    key = mldsa.MLDSA65PrivateKey.generate()  # made at the site; only the public key travels
    return key, ca.issue(NodeURI(ca.federation, role, node), key.public_key())


@pytest.fixture(scope="module")
def site(ca: X509CertificateAuthority) -> Site:
    return _node(ca, SITE)


def _signed(site: Site, rnd: int = 3) -> X509SignedUpdate:
    key, cert = site
    return sign_update_x509(key, cert, JOB, rnd, PAYLOAD, num_examples=57)


def _verify(ca: X509CertificateAuthority, signed: X509SignedUpdate, *, payload: bytes = PAYLOAD,
            trust: X509Verifier | None = None, node_ids: tuple[str, ...] = EXTERNAL
            ) -> UpdateManifest:
    return verify_update_x509(signed, payload, trust or ca.trust, job=JOB, round_number=3,
                              node_ids=node_ids)


def test_a_site_signed_update_verifies_and_travels(ca: X509CertificateAuthority,
                                                   site: Site
                                                   ) -> None:
    signed = X509SignedUpdate.from_bytes(_signed(site).to_bytes())
    m = _verify(ca, signed)
    assert (m.node_id, m.job, m.round, m.num_examples, m.federation) == (
        SITE, JOB, 3, 57, JOB)


def test_another_ca_with_the_same_name_is_refused(ca: X509CertificateAuthority) -> None:
    rogue = X509CertificateAuthority.generate(JOB)
    signed = _signed(_node(rogue, SITE))
    with pytest.raises(UpdateRejected, match="signer certificate: issuer"):
        _verify(ca, signed)


def test_a_node_outside_external_clients_is_refused(ca: X509CertificateAuthority) -> None:
    """Enrolled by the job's CA but not listed in spec.externalClients (e.g. not approved for
    this job's training): its update is refused."""
    signed = _signed(_node(ca, "hospital-9"))
    with pytest.raises(UpdateRejected, match="node_id: not one of the job's externalClients"):
        _verify(ca, signed)


def test_a_manifest_naming_another_node_is_refused(ca: X509CertificateAuthority) -> None:
    """hospital-2's key signs a manifest claiming to be hospital-1's update."""
    key, cert = _node(ca, OTHER)
    honest = sign_update_x509(key, cert, JOB, 3, PAYLOAD)
    claimed = replace(honest.manifest, node_id=SITE)
    forged = X509SignedUpdate(claimed, key.sign(claimed.to_bytes(), UPDATE_CONTEXT),
                              honest.certificate)
    with pytest.raises(UpdateRejected, match="signer certificate: node_id"):
        _verify(ca, forged)


def test_a_role_other_than_client_is_refused(ca: X509CertificateAuthority) -> None:
    signed = _signed(_node(ca, SITE, Role.EDGE))
    with pytest.raises(UpdateRejected, match="signer certificate: role"):
        _verify(ca, signed)


def test_a_revoked_site_is_refused_once_the_crl_says_so(
        ca: X509CertificateAuthority, site: Site,
        tmp_path: Path) -> None:
    """Through the store the aggregator uses: it re-reads crl.pem when the job's CRL changes."""
    (tmp_path / "ca.crt").write_bytes(certificate_pem(ca.certificate))
    crl = tmp_path / "crl.pem"
    crl.write_bytes(ca.revocation_list([], 1).public_bytes(Encoding.PEM))
    store = X509TrustStore(tmp_path / "ca.crt", crl, min_interval_s=0)
    signed = _signed(site)
    _verify(ca, signed, trust=store)
    serial = site[1].serial_number
    crl.write_bytes(ca.revocation_list([serial], 2).public_bytes(Encoding.PEM))
    with pytest.raises(UpdateRejected, match="signer certificate: serial"):
        _verify(ca, signed, trust=store)


def test_a_tampered_update_is_refused(ca: X509CertificateAuthority,
                                      site: Site) -> None:
    signed = _signed(site)
    with pytest.raises(UpdateRejected, match="tampered"):
        _verify(ca, signed, payload=PAYLOAD[:-1] + b"!")
    raised = replace(signed.manifest, num_examples=10**6)  # the weight, changed in transit
    with pytest.raises(UpdateRejected, match="signature does not verify"):
        _verify(ca, X509SignedUpdate(raised, signed.signature, signed.certificate))


def test_a_replayed_round_is_refused(ca: X509CertificateAuthority,
                                     site: Site) -> None:
    with pytest.raises(UpdateRejected, match="replayed"):
        _verify(ca, _signed(site, rnd=2))


def test_signing_with_a_key_other_than_the_certificates_is_refused(
        ca: X509CertificateAuthority, site: Site) -> None:
    with pytest.raises(CertificateError, match="public_key"):
        sign_update_x509(mldsa.MLDSA65PrivateKey.generate(), site[1], JOB, 3, PAYLOAD)

