from __future__ import annotations

from dataclasses import replace

import pytest

from pqfed.pqc.encoding import Writer
from pqfed.pqc.errors import DecodeError, UpdateRejected
from pqfed.pqc.identity import CertificateAuthority, Identity, Role
from pqfed.pqc.signing import (
    ModelRejected,
    SignedModel,
    SignedUpdate,
    UpdateManifest,
    sign_model,
    sign_update,
    update_digest,
    verify_model,
    verify_update,
)

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


# ---- the update's weight is signed --------------------------------------------------------

def test_the_aggregation_weight_is_signed(ca: CertificateAuthority, client: Identity) -> None:
    signed = sign_update(client, "job-a", 3, PAYLOAD, num_examples=120)
    m = verify_update(SignedUpdate.from_bytes(signed.to_bytes()), PAYLOAD, ca.trust,
                      job="job-a", round_number=3)
    assert (m.num_examples, m.contributors) == (120, 1)
    for forged in (replace(signed.manifest, num_examples=120_000),
                   replace(signed.manifest, contributors=50)):
        with pytest.raises(UpdateRejected, match="signature"):
            verify_update(replace(signed, manifest=forged), PAYLOAD, ca.trust, job="job-a",
                          round_number=3)


def test_a_version_1_manifest_without_a_weight_is_refused(client: Identity) -> None:
    m = sign_update(client, "job-a", 3, PAYLOAD).manifest
    v1 = (Writer().u16(1).text(m.federation).text(m.job).u32(m.round).text(m.node_id)
          .raw(update_digest(PAYLOAD)).u64(m.size).u64(m.timestamp).getvalue())
    with pytest.raises(DecodeError, match="version"):
        UpdateManifest.from_bytes(v1)
    with pytest.raises(ValueError, match="num_examples"):
        sign_update(client, "job-a", 3, PAYLOAD, num_examples=-1)


# ---- the aggregator's model signature ------------------------------------------------------

EPOCH = b"\x01" * 8
DIGEST = update_digest(b"the global model")


def test_model_signature_round_trip(ca: CertificateAuthority, aggregator: Identity) -> None:
    signed = SignedModel.from_bytes(sign_model(aggregator, "job-a", EPOCH, 4, 9, DIGEST)
                                    .to_bytes())
    m = verify_model(signed, ca.trust, job="job-a", signer="aggregator", round_number=4,
                     digest=DIGEST)
    assert (m.epoch, m.round, m.version, m.digest) == (EPOCH, 4, 9, DIGEST)


def test_altered_replayed_or_foreign_models_are_refused(
        ca: CertificateAuthority, other_ca: CertificateAuthority, aggregator: Identity) -> None:
    signed = sign_model(aggregator, "job-a", EPOCH, 4, 9, DIGEST)

    def check(s: SignedModel, *, job: str = "job-a", signer: str = "aggregator",
              rnd: int = 4, digest: bytes = DIGEST, trust: CertificateAuthority = ca) -> None:
        verify_model(s, trust.trust, job=job, signer=signer, round_number=rnd, digest=digest)

    with pytest.raises(ModelRejected, match="altered"):
        check(signed, digest=update_digest(b"a model an edge changed"))
    with pytest.raises(ModelRejected, match="replayed"):
        check(signed, rnd=5)
    with pytest.raises(ModelRejected, match="job"):
        check(signed, job="job-b")
    with pytest.raises(ModelRejected, match="signature"):  # a re-labelled version
        check(replace(signed, manifest=replace(signed.manifest, version=10)))
    with pytest.raises(ModelRejected, match="certificate"):
        check(signed, trust=other_ca)
    # An edge (or anyone but the pinned aggregator) cannot sign the model for its clients.
    edge = ca.new_identity("edge-0", Role.EDGE)
    with pytest.raises(ModelRejected, match="certificate"):
        check(sign_model(edge, "job-a", EPOCH, 4, 9, DIGEST))
    named_like_it = ca.new_identity("aggregator", Role.EDGE)
    with pytest.raises(ModelRejected, match="role"):
        check(sign_model(named_like_it, "job-a", EPOCH, 4, 9, DIGEST))
    other_agg = ca.new_identity("aggregator-2", Role.AGGREGATOR)
    with pytest.raises(ModelRejected, match="certificate"):
        check(sign_model(other_agg, "job-a", EPOCH, 4, 9, DIGEST))


def test_update_and_model_signatures_do_not_cross(ca: CertificateAuthority,
                                                   aggregator: Identity) -> None:
    """Separate FIPS 204 contexts: a model signature is no update signature and vice versa."""
    model = sign_model(aggregator, "job-a", EPOCH, 4, 9, DIGEST)
    update = sign_update(aggregator, "job-a", 4, PAYLOAD)
    with pytest.raises(ModelRejected, match="signature"):
        verify_model(replace(model, signature=update.signature), ca.trust, job="job-a",
                     signer="aggregator", round_number=4, digest=DIGEST)
