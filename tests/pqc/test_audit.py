from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pqfed.cli import main
from pqfed.pqc import audit as audit_mod
from pqfed.pqc.audit import (
    AUDIT_CONTEXT,
    HANDOVER_CONTEXT,
    AuditLog,
    entry_hash,
    handover_digest,
    verify_audit_log,
)
from pqfed.pqc.backends import get_backend
from pqfed.pqc.errors import AuditLogError, CertificateError
from pqfed.pqc.identity import CertificateAuthority, Identity, Role
from pqfed.pqc.revocation import RevocationReason


def _log(tmp_path: Path, aggregator: Identity, n: int = 5) -> Path:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, aggregator)
    for i in range(n):
        log.append("update-accepted", round=i, node=f"client-{i}", digest="ab" * 32)
    return path


def test_log_verifies_and_reopens(tmp_path: Path, ca: CertificateAuthority,
                                  aggregator: Identity) -> None:
    path = _log(tmp_path, aggregator)
    AuditLog(path, aggregator).append("round-completed", round=5)
    summary = verify_audit_log(path, ca.trust)
    assert summary.entries == 6
    assert summary.events == {"update-accepted": 5, "round-completed": 1}


def _rewrite(path: Path, fn) -> None:  # type: ignore[no-untyped-def]
    lines = path.read_text().splitlines()
    path.write_text("\n".join(fn(lines)) + "\n")


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda ls: ls[:2] + ls[3:], "removed or reordered"),
        (lambda ls: [ls[0], ls[2], ls[1], *ls[3:]], "removed or reordered"),
        (lambda ls: [*ls[:2], ls[2].replace("client-2", "client-9"), *ls[3:]], "modified"),
        (lambda ls: [*ls[:1], "{not json", *ls[1:]], "not JSON"),
    ],
)
def test_tampering_is_detected(tmp_path: Path, ca: CertificateAuthority, aggregator: Identity,
                               edit, reason: str) -> None:  # type: ignore[no-untyped-def]
    path = _log(tmp_path, aggregator)
    _rewrite(path, edit)
    with pytest.raises(AuditLogError, match=reason):
        verify_audit_log(path, ca.trust)


def test_rehashed_forgery_fails_signature(tmp_path: Path, ca: CertificateAuthority,
                                          aggregator: Identity) -> None:
    """An attacker who edits an entry and recomputes its hash still lacks the signing key."""
    from pqfed.pqc.audit import entry_hash

    path = _log(tmp_path, aggregator, 1)
    entry = json.loads(path.read_text())
    entry["node"] = "client-9"
    entry["hash"] = entry_hash(entry)
    path.write_text(json.dumps(entry) + "\n")
    with pytest.raises(AuditLogError, match="signature"):
        verify_audit_log(path, ca.trust)


def test_log_signed_by_a_client_is_refused(tmp_path: Path, ca: CertificateAuthority) -> None:
    path = _log(tmp_path, ca.new_identity("client-7", Role.CLIENT), 1)
    with pytest.raises(AuditLogError, match="role"):
        verify_audit_log(path, ca.trust)


def test_cli_verify(tmp_path: Path, ca: CertificateAuthority, aggregator: Identity,
                    capsys: pytest.CaptureFixture[str]) -> None:
    path = _log(tmp_path, aggregator)
    (tmp_path / "ca.crt").write_text(ca.root.to_pem())
    assert main(["audit", "verify", str(path), "--ca", str(tmp_path / "ca.crt")]) == 0
    assert json.loads(capsys.readouterr().out)["entries"] == 5
    _rewrite(path, lambda ls: ls[:-2] + ls[-1:])
    assert main(["audit", "verify", str(path), "--ca", str(tmp_path / "ca.crt")]) == 2
    assert "audit log line 4" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["event", "node", "round"])
def test_duplicate_keys_are_rejected(tmp_path: Path, ca: CertificateAuthority,
                                     aggregator: Identity, key: str) -> None:
    """A second value for a key before the real one: Python's json keeps the last (so hash and
    signature still verify), a first-wins parser would read the forged value. Refused."""
    path = _log(tmp_path, aggregator, 3)
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace("{", '{"' + key + '": "forged", ', 1)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(AuditLogError, match=f"line 2: duplicate key '{key}'"):
        verify_audit_log(path, ca.trust)


