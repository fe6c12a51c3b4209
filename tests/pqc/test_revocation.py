"""Revocation lists: encoding, CA signature with its own context, rollback rule, root validity,
path validity, the trust store's reload, audit verification and the `pqfed ca` commands."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest

from pqfed.cli import main as pqfed_main
from pqfed.pqc.audit import AuditLog, verify_audit_log
from pqfed.pqc.backends import get_backend
from pqfed.pqc.encoding import Writer
from pqfed.pqc.errors import AuditLogError, CertificateError, DecodeError, RevocationListError
from pqfed.pqc.identity import (
    CERT_CONTEXT,
    Certificate,
    CertificateAuthority,
    Identity,
    Role,
    TrustAnchor,
)
from pqfed.pqc.revocation import (
    CRL_CONTEXT,
    CrlVersionGuard,
    RevocationList,
    RevocationReason,
    RevokedCertificate,
)
from pqfed.pqc.truststore import TrustStore


def _entry(serial: int, reason: RevocationReason = RevocationReason.SUPERSEDED
           ) -> RevokedCertificate:
    return RevokedCertificate(serial, 1_700_000_000, reason)


def test_roundtrip_and_lookup(ca: CertificateAuthority) -> None:
    crl = ca.sign_crl(3, [_entry(9), _entry(2), _entry(5, RevocationReason.KEY_COMPROMISE)])
    assert [e.serial for e in crl.revoked] == [2, 5, 9]  # sorted on signing
    assert RevocationList.from_bytes(crl.to_bytes()) == crl
    assert RevocationList.from_pem(crl.to_pem()) == crl
    assert crl.to_pem().startswith("-----BEGIN PQFED REVOCATION LIST-----")
    assert crl.lookup(5) == _entry(5, RevocationReason.KEY_COMPROMISE)
    assert crl.lookup(4) is None
    assert ca.trust.with_crl(crl).revoked == frozenset({2, 5, 9})
    assert crl.next_update <= ca.root.not_after


def _raw_crl(entries: list[tuple[int, int, int]], this: int = 10, nxt: int = 20) -> bytes:
    w = (Writer().u16(1).text("fed-test").raw(bytes(16)).u16(0x0905).u64(1).u64(this)
         .u64(nxt).u32(len(entries)))
    for serial, at, reason in entries:
        w.u64(serial).u64(at).u8(reason)
    return w.vec16(b"s").getvalue()


@pytest.mark.parametrize(("data", "field"), [
    (_raw_crl([(5, 1, 0), (5, 1, 0)]), "revoked[1].serial"),  # duplicate
    (_raw_crl([(6, 1, 0), (5, 1, 0)]), "revoked[1].serial"),  # unsorted
    (_raw_crl([(5, 1, 6)]), "revoked[0].reason"),  # certificateHold is not a reason here
    (_raw_crl([], this=20, nxt=20), "next_update"),
    (_raw_crl([]) + b"\0", "end"),
    (_raw_crl([(5, 1, 0)])[:-12], "count"),
])
def test_strict_decoding_names_the_field(data: bytes, field: str) -> None:
    with pytest.raises(DecodeError) as err:
        RevocationList.from_bytes(data)
    assert field in err.value.field


def test_crl_and_certificate_signatures_are_domain_separated(
        ca: CertificateAuthority, client: Identity) -> None:
    """FIPS 204 §5.2 contexts: a CA signature over a CRL's bytes made for a certificate (or
    the reverse) never verifies, so neither structure can be passed off as the other."""
    crl = ca.sign_crl(1, [_entry(client.certificate.serial)])
    as_cert_sig = ca.identity.sign(crl.tbs_bytes(), CERT_CONTEXT)
    with pytest.raises(RevocationListError) as err:
        ca.trust.with_crl(replace(crl, signature=as_cert_sig))
    assert err.value.field == "signature"
    cert = client.certificate
    as_crl_sig = ca.identity.sign(cert.tbs_bytes(), CRL_CONTEXT)
    with pytest.raises(CertificateError) as cerr:
        ca.trust.verify(replace(cert, signature=as_crl_sig))
    assert cerr.value.field == "signature"
    assert CRL_CONTEXT != CERT_CONTEXT


@pytest.mark.parametrize(("change", "field"), [
    ({"revoked": ()}, "signature"),  # un-revoking by editing the list
    ({"number": 99}, "signature"),
    ({"next_update": 2**40}, "signature"),
    ({"federation": "fed-other"}, "federation"),
    ({"issuer": bytes(16)}, "issuer"),
])
def test_modified_or_foreign_list_is_refused(ca: CertificateAuthority, client: Identity,
                                             change: dict[str, object], field: str) -> None:
    crl = ca.sign_crl(1, [_entry(client.certificate.serial)])
    with pytest.raises(RevocationListError) as err:
        ca.trust.with_crl(replace(crl, **change))  # type: ignore[arg-type]
    assert err.value.field == field


def test_list_of_another_ca_is_refused(ca: CertificateAuthority,
                                       other_ca: CertificateAuthority) -> None:
    with pytest.raises(RevocationListError, match="issuer"):
        ca.trust.with_crl(other_ca.sign_crl(1))


def test_revoked_certificate_is_refused_with_reason(ca: CertificateAuthority, client: Identity,
                                                    aggregator: Identity) -> None:
    trust = ca.trust.with_crl(ca.revoke(None, client.certificate.serial,
                                        RevocationReason.PRIVILEGE_WITHDRAWN))
    with pytest.raises(CertificateError) as err:
        trust.verify(client.certificate)
    assert err.value.field == "serial"
    assert "privilege-withdrawn" in str(err.value)
    assert trust.verify(aggregator.certificate) == aggregator.certificate
    assert ca.trust.verify(client.certificate) == client.certificate  # no list: not revoked


def test_stale_list_fails_closed(ca: CertificateAuthority, aggregator: Identity) -> None:
    """RFC 5280 §6.3.3: past nextUpdate the status is unknown; a peer is refused, not trusted
    on an old answer."""
    crl = ca.sign_crl(1, validity_s=60)
    trust = ca.trust.with_crl(crl)
    trust.verify(aggregator.certificate, now=crl.this_update + 30)
    with pytest.raises(CertificateError) as err:
        trust.verify(aggregator.certificate, now=crl.next_update)
    assert err.value.field == "crl"


def test_rollback_rule() -> None:
    def crl(ca: CertificateAuthority, n: int, serials: list[int]) -> RevocationList:
        return ca.sign_crl(n, [_entry(s) for s in serials], this_update=1_700_000_000)

    ca = CertificateAuthority.generate("fed-guard")
    guard = CrlVersionGuard()
    assert guard.admit(crl(ca, 2, [1]))
    assert not guard.admit(crl(ca, 2, [1]))  # the very same list again: nothing new
    with pytest.raises(RevocationListError, match="rollback"):
        guard.admit(crl(ca, 1, [1]))
    with pytest.raises(RevocationListError, match="same number"):
        guard.admit(crl(ca, 2, []))  # same number, one serial fewer
    assert guard.admit(crl(ca, 3, [1, 7]))
    assert guard.number == 3


def test_root_validity_is_checked(ca: CertificateAuthority) -> None:
    """A certificate valid at a time its root is not (RFC 5280 §6.1.3 (a)(2) for the anchor)."""
    key = get_backend().sig_generate("ML-DSA-65")
    early = ca.issue("early", Role.CLIENT, key.public_bytes(),
                     not_before=ca.root.not_before - 1000, validity_s=2000)
    with pytest.raises(CertificateError) as err:
        ca.trust.verify(early, now=ca.root.not_before - 10)
    assert err.value.field == "root.not_before"
    with pytest.raises(CertificateError) as err:
        ca.trust.verify(early, now=ca.root.not_after)
    assert err.value.field == "root.not_after"


def test_certificate_may_not_outlive_its_root(ca: CertificateAuthority) -> None:
    key = get_backend().sig_generate("ML-DSA-65")
    with pytest.raises(CertificateError, match="outlive"):
        ca.issue("long", Role.CLIENT, key.public_bytes(), validity_s=400 * 86400)
    # One signed anyway (an older or careless issuer) is refused on verification.
    ok = ca.issue("long", Role.CLIENT, key.public_bytes(), validity_s=86400)
    long = replace(ok, not_after=ca.root.not_after + 1)
    long = replace(long, signature=ca.identity.sign(long.tbs_bytes(), CERT_CONTEXT))
    with pytest.raises(CertificateError) as err:
        ca.trust.verify(long)
    assert err.value.field == "not_after"
    assert "outlives" in str(err.value)


# ---- trust store ----------------------------------------------------------------------------
def test_store_switches_only_to_newer_lists_the_ca_signed(
        tmp_path: Path, ca: CertificateAuthority, other_ca: CertificateAuthority,
        client: Identity) -> None:
    (tmp_path / "ca.crt").write_text(ca.root.to_pem())
    crl_file = tmp_path / "crl.pem"
    store = TrustStore.from_identity_dir(tmp_path, min_interval_s=0)
    assert store.current.crl is None  # no list published yet
    serial = client.certificate.serial
    one = ca.revoke(None, serial)
    crl_file.write_text(one.to_pem())
    assert store.reload()
    with pytest.raises(CertificateError, match="revoked"):
        store.verify(client.certificate)
    # Whoever can write the file cannot undo the revocation:
    crl_file.write_text(ca.sign_crl(0).to_pem())  # an older (lower-numbered) list
    assert not store.reload()
    assert store.rejected == 1 and "rollback" in str(store.last_error)
    crl_file.write_text(ca.sign_crl(1).to_pem())  # number 1 again, without the serial
    assert not store.reload()
    crl_file.write_text(other_ca.sign_crl(5).to_pem())  # not our CA
    assert not store.reload()
    crl_file.write_text(replace(ca.sign_crl(6), signature=one.signature).to_pem())
    assert not store.reload()
    crl_file.write_text("garbage")
    assert not store.reload()
    crl_file.unlink()
    assert not store.reload()
    assert store.rejected == 5
    with pytest.raises(CertificateError, match="revoked"):
        store.anchor.verify(client.certificate)
    crl_file.write_text(ca.sign_crl(2, one.revoked).to_pem())
    assert store.reload() and store.current.crl is not None
    assert store.current.crl.number == 2


# ---- audit log ------------------------------------------------------------------------------
def _log(tmp_path: Path, ident: Identity, times: list[float]) -> Path:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, ident)
    for _ in times:
        log.append("update", node="client-1")
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    # Entries with chosen times, re-signed (as the aggregator would have at those times).
    from pqfed.pqc.audit import AUDIT_CONTEXT, GENESIS, entry_hash
    prev = GENESIS
    out = []
    for entry, t in zip(lines, times, strict=True):
        entry.update(time=t, prev=prev)
        entry["hash"] = entry_hash(entry)
        entry["sig"] = ident.sign(bytes.fromhex(entry["hash"]), AUDIT_CONTEXT).hex()
        prev = entry["hash"]
        out.append(json.dumps(entry, sort_keys=True))
    path.write_text("\n".join(out) + "\n")
    return path


def test_audit_refuses_entries_of_a_revoked_signer(tmp_path: Path,
                                                   ca: CertificateAuthority) -> None:
    signer = ca.new_identity("aggregator", Role.AGGREGATOR)
    t0 = float(signer.certificate.not_before + 600)
    path = _log(tmp_path, signer, [t0, t0 + 10, t0 + 20])
    assert verify_audit_log(path, ca.trust).entries == 3
    serial = signer.certificate.serial
    # Revoked (superseded) between entries 2 and 3: entries before the date still stand.
    crl = ca.revoke(None, serial, RevocationReason.SUPERSEDED, now=int(t0 + 15))
    with pytest.raises(AuditLogError) as err:
        verify_audit_log(path, ca.trust.with_crl(crl))
    assert err.value.line == 3
    assert "superseded" in err.value.reason
    # keyCompromise: the key may have signed anything at any claimed time.
    crl = ca.revoke(None, serial, RevocationReason.KEY_COMPROMISE, now=int(t0 + 15))
    with pytest.raises(AuditLogError) as err:
        verify_audit_log(path, ca.trust.with_crl(crl))
    assert err.value.line == 1
    assert "key-compromise" in err.value.reason


# ---- CLI ------------------------------------------------------------------------------------
def test_cli_revoke_and_print(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca_dir, node = tmp_path / "ca", tmp_path / "node"
    assert pqfed_main(["ca", "init", "--federation", "fed-cli", "--out", str(ca_dir)]) == 0
    assert pqfed_main(["ca", "issue", "--ca", str(ca_dir), "--node-id", "client-1",
                       "--role", "client", "--out", str(node)]) == 0
    cert = Certificate.from_pem((node / "tls.crt").read_text())
    assert pqfed_main(["ca", "revoke", "--ca", str(ca_dir), "--cert", str(node / "tls.crt"),
                       "--reason", "key-compromise"]) == 0
    assert pqfed_main(["ca", "revoke", "--ca", str(ca_dir), "--serial", "12345"]) == 0
    capsys.readouterr()
    assert pqfed_main(["ca", "crl", "--ca", str(ca_dir)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["number"] == 2
    assert {e["serial"]: e["reason"] for e in shown["revoked"]} == {
        cert.serial: "key-compromise", 12345: "unspecified"}
    assert pqfed_main(["ca", "crl", "--ca", str(ca_dir), "--renew"]) == 0
    assert json.loads(capsys.readouterr().out)["number"] == 3
    assert pqfed_main(["ca", "issue", "--ca", str(ca_dir), "--node-id", "client-2",
                       "--role", "client", "--out", str(tmp_path / "n2")]) == 0
    assert (tmp_path / "n2" / "crl.pem").read_text() == (ca_dir / "crl.pem").read_text()
    root = Certificate.from_pem((ca_dir / "ca.crt").read_text())
    trust = TrustAnchor(root, RevocationList.from_pem((ca_dir / "crl.pem").read_text()))
    with pytest.raises(CertificateError, match="revoked"):
        trust.verify(cert)
    # A certificate of another CA is refused by name.
    other = tmp_path / "other"
    pqfed_main(["ca", "init", "--federation", "fed-cli", "--out", str(other)])
    assert pqfed_main(["ca", "revoke", "--ca", str(other), "--cert",
                       str(node / "tls.crt")]) != 0
    assert "not issued by the CA" in capsys.readouterr().err


def test_cli_audit_verify_with_crl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = CertificateAuthority.generate("fed-audit")
    signer = ca.new_identity("aggregator", Role.AGGREGATOR)
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, signer)
    log.append("update", node="client-1")
    (tmp_path / "ca.crt").write_text(ca.root.to_pem())
    (tmp_path / "crl.pem").write_text(ca.revoke(None, 1).to_pem())  # someone else revoked
    args = ["audit", "verify", str(path), "--ca", str(tmp_path / "ca.crt"),
            "--crl", str(tmp_path / "crl.pem")]
    assert pqfed_main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["crl"]["number"] == 1 and not out["crl"]["stale"]
    (tmp_path / "crl.pem").write_text(
        ca.revoke(ca.revoke(None, 1), signer.certificate.serial,
                  RevocationReason.KEY_COMPROMISE, now=int(time.time()) + 5).to_pem())
    assert pqfed_main(args) != 0
    assert "revoked" in capsys.readouterr().err
