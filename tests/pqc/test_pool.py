from __future__ import annotations

import dataclasses
import threading
from dataclasses import replace

import pytest

from pqfed.pqc.bench import _identities, peer_init, peer_task
from pqfed.pqc.errors import HandshakeError
from pqfed.pqc.handshake import DEFAULT_SUITES, HandshakeConfig, Suite
from pqfed.pqc.identity import CertificateAuthority, Identity, Role
from pqfed.pqc.pool import CryptoPool, PoolMode, ThreadedCrypto, default_suites

from .handshake_driver import run_handshake


@pytest.mark.parametrize("mode", [PoolMode.SEQUENTIAL, PoolMode.THREADS, PoolMode.PROCESSES])
def test_pool_runs_real_crypto_in_every_mode(mode: PoolMode) -> None:
    ca, agg, cli = _identities("ML-DSA-65")
    pems = (ca.root.to_pem(), agg.certificate.to_pem(), agg.private_key_pem(),
            cli.certificate.to_pem(), cli.private_key_pem())
    with CryptoPool(mode, 2, peer_init, (pems,)) as pool:
        assert pool.map(peer_task, range(6)) == list(range(6))


def test_auto_mode_picks_by_cpu_count() -> None:
    with CryptoPool("auto", workers=1) as one:
        assert one.mode is PoolMode.SEQUENTIAL
    with pytest.raises(ValueError):
        CryptoPool("gpu")


def test_threaded_runner_drives_the_handshake_and_still_refuses_a_thief(
        ca: CertificateAuthority, client: Identity, aggregator: Identity) -> None:
    """The state machine's concurrent jobs (both peer checks, the early signature) on
    ThreadedCrypto's threads: same result as inline, and a forged CertificateVerify fails."""
    crypto = ThreadedCrypto()
    try:
        c = HandshakeConfig(client, ca.trust, parallel_auth=True, crypto=crypto)
        s = HandshakeConfig(aggregator, ca.trust, parallel_auth=True, crypto=crypto)
        r = run_handshake(c, s)
        assert r.client.session is not None and r.server.session is not None
        assert r.client.session.transcript_hash == r.server.session.transcript_hash
        thief = Identity(aggregator.certificate, ca.new_identity("x", Role.AGGREGATOR).key)
        with pytest.raises(HandshakeError, match="certificate_verify"):
            run_handshake(c, replace(s, identity=thief))
        wrong_role = ca.new_identity("c2", Role.CLIENT)
        with pytest.raises(HandshakeError, match="role"):
            run_handshake(c, replace(s, identity=wrong_role))
    finally:
        crypto.close()


def test_threaded_runner_raises_the_first_failure_after_running_every_job() -> None:
    crypto = ThreadedCrypto()
    ran: list[int] = []

    def job(i: int, fail: bool) -> int:
        ran.append(i)
        if fail:
            raise ValueError(f"job {i}")
        return i

    try:
        assert crypto.run_all([lambda: job(0, False), lambda: job(1, False)]) == [0, 1]
        ran.clear()
        with pytest.raises(ValueError, match="job 0"):
            crypto.run_all([lambda: job(0, True), lambda: job(1, True)])
        assert sorted(ran) == [0, 1]
    finally:
        crypto.close()


def test_bare_state_machine_starts_no_thread_and_reads_no_environment(
        ca: CertificateAuthority, client: Identity, aggregator: Identity,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """h11 style: the handshake module runs everything in the caller's thread, and the host
    (PQFED_AEAD, /proc/cpuinfo) does not change what it offers; the driver decides that."""
    monkeypatch.setenv("PQFED_AEAD", "CHACHA20-POLY1305")
    before = set(threading.enumerate())
    r = run_handshake(HandshakeConfig(client, ca.trust, parallel_auth=True),
                      HandshakeConfig(aggregator, ca.trust, parallel_auth=True))
    assert set(threading.enumerate()) <= before
    assert r.client.session is not None
    assert r.client.session.suite is DEFAULT_SUITES[0] is Suite.AES_256_GCM_SHA384
    assert default_suites()[0] is Suite.CHACHA20_POLY1305_SHA384  # the driver's choice


def test_session_is_immutable_and_carries_the_verified_peer(
        ca: CertificateAuthority, client: Identity, aggregator: Identity) -> None:
    r = run_handshake(HandshakeConfig(client, ca.trust), HandshakeConfig(aggregator, ca.trust))
    session = r.server.session
    assert session is not None and session.peer == client.certificate
    with pytest.raises(dataclasses.FrozenInstanceError):
        session.peer = aggregator.certificate  # type: ignore[misc]