@pytest.mark.parametrize(("old", "new", "reason"), [
    ('"seq": 1', '"seq": 1.0', "seq"),
    ('"seq": 1', '"seq": true', "seq"),
    ('"round": 1', '"round": NaN', "NaN"),
    (", ", ",  ", "canonical"),
])
def test_non_canonical_lines_are_rejected(tmp_path: Path, ca: CertificateAuthority,
                                          aggregator: Identity, old: str, new: str,
                                          reason: str) -> None:
    path = _log(tmp_path, aggregator, 3)
    lines = path.read_text().splitlines()
    assert old in lines[1]
    lines[1] = lines[1].replace(old, new, 1)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(AuditLogError, match=reason):
        verify_audit_log(path, ca.trust)


# ---------------------------------------------------------------- signer hand-over -------

def _renewals(ca: CertificateAuthority, n: int, node: str = "aggregator",
              role: Role = Role.AGGREGATOR) -> list[Identity]:
    return [ca.new_identity(node, role, validity_s=3600) for _ in range(n)]


def _spanning_log(tmp_path: Path, idents: list[Identity], per_signer: int = 2) -> Path:
    """A log whose writer follows `idents` in turn (as the renewed identity directory would)."""
    path = tmp_path / "audit.jsonl"
    current = [idents[0]]
    log = AuditLog(path, idents[0], renewed=lambda: current[0])
    for k, ident in enumerate(idents):
        current[0] = ident
        for i in range(per_signer):
            log.append("update-accepted", round=k, node=f"client-{i}", digest="ab" * 32)
    return path


