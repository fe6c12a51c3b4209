from __future__ import annotations

import pytest

from pqfed.pqc.bench import _identities, peer_init, peer_task
from pqfed.pqc.pool import CryptoPool, PoolMode


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
