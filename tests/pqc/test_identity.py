from __future__ import annotations

import time
from dataclasses import replace

import pytest

from pqfed.pqc.errors import CertificateError, DecodeError
from pqfed.pqc.identity import Certificate, CertificateAuthority, Identity, Role, TrustAnchor


def test_issue_verify_and_serialise(ca: CertificateAuthority, client: Identity) -> None:
    cert = client.certificate
    assert Certificate.from_bytes(cert.to_bytes()) == cert
    assert Certificate.from_pem(cert.to_pem()) == cert
    assert ca.trust.verify(cert, roles=(Role.CLIENT,), node_id="client-1") == cert


def test_identity_save_load(tmp_path, client: Identity) -> None:  # type: ignore[no-untyped-def]
    client.save(tmp_path / "c.crt", tmp_path / "c.key")
    assert (tmp_path / "c.key").stat().st_mode & 0o077 == 0
    loaded = Identity.load_files(tmp_path / "c.crt", tmp_path / "c.key")
    assert loaded.certificate == client.certificate


def test_key_not_matching_certificate_is_refused(client: Identity, aggregator: Identity) -> None:
    with pytest.raises(CertificateError, match="public_key"):
        Identity.load(client.certificate.to_pem(), aggregator.private_key_pem())


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"federation": "fed-evil"}, "federation"),
        ({"node_id": "client-2"}, "signature"),
        ({"role": Role.AGGREGATOR}, "signature"),
        ({"serial": 1}, "signature"),
        ({"not_before": 1}, "signature"),
        ({"not_after": 2**40}, "not_after"),  # past the CA's own not_after: outlives it
        ({"issuer": bytes(16)}, "issuer"),
        ({"role": Role.CA}, "role"),
    ],
)
def test_modified_certificate_fields_are_rejected(
    ca: CertificateAuthority, client: Identity, change: dict[str, object], field: str
) -> None:
    forged = replace(client.certificate, **change)  # type: ignore[arg-type]
    with pytest.raises(CertificateError) as err:
        ca.trust.verify(forged)
    assert err.value.field == field


def test_certificate_from_another_ca_is_rejected(other_ca: CertificateAuthority,
                                                  ca: CertificateAuthority) -> None:
    stranger = other_ca.new_identity("client-1", Role.CLIENT)
    with pytest.raises(CertificateError, match="issuer"):
        ca.trust.verify(stranger.certificate)


def test_validity_window_and_revocation(ca: CertificateAuthority, client: Identity) -> None:
    cert = client.certificate
    with pytest.raises(CertificateError, match="expired"):
        ca.trust.verify(cert, now=cert.not_after + 1)
    with pytest.raises(CertificateError, match="not valid yet"):
        ca.trust.verify(cert, now=cert.not_before - 1)
    with pytest.raises(CertificateError, match="revoked"):
        TrustAnchor(ca.root, ca.revoke(None, cert.serial)).verify(cert)


def test_wrong_role_and_node_id(ca: CertificateAuthority, client: Identity) -> None:
    with pytest.raises(CertificateError, match="role"):
        ca.trust.verify(client.certificate, roles=(Role.AGGREGATOR,))
    with pytest.raises(CertificateError, match="node_id"):
        ca.trust.verify(client.certificate, node_id="client-9")


def test_strict_decoding(client: Identity) -> None:
    raw = client.certificate.to_bytes()
    with pytest.raises(DecodeError, match="trailing"):
        Certificate.from_bytes(raw + b"\0")
    with pytest.raises(DecodeError, match="truncated"):
        Certificate.from_bytes(raw[:-1])
    with pytest.raises(DecodeError, match="version"):
        Certificate.from_bytes(b"\0\2" + raw[2:])
    with pytest.raises(DecodeError):
        Certificate.from_pem("-----BEGIN PQFED CERTIFICATE-----\n!!\n-----END PQFED CERTIFICATE-----")


def test_names_are_validated(ca: CertificateAuthority) -> None:
    with pytest.raises(CertificateError, match="node_id"):
        ca.new_identity("Bad_Name", Role.CLIENT)
    with pytest.raises(ValueError, match="role"):
        Role.parse("superuser")


def test_short_validity_expires(ca: CertificateAuthority) -> None:
    ident = ca.new_identity("brief", Role.CLIENT, validity_s=1)
    with pytest.raises(CertificateError, match="expired"):
        ca.trust.verify(ident.certificate, now=time.time() + 3600)


def test_verification_cache_never_accepts_another_signature(ca: CertificateAuthority,
                                                            client: Identity) -> None:
    cert = client.certificate
    ca.trust.verify(cert)  # now cached as valid
    forged = replace(cert, signature=bytes(len(cert.signature)))
    with pytest.raises(CertificateError, match="signature"):
        ca.trust.verify(forged)