def test_log_spans_three_certificates(tmp_path: Path, ca: CertificateAuthority,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    idents = _renewals(ca, 3)
    path = _spanning_log(tmp_path, idents)
    summary = verify_audit_log(path, ca.trust)
    assert summary.signers == tuple(i.certificate.serial for i in idents)
    assert summary.events == {"update-accepted": 6, "signer-renewed": 2}
    (tmp_path / "ca.crt").write_text(ca.root.to_pem())
    assert main(["audit", "verify", str(path), "--ca", str(tmp_path / "ca.crt")]) == 0
    assert json.loads(capsys.readouterr().out)["signers"] == list(summary.signers)
    # reopened by the newest identity, the chain continues under it
    AuditLog(path, idents[2]).append("job-finished")
    assert verify_audit_log(path, ca.trust).entries == 9
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[-1]["signer"] == idents[2].certificate.fingerprint


def test_reopen_by_a_renewed_identity_hands_over(tmp_path: Path,
                                                  ca: CertificateAuthority) -> None:
    old, new = _renewals(ca, 2)
    path = _log(tmp_path, old, 2)
    with pytest.raises(AuditLogError, match="pass the previous identity"):
        AuditLog(path, new)
    AuditLog(path, new, previous=old).append("job-resumed")
    assert verify_audit_log(path, ca.trust).signers == (old.certificate.serial,
                                                        new.certificate.serial)


def test_writer_ignores_an_identity_that_is_no_renewal(tmp_path: Path, ca: CertificateAuthority,
                                                      client: Identity) -> None:
    (agg,) = _renewals(ca, 1)
    log = AuditLog(tmp_path / "audit.jsonl", agg, renewed=lambda: client)
    log.append("job-started")
    log.append("update-accepted")
    assert log.identity is agg
    assert verify_audit_log(log.path, ca.trust).events == {"job-started": 1,
                                                          "update-accepted": 1}
    with pytest.raises(CertificateError, match="role"):
        log.hand_over(client)


def _hand_over_unchecked(log: AuditLog, new: Identity, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hand-over the writer would refuse: the verifier must refuse it on its own."""
    with monkeypatch.context() as m:
        m.setattr(audit_mod, "check_successor", lambda *_: None)
        log.hand_over(new)


def test_handover_signed_by_the_wrong_key(tmp_path: Path, ca: CertificateAuthority) -> None:
    old, new, other = _renewals(ca, 3)
    log = AuditLog(tmp_path / "audit.jsonl", old)
    log.append("job-started")
    log._identity = Identity(old.certificate, other.key)  # names the old signer, other key
    log.hand_over(new)
    with pytest.raises(AuditLogError, match="line 2: signature does not verify"):
        verify_audit_log(log.path, ca.trust)


def test_handover_without_proof_of_the_new_key(tmp_path: Path,
                                               ca: CertificateAuthority) -> None:
    old, new, other = _renewals(ca, 3)
    log = AuditLog(tmp_path / "audit.jsonl", old)
    log.append("job-started")
    log.hand_over(Identity(new.certificate, other.key))  # countersigned by a key not new's
    with pytest.raises(AuditLogError, match="line 2: hand-over: the new signer's "
                                            "countersignature"):
        verify_audit_log(log.path, ca.trust)


@pytest.mark.parametrize(("node", "role", "reason"), [
    ("aggregator-2", Role.AGGREGATOR, "node_id"),
    ("aggregator", Role.EDGE, "role"),
])
def test_handover_to_another_node_or_role(tmp_path: Path, ca: CertificateAuthority,
                                          monkeypatch: pytest.MonkeyPatch, node: str,
                                          role: Role, reason: str) -> None:
    (old,) = _renewals(ca, 1)
    new = ca.new_identity(node, role)
    log = AuditLog(tmp_path / "audit.jsonl", old)
    log.append("job-started")
    with pytest.raises(CertificateError, match=reason):
        log.hand_over(new)  # the writer refuses
    _hand_over_unchecked(log, new, monkeypatch)
    log.append("update-accepted")
    for trust in (ca.trust, None):  # structural: refused even without the CA
        with pytest.raises(AuditLogError, match=f"line 2: hand-over refused: .*\\({reason}\\)"):
            verify_audit_log(log.path, trust)


def test_entry_after_handover_signed_by_the_old_key(tmp_path: Path,
                                                    ca: CertificateAuthority) -> None:
    old, new = _renewals(ca, 2)
    log = AuditLog(tmp_path / "audit.jsonl", old)
    log.append("job-started")
    log.hand_over(new)
    log.append("update-accepted")
    log._identity = old  # the old key keeps signing, under its own name
    log.append("update-accepted", node="client-9")
    with pytest.raises(AuditLogError, match="line 4: signer is not the log's current signer"):
        verify_audit_log(log.path, ca.trust)
    # ... or under the new certificate's name
    path = tmp_path / "b.jsonl"
    log = AuditLog(path, old)
    log.append("job-started")
    log.hand_over(new)
    log._identity = Identity(new.certificate, old.key)
    log.append("update-accepted")
    with pytest.raises(AuditLogError, match="line 3: signature does not verify"):
        verify_audit_log(path, ca.trust)


def _forge_handover(lines: list[str], signer: Identity, new: Identity) -> list[str]:
    """Appends to `lines` a hand-over to `new` signed by `signer`'s key, and re-chains (and
    re-signs with `new`) nothing else: the forger's position after inserting it."""
    last = json.loads(lines[-1])
    entry = {"seq": last["seq"] + 1, "time": last["time"], "event": "signer-renewed",
             "prev": last["hash"], "signer": last["signer"],  # a fingerprint past line 1
             "newSigner": new.certificate.to_pem(), "serial": new.certificate.serial}
    entry["newSig"] = new.sign(handover_digest(entry), HANDOVER_CONTEXT).hex()
    entry["hash"] = entry_hash(entry)
    entry["sig"] = signer.sign(bytes.fromhex(entry["hash"]), AUDIT_CONTEXT).hex()
    return [*lines, json.dumps(entry, sort_keys=True)]


def _rechain(lines: list[str], tail: list[dict[str, object]], signer: Identity) -> list[str]:
    for fields in tail:
        last = json.loads(lines[-1])
        entry = {**fields, "seq": last["seq"] + 1, "prev": last["hash"],
                 "signer": signer.certificate.fingerprint}
        entry.pop("hash", None)
        entry.pop("sig", None)
        entry["hash"] = entry_hash(entry)
        entry["sig"] = signer.sign(bytes.fromhex(entry["hash"]), AUDIT_CONTEXT).hex()
        lines = [*lines, json.dumps(entry, sort_keys=True)]
    return lines


@pytest.mark.parametrize("old_key_leaked", [False, True])
def test_attacker_inserts_handover_to_its_own_certificate(
        tmp_path: Path, ca: CertificateAuthority, old_key_leaked: bool) -> None:
    """A client of the same CA rewrites the log from line 3 on under its own certificate:
    without the aggregator's key its hand-over does not verify; with it (a leaked key), the
    client role is still no successor of the aggregator."""
    (agg,) = _renewals(ca, 1)
    mallory = ca.new_identity("mallory", Role.CLIENT)
    path = _log(tmp_path, agg, 5)
    lines = path.read_text().splitlines()
    forged = _forge_handover(lines[:2], agg if old_key_leaked else mallory, mallory)
    forged = _rechain(forged, [json.loads(x) for x in lines[2:]], mallory)
    path.write_text("\n".join(forged) + "\n")
    reason = r"hand-over refused: .*\(role\)" if old_key_leaked else "signature does not verify"
    with pytest.raises(AuditLogError, match=f"line 3: {reason}"):
        verify_audit_log(path, ca.trust)


def test_signers_are_checked_at_each_entrys_time(tmp_path: Path,
                                                 ca: CertificateAuthority) -> None:
    now = int(time.time())
    old = ca.new_identity("aggregator", Role.AGGREGATOR)
    # a successor not valid yet at the hand-over
    key = get_backend().sig_generate(old.certificate.sig_algorithm)
    later = Identity(ca.issue("aggregator", Role.AGGREGATOR, key.public_bytes(),
                              not_before=now + 3600, validity_s=3600), key)
    log = AuditLog(tmp_path / "a.jsonl", old)
    log.append("job-started")
    log.hand_over(later)
    with pytest.raises(AuditLogError, match="line 2: newSigner certificate .* not valid yet"):
        verify_audit_log(log.path, ca.trust)
    # a successor that expired before the entries it signed
    key = get_backend().sig_generate(old.certificate.sig_algorithm)
    expired = Identity(ca.issue("aggregator", Role.AGGREGATOR, key.public_bytes(),
                                not_before=now - 7200, validity_s=3600), key)
    log = AuditLog(tmp_path / "b.jsonl", old)
    log.append("job-started")
    log.hand_over(expired)
    with pytest.raises(AuditLogError, match="line 2: newSigner certificate .* expired"):
        verify_audit_log(log.path, ca.trust)
    # a successor revoked before the entries it signed after the hand-over
    new = ca.new_identity("aggregator", Role.AGGREGATOR)
    log = AuditLog(tmp_path / "c.jsonl", old)
    log.append("job-started")
    log.hand_over(new)
    log.append("update-accepted")
    assert verify_audit_log(log.path, ca.trust).entries == 3
    crl = ca.revoke(None, new.certificate.serial, RevocationReason.SUPERSEDED, now=now - 60)
    with pytest.raises(AuditLogError, match=f"line 2: newSigner certificate .*serial "
                                            f"{new.certificate.serial} revoked"):
        verify_audit_log(log.path, ca.trust.with_crl(crl))
    # the old signer revoked: entries it signed before its revocation date still count
    crl = ca.revoke(None, old.certificate.serial, RevocationReason.SUPERSEDED,
                    now=now + 3600)
    assert verify_audit_log(log.path, ca.trust.with_crl(crl)).entries == 3


def test_resume_after_the_old_key_is_gone_starts_a_linked_log(
        tmp_path: Path, ca: CertificateAuthority) -> None:
    """A writer restarted with a renewed identity cannot sign a hand-over (the old key is
    gone): the old log is kept, verifiable, and the new one names it and its head."""
    old, new = _renewals(ca, 2)
    path = _log(tmp_path, old, 3)
    head = verify_audit_log(path, ca.trust).head
    log = AuditLog.resume(path, new)
    (archived,) = [p for p in tmp_path.iterdir() if p.name != "audit.jsonl"]
    assert verify_audit_log(archived, ca.trust).head == head
    (first,) = [json.loads(x) for x in path.read_text().splitlines()]
    assert first["event"] == "log-continued" and first["previousHead"] == head
    assert first["previousLog"] == archived.name and "pass the previous identity" in \
        first["reason"]
    assert log.identity is new and verify_audit_log(path, ca.trust).signers == (
        new.certificate.serial,)
    # a log it can continue is continued
    log.append("job-resumed")
    assert AuditLog.resume(path, new).head == verify_audit_log(path, ca.trust).head
