"""An external node's updates through the real ClientApp and the aggregator's strategy: the
site's own ML-DSA-65 key and the X.509 certificate the job's CA issued from its request sign
the update (services/mods.py); `VerifiedStrategy` checks it against the job's X.509 CA and CRL
in the aggregator's identity directory (services/serverapp.py), beside operator-run clients
signing with their pqfed identities. Real Flower messages, real training, real ML-DSA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp.strategy import FedAvg

from pqfed.pqc.identity import CertificateAuthority, Identity, Role
from pqfed.pqc.pki import X509CertificateAuthority
from pqfed.pqc.pki.csr import IssuancePolicy, make_request, sign_request
from pqfed.pqc.pki.profile import certificate_pem, private_key_pem
from pqfed.pqc.pki.uri import NodeURI
from pqfed.pqc.truststore import CRL_FILE
from pqfed.services import clientapp, identity_dir, records, serverapp
from pqfed.services.models import build_model, get_weights
from pqfed.services.rounds import RoundRecorder
from pqfed.services.spec import parse_spec

JOB = "job-x"
SITE = "hospital-1"
SPEC = parse_spec({"task": "breast-cancer", "clients": 2, "minClients": 2, "rounds": 2,
                   "channel": {"protocol": "tls13"}, "externalClients": [{"nodeId": SITE}]})


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 1
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = 1


@pytest.fixture(scope="module")
def x509_ca() -> X509CertificateAuthority:
    return X509CertificateAuthority.generate(JOB)


def _site_dir(tmp: Path, ca: X509CertificateAuthority, node: str = SITE) -> tuple[Path, int]:
    """What a site holds: `pqfed ca csr`'s key, and from `<job>-cert-<node>` its certificate,
    the job's CA and CRL. Returns the directory and the certificate's serial."""
    d = tmp / f"site-{node}"
    d.mkdir(parents=True)
    key, csr = make_request(NodeURI(JOB, Role.CLIENT, node))
    cert = sign_request(ca, csr, IssuancePolicy(roles=(Role.CLIENT,), node_id=node,
                                                validity_s=86400))
    (d / "tls.key").write_bytes(private_key_pem(key))
    (d / "tls.crt").write_bytes(certificate_pem(cert))
    (d / "ca.crt").write_bytes(certificate_pem(ca.certificate))
    return d, cert.serial_number


def _aggregator_dir(tmp: Path, ca: X509CertificateAuthority, revoked: list[int], number: int
                    ) -> str:
    """The aggregator's identity directory as its pod mounts it: x509/ca.crt and crl.pem."""
    d = tmp / "aggregator"
    (d / identity_dir.X509_SUBDIR).mkdir(parents=True, exist_ok=True)
    (d / identity_dir.X509_SUBDIR / "ca.crt").write_bytes(certificate_pem(ca.certificate))
    (d / identity_dir.X509_SUBDIR / CRL_FILE).write_bytes(
        ca.revocation_list(revoked, number).public_bytes(Encoding.PEM))
    return str(d)


def _reply(directory: Path | str, pid: int, rnd: int = 1) -> Message:
    weights = get_weights(build_model("breast-cancer", seed=0))
    msg = Message(RecordDict({"arrays": ArrayRecord(weights),
                              "config": ConfigRecord({"round": rnd})}),
                  dst_node_id=100 + pid, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=100 + pid,
                      node_config={"partition-id": pid, "identity-dir": str(directory)},
                      state=RecordDict(),
                      run_config={"spec": SPEC.model_dump_json(by_alias=True), "job": JOB})
    return clientapp.client_app(msg, context)


def _operator_client(tmp: Path, ca: CertificateAuthority) -> Path:
    ident = ca.new_identity("client-0", Role.CLIENT)
    d = tmp / "client-0"
    d.mkdir()
    ident.save(d / "tls.crt", d / "tls.key")
    (d / "ca.crt").write_text(ca.root.to_pem())
    return d


def _strategy(tmp: Path, ca: CertificateAuthority, aggregator: Identity,
              sites: tuple[object, tuple[str, ...]] | None) -> serverapp.VerifiedStrategy:
    s = serverapp.VerifiedStrategy(FedAvg(), trust=ca.trust, job=JOB,
                                   recorder=RoundRecorder(tmp / "state", JOB, SPEC),
                                   audit=None, round_offset=0, min_clients=2,
                                   sites=sites)  # type: ignore[arg-type]
    s._global = [np.asarray(w) for w in get_weights(build_model("breast-cancer", seed=0))]
    return s


def test_a_site_signed_update_counts_beside_an_operator_client(
        tmp_path: Path, ca: CertificateAuthority, aggregator: Identity,
        x509_ca: X509CertificateAuthority) -> None:
    site, _ = _site_dir(tmp_path, x509_ca)
    reply = _reply(site, 1)
    assert records.SITE_SIGNED in reply.content[records.UPDATE_KEY]
    agg = _aggregator_dir(tmp_path, x509_ca, [], 1)
    strategy = _strategy(tmp_path, ca, aggregator,
                         (identity_dir.x509_trust_store(agg), SPEC.external_node_ids))
    arrays, _ = strategy.aggregate_train(1, [_reply(_operator_client(tmp_path, ca), 0), reply])
    assert arrays is not None
    rec = strategy.recorder._open[1]
    assert sorted(rec.participants) == ["client-0", SITE] and rec.rejected_updates == 0


def test_a_revoked_site_is_refused(tmp_path: Path, ca: CertificateAuthority,
                                   aggregator: Identity,
                                   x509_ca: X509CertificateAuthority) -> None:
    site, serial = _site_dir(tmp_path, x509_ca)
    agg = _aggregator_dir(tmp_path, x509_ca, [serial], 2)
    strategy = _strategy(tmp_path, ca, aggregator,
                         (identity_dir.x509_trust_store(agg), SPEC.external_node_ids))
    arrays, _ = strategy.aggregate_train(1, [_reply(_operator_client(tmp_path, ca), 0),
                                             _reply(site, 1)])
    assert arrays is None  # one valid update < minClients=2: the model is kept
    rec = strategy.recorder._open[1]
    assert rec.participants == ["client-0"] and rec.rejected_updates == 1
    assert "signer certificate: serial" in " ".join(rec.notes)


def test_a_job_without_external_clients_refuses_site_signed_updates(
        tmp_path: Path, ca: CertificateAuthority, aggregator: Identity,
        x509_ca: X509CertificateAuthority) -> None:
    """pqfed1 jobs and tls13 jobs without spec.externalClients: nothing but the pqfed
    identities the operator issued signs an update there (behaviour unchanged)."""
    site, _ = _site_dir(tmp_path, x509_ca)
    strategy = _strategy(tmp_path, ca, aggregator, None)
    assert strategy.aggregate_train(1, [_reply(site, 1)]) == (None, None)
    rec = strategy.recorder._open[1]
    assert rec.participants == [] and "no externalClients" in " ".join(rec.notes)


def test_an_enrolled_node_not_listed_in_external_clients_is_refused(
        tmp_path: Path, ca: CertificateAuthority, aggregator: Identity,
        x509_ca: X509CertificateAuthority) -> None:
    site, _ = _site_dir(tmp_path, x509_ca, "hospital-7")
    agg = _aggregator_dir(tmp_path, x509_ca, [], 1)
    strategy = _strategy(tmp_path, ca, aggregator,
                         (identity_dir.x509_trust_store(agg), SPEC.external_node_ids))
    strategy.aggregate_train(1, [_reply(site, 1)])
    rec = strategy.recorder._open[1]
    assert rec.participants == [] and "not one of the job's externalClients" in " ".join(rec.notes)
