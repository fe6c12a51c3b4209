from __future__ import annotations

from dataclasses import replace

import pytest

from pqfed.pqc.errors import UpdateRejected
from pqfed.pqc.identity import CertificateAuthority, Identity, Role
from pqfed.pqc.signing import SignedUpdate, sign_update, verify_update

PAYLOAD = b"\x01\x02" * 5000


def test_sign_verify_and_serialise(ca: CertificateAuthority, client: Identity) -> None:
    signed = sign_update(client, "job-a", 3, PAYLOAD)
    again = SignedUpdate.from_text(signed.to_text())
    m = verify_update(again, PAYLOAD, ca.trust, job="job-a", round_number=3)
    assert m.node_id == "client-1" and m.size == len(PAYLOAD)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda s, p: (s, p[:-1] + b"\x00"), "tampered"),
        (lambda s, p: (s, p + b"\x00"), "tampered"),
        (lambda s, p: (replace(s, manifest=replace(s.manifest, round=4)), p), "signature"),
        (lambda s, p: (replace(s, signature=bytes(len(s.signature))), p), "signature"),
        (lambda s, p: (replace(s, manifest=replace(s.manifest, node_id="client-2")), p),
         "node_id differs"),
    ],
)
def test_tampered_updates_are_rejected(ca: CertificateAuthority, client: Identity, mutate,  # type: ignore[no-untyped-def]
                                       reason: str) -> None:
    signed, payload = mutate(sign_update(client, "job-a", 3, PAYLOAD), PAYLOAD)
    with pytest.raises(UpdateRejected, match=reason):
        verify_update(signed, payload, ca.trust, job="job-a", round_number=3)


def test_replay_into_another_round_or_job(ca: CertificateAuthority, client: Identity) -> None:
    signed = sign_update(client, "job-a", 3, PAYLOAD)
    with pytest.raises(UpdateRejected, match="replayed"):
        verify_update(signed, PAYLOAD, ca.trust, job="job-a", round_number=4)
    with pytest.raises(UpdateRejected, match="job"):
        verify_update(signed, PAYLOAD, ca.trust, job="job-b", round_number=3)


def test_signer_from_foreign_ca_or_wrong_role(ca: CertificateAuthority,
                                              other_ca: CertificateAuthority) -> None:
    stranger = other_ca.new_identity("client-1", Role.CLIENT)
    with pytest.raises(UpdateRejected, match="certificate"):
        verify_update(sign_update(stranger, "j", 1, PAYLOAD), PAYLOAD, ca.trust, job="j",
                      round_number=1)
    agg = ca.new_identity("aggregator", Role.AGGREGATOR)
    with pytest.raises(UpdateRejected, match="role"):
        verify_update(sign_update(agg, "j", 1, PAYLOAD), PAYLOAD, ca.trust, job="j",
                      round_number=1, roles=(Role.CLIENT,))
