from __future__ import annotations

import json
from pathlib import Path

import pytest

from pqfed.cli import main
from pqfed.pqc.audit import AuditLog, verify_audit_log
from pqfed.pqc.errors import AuditLogError
from pqfed.pqc.identity import CertificateAuthority, Identity, Role


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
