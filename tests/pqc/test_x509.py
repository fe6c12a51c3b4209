"""The X.509 profile (pqc/pki): node URI grammar, CA and node certificates, verification,
CRLs with rollback protection, the PKCS#10 flow and the `pqfed ca` subcommands."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import crypto

from pqfed.cli import main as cli_main
from pqfed.pqc.errors import CertificateError
from pqfed.pqc.identity import Role
from pqfed.pqc.pki import (
    IssuancePolicy,
    NodeURI,
    Usage,
    X509CertificateAuthority,
    X509TrustAnchor,
    make_request,
    read_node_uri,
    sign_request,
)
from pqfed.pqc.pki.profile import check_ca_certificate, subject_name

FED = "fed-x509"


@pytest.fixture(scope="module")
def ca() -> X509CertificateAuthority:
    return X509CertificateAuthority.generate(FED)


@pytest.fixture(scope="module")
def other_ca() -> X509CertificateAuthority:
    return X509CertificateAuthority.generate(FED)  # same federation and name, another key


@pytest.fixture(scope="module")
def client_cert(ca: X509CertificateAuthority) -> x509.Certificate:
    return ca.new_node(NodeURI(FED, Role.CLIENT, "hosp-a"))[0]


def _utc(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(int(ts), datetime.UTC)


def forge(ca: X509CertificateAuthority, *, uri: str = f"pqfed://{FED}/client/hosp-a",
          key: object | None = None, ca_flag: bool = False,
          eku: tuple[x509.ObjectIdentifier, ...] = (ExtendedKeyUsageOID.CLIENT_AUTH,),
          digital_signature: bool = True, extra_san: bool = False,
          not_after: float | None = None, critical_unknown: bool = False,
          aki: bool = True) -> x509.Certificate:
    """A certificate the real CA key signs but with one property off-profile (mis-issuance)."""
    pub = (key or mldsa.MLDSA65PrivateKey.generate()).public_key()  # type: ignore[attr-defined]
    now = time.time()
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
    if extra_san:
        names.append(x509.DNSName("evil.example"))
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
         .issuer_name(ca.certificate.subject).public_key(pub)
         .serial_number(x509.random_serial_number())
         .not_valid_before(_utc(now - 60))
         .not_valid_after(_utc(not_after or now + 3600))
         .add_extension(x509.BasicConstraints(ca=ca_flag, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature, False, False, False, False,
                                      not digital_signature, False, False, False), critical=True)
         .add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
         .add_extension(x509.SubjectAlternativeName(names), critical=False))
    if aki:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca.key.public_key()), critical=False)
    if critical_unknown:
        b = b.add_extension(x509.UnrecognizedExtension(
            x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00"), critical=True)
    return b.sign(ca.key, None)


# --- node URI grammar --------------------------------------------------------------------

def test_node_uri_round_trip() -> None:
    uri = NodeURI.parse("pqfed://fed-1/edge/edge-a.b")
    assert (uri.federation, uri.role, uri.node_id) == ("fed-1", Role.EDGE, "edge-a.b")
    assert str(uri) == "pqfed://fed-1/edge/edge-a.b"
    assert NodeURI.parse("pqfed://f/ca/ca").role is Role.CA


@pytest.mark.parametrize("text", [
    "PQFED://fed/client/a", "pqfed://Fed/client/a", "pqfed://fed/Client/a",
    "pqfed://fed:443/client/a", "pqfed://user@fed/client/a", "pqfed://fed/client/a?x=1",
    "pqfed://fed/client/a#f", "pqfed://fed/client/a/", "pqfed://fed/client/a/b",
    "pqfed://fed/client/%61", "pqfed://fed//a", "pqfed:///client/a", "pqfed://fed/client/",
    "pqfed://fed/admin/a", "spiffe://fed/client/a", "pqfed://fed/client/-a",
    "pqfed://fed/client/a-", "pqfed://fed/client/a_b", f"pqfed://{'f' * 64}/client/a",
    "pqfed://fed/client/a\n", " pqfed://fed/client/a", "pqfed://fed/client/ca",
    "pqfed://fed/ca/root",
])
def test_node_uri_grammar_is_strict(text: str) -> None:
    with pytest.raises(CertificateError) as err:
        NodeURI.parse(text)
    assert err.value.field in {"subject_alt_name", "node_id"}


# --- profile ------------------------------------------------------------------------------

def test_ca_certificate_profile(ca: X509CertificateAuthority) -> None:
    root = ca.certificate
    assert check_ca_certificate(root) == NodeURI(FED, Role.CA, "ca")
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = root.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski.digest == x509.SubjectKeyIdentifier.from_public_key(root.public_key()).digest
    assert root.signature_algorithm_oid.dotted_string == "2.16.840.1.101.3.4.3.18"


@pytest.mark.parametrize(("role", "ekus"), [
    (Role.AGGREGATOR, {ExtendedKeyUsageOID.SERVER_AUTH}),
    (Role.CLIENT, {ExtendedKeyUsageOID.CLIENT_AUTH}),
    (Role.OPERATOR, {ExtendedKeyUsageOID.CLIENT_AUTH}),
    (Role.EDGE, {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}),
])
def test_node_certificate_profile(ca: X509CertificateAuthority, role: Role,
                                  ekus: set[x509.ObjectIdentifier]) -> None:
    cert = ca.new_node(NodeURI(FED, role, "n1"))[0]
    ext = cert.extensions
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    assert set(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == ekus
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca.certificate.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier).value.digest
    assert read_node_uri(cert) == NodeURI(FED, role, "n1")
    assert cert.subject == subject_name(NodeURI(FED, role, "n1"))
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime <= datetime.timedelta(days=7)
    node = ca.trust.verify(cert, roles=(role,), node_id="n1")
    assert (node.federation, node.role, node.node_id) == (FED, role, "n1")
    assert node.serial == cert.serial_number


def test_openssl_reads_the_certificates(ca: X509CertificateAuthority,
                                        client_cert: x509.Certificate) -> None:
    """An independent reader: OpenSSL 4 (through pyOpenSSL) parses and prints both certs."""
    for cert in (ca.certificate, client_cert):
        pem = cert.public_bytes(serialization.Encoding.PEM)
        text = crypto.dump_certificate(crypto.FILETYPE_TEXT,
                                       crypto.load_certificate(crypto.FILETYPE_PEM, pem)).decode()
        assert "ML-DSA-65" in text
        assert f"URI:{read_node_uri(cert)}" in text
    root_text = crypto.dump_certificate(crypto.FILETYPE_TEXT,
                                        crypto.X509.from_cryptography(ca.certificate)).decode()
    assert "CA:TRUE, pathlen:0" in root_text
    assert "Certificate Sign, CRL Sign" in root_text
    leaf_text = crypto.dump_certificate(crypto.FILETYPE_TEXT,
                                        crypto.X509.from_cryptography(client_cert)).decode()
    assert "CA:FALSE" in leaf_text and "TLS Web Client Authentication" in leaf_text
    assert "Digital Signature" in leaf_text


# --- verification: each failure names its field -----------------------------------------

def test_verify_pins_role_node_id_and_usage(ca: X509CertificateAuthority,
                                            client_cert: x509.Certificate) -> None:
    t = ca.trust
    for kwargs, field in [({"roles": (Role.AGGREGATOR, Role.EDGE)}, "role"),
                          ({"node_id": "hosp-b"}, "node_id"),
                          ({"usage": Usage.SERVER}, "extended_key_usage")]:
        with pytest.raises(CertificateError) as err:
            t.verify(client_cert, **kwargs)  # type: ignore[arg-type]
        assert err.value.field == field
    assert t.verify(client_cert, roles=(Role.CLIENT,), node_id="hosp-a",
                    usage=Usage.CLIENT).node_id == "hosp-a"


def test_verify_validity_window(ca: X509CertificateAuthority,
                                client_cert: x509.Certificate) -> None:
    start = client_cert.not_valid_before_utc.timestamp()
    end = client_cert.not_valid_after_utc.timestamp()
    for now, field in [(start - 1, "not_before"), (end, "not_after")]:
        with pytest.raises(CertificateError) as err:
            ca.trust.verify(client_cert, now=now)
        assert err.value.field == field
    ca.trust.verify(client_cert, now=end - 1)


def test_root_validity_and_leaf_outliving_the_root() -> None:
    short = X509CertificateAuthority.generate(FED, validity_s=7200)
    leaf = short.new_node(NodeURI(FED, Role.CLIENT, "a"), validity_s=86400)[0]
    assert leaf.not_valid_after_utc == short.certificate.not_valid_after_utc  # capped
    root_end = short.certificate.not_valid_after_utc.timestamp()
    with pytest.raises(CertificateError) as err:
        short.trust.verify(leaf, now=root_end)
    assert err.value.field == "root.not_after"
    outliving = forge(short, not_after=root_end + 3600)
    with pytest.raises(CertificateError, match="outlives") as err:
        short.trust.verify(outliving)
    assert err.value.field == "not_after"


def test_other_ca_and_other_federation(ca: X509CertificateAuthority,
                                       other_ca: X509CertificateAuthority) -> None:
    stranger = other_ca.new_node(NodeURI(FED, Role.CLIENT, "hosp-a"))[0]
    with pytest.raises(CertificateError) as err:
        ca.trust.verify(stranger)  # same issuer name, another key: the AKI tells them apart
    assert err.value.field == "issuer"
    foreign = X509CertificateAuthority.generate("fed-other")
    cert = foreign.new_node(NodeURI("fed-other", Role.CLIENT, "hosp-a"))[0]
    with pytest.raises(CertificateError) as err:
        ca.trust.verify(cert)
    assert err.value.field == "federation"
    with pytest.raises(CertificateError) as err:
        ca.trust.verify(ca.certificate)
    assert err.value.field == "role"


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"ca_flag": True}, "basic_constraints"),
    ({"digital_signature": False}, "key_usage"),
    ({"eku": (ExtendedKeyUsageOID.SERVER_AUTH,)}, "extended_key_usage"),
    ({"eku": (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.CODE_SIGNING)},
     "extended_key_usage"),
    ({"extra_san": True}, "subject_alt_name"),
    ({"critical_unknown": True}, "extensions"),
    ({"aki": False}, "authority_key_identifier"),
    ({"key": ed25519.Ed25519PrivateKey.generate()}, "public_key"),
    ({"uri": "pqfed://fed-x509/client/Hosp-A"}, "subject_alt_name"),
])
def test_off_profile_certificates_are_refused(ca: X509CertificateAuthority,
                                              kwargs: dict[str, object], field: str) -> None:
    cert = forge(ca, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(CertificateError) as err:
        ca.trust.verify(cert)
    assert err.value.field == field
    ca.trust.verify(forge(ca))  # the same forge without the defect passes


def test_tampered_signature_is_refused(ca: X509CertificateAuthority,
                                       client_cert: x509.Certificate) -> None:
    der = bytearray(client_cert.public_bytes(serialization.Encoding.DER))
    der[-10] ^= 0x01  # inside the ML-DSA signature, the last field
    with pytest.raises(CertificateError) as err:
        ca.trust.verify(x509.load_der_x509_certificate(bytes(der)))
    assert err.value.field == "signature"


def test_trust_anchor_refuses_a_non_ca_root(ca: X509CertificateAuthority,
                                            client_cert: x509.Certificate) -> None:
    with pytest.raises(CertificateError) as err:
        X509TrustAnchor(client_cert)
    assert err.value.field == "root.subject_alt_name"


# --- CRL ----------------------------------------------------------------------------------

def test_crl_revokes_and_refuses_rollback(ca: X509CertificateAuthority,
                                          client_cert: x509.Certificate) -> None:
    crl5 = ca.revocation_list([client_cert.serial_number], 5)
    assert crl5.signature_algorithm_oid.dotted_string == "2.16.840.1.101.3.4.3.18"
    t5 = ca.trust.with_crl(crl5)
    with pytest.raises(CertificateError) as err:
        t5.verify(client_cert)
    assert err.value.field == "serial"
    assert t5.with_crl(crl5).crl_number == 5  # the same CRL again: idempotent
    for crl in (ca.revocation_list([], 4), ca.revocation_list([], 5)):
        with pytest.raises(CertificateError) as err:
            t5.with_crl(crl)  # an older CRL, or a different one under the same number
        assert err.value.field == "crl.crl_number"
    t6 = t5.with_crl(ca.revocation_list([], 6))
    assert t6.verify(client_cert).node_id == "hosp-a"


def test_crl_checks(ca: X509CertificateAuthority, other_ca: X509CertificateAuthority) -> None:
    with pytest.raises(CertificateError) as err:
        ca.trust.with_crl(other_ca.revocation_list([1], 1))
    assert err.value.field == "crl.signature"
    foreign = X509CertificateAuthority.generate("fed-other")
    with pytest.raises(CertificateError) as err:
        ca.trust.with_crl(foreign.revocation_list([1], 1))
    assert err.value.field == "crl.issuer"
    crl = ca.revocation_list([1], 1, validity_s=60)
    with pytest.raises(CertificateError) as err:
        ca.trust.with_crl(crl, now=time.time() + 61)
    assert err.value.field == "crl.next_update"
    now = datetime.datetime.now(datetime.UTC)
    unnumbered = (x509.CertificateRevocationListBuilder().issuer_name(ca.certificate.subject)
                  .last_update(now).next_update(now + datetime.timedelta(hours=1))
                  .sign(ca.key, None))
    with pytest.raises(CertificateError) as err:
        ca.trust.with_crl(unnumbered)
    assert err.value.field == "crl.crl_number"


# --- PKCS#10: site-held keys -----------------------------------------------------------------

def test_csr_flow(ca: X509CertificateAuthority) -> None:
    key, csr = make_request(NodeURI(FED, Role.AGGREGATOR, "agg-1"))
    cert = sign_request(ca, csr, IssuancePolicy(roles=(Role.AGGREGATOR,), node_id="agg-1"))
    assert cert.public_key() == key.public_key()
    node = ca.trust.verify(cert, roles=(Role.AGGREGATOR,), node_id="agg-1", usage=Usage.SERVER)
    assert node.node_id == "agg-1"


def _csr(uri: str, key: object | None = None, *, ca_flag: bool = False,
         key_usage: bool = False) -> x509.CertificateSigningRequest:
    signer = key or mldsa.MLDSA65PrivateKey.generate()
    b = (x509.CertificateSigningRequestBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
         .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                        critical=False)
         .add_extension(x509.BasicConstraints(ca=ca_flag, path_length=None), critical=True))
    if key_usage:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False,
                                          False), critical=True)
    return b.sign(signer, None)  # type: ignore[arg-type]


def _wrong_signature() -> x509.CertificateSigningRequest:
    """A request whose signature is not by the key it carries: swap in another key's
    signature over the same to-be-signed bytes (no proof of possession)."""
    good = _csr(f"pqfed://{FED}/client/hosp-a")
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    sig = good.signature
    other = mldsa.MLDSA65PrivateKey.generate().sign(good.tbs_certrequest_bytes)
    i = bytes(der).rindex(sig)
    der[i : i + len(sig)] = other
    return x509.load_der_x509_csr(bytes(der))


@pytest.mark.parametrize(("make", "policy", "field"), [
    (_wrong_signature, IssuancePolicy(), "signature"),
    (lambda: _csr("pqfed://fed-other/client/hosp-a"), IssuancePolicy(), "federation"),
    (lambda: _csr(f"pqfed://{FED}/client/hosp-a", ca_flag=True), IssuancePolicy(),
     "basic_constraints"),
    (lambda: _csr(f"pqfed://{FED}/aggregator/hosp-a"), IssuancePolicy(roles=(Role.CLIENT,)),
     "role"),
    (lambda: _csr(f"pqfed://{FED}/ca/ca"), IssuancePolicy(), "role"),
    (lambda: _csr(f"pqfed://{FED}/client/hosp-b"), IssuancePolicy(node_id="hosp-a"),
     "node_id"),
    (lambda: _csr(f"pqfed://{FED}/client/hosp-a", key_usage=True), IssuancePolicy(),
     "extensions"),
    (lambda: _csr(f"pqfed://{FED}/client/hosp-a", ed25519.Ed25519PrivateKey.generate()),
     IssuancePolicy(), "public_key"),
    (lambda: _csr(f"pqfed://{FED}/client/HOSP"), IssuancePolicy(), "subject_alt_name"),
])
def test_bad_requests_are_refused(ca: X509CertificateAuthority, make: object,
                                  policy: IssuancePolicy, field: str) -> None:
    csr = make()  # type: ignore[operator]
    with pytest.raises(CertificateError) as err:
        sign_request(ca, csr, policy)
    assert err.value.field == field


def test_cli_csr_sign_and_crl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca_dir, site = tmp_path / "ca", tmp_path / "site"
    assert cli_main(["ca", "x509-init", "--federation", FED, "--out", str(ca_dir)]) == 0
    assert cli_main(["ca", "csr", "--federation", FED, "--role", "client", "--node-id",
                     "hosp-a", "--out", str(site)]) == 0
    assert (site / "tls.key").stat().st_mode & 0o077 == 0
    assert (ca_dir / "ca.key").stat().st_mode & 0o077 == 0
    crt = tmp_path / "tls.crt"
    # the admin allows aggregators only: refused, naming the field
    assert cli_main(["ca", "sign", "--ca", str(ca_dir), "--csr", str(site / "tls.csr"),
                     "--role", "aggregator", "--out", str(crt)]) == 2
    assert "(role)" in capsys.readouterr().err
    assert not crt.exists()
    assert cli_main(["ca", "sign", "--ca", str(ca_dir), "--csr", str(site / "tls.csr"),
                     "--role", "client", "--node-id", "hosp-a", "--out", str(crt)]) == 0
    ca = X509CertificateAuthority.load(ca_dir)
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    key = serialization.load_pem_private_key((site / "tls.key").read_bytes(), None)
    assert cert.public_key() == key.public_key()  # type: ignore[union-attr]
    assert ca.trust.verify(cert, node_id="hosp-a").role is Role.CLIENT
    crl_path = tmp_path / "ca.crl"
    assert cli_main(["ca", "x509-crl", "--ca", str(ca_dir), "--number", "1", "--revoke",
                     hex(cert.serial_number), "--out", str(crl_path)]) == 0
    crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    with pytest.raises(CertificateError, match="revoked"):
        ca.trust.with_crl(crl).verify(cert)
