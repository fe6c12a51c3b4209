"""Shared fixtures. Keys are generated once per session (ML-DSA keygen is cheap, but a CA per
test adds up)."""

from __future__ import annotations

import os
import shutil

import pytest

from pqfed.pqc.identity import CertificateAuthority, Identity, Role


def pytest_sessionstart(session: pytest.Session) -> None:
    """Test clusters that a killed earlier run left behind (processes, mounts, gigabytes under
    an old basetemp) are stopped and removed before this run starts its own
    (testbed/leftovers.py); clusters of runs still alive are left alone."""
    if os.geteuid() != 0 or shutil.which("findmnt") is None:
        return
    from pqfed.testbed import leftovers

    for gone in leftovers.reap():
        print(f"pqfed: removed the test cluster {gone.cluster_dir} of a run that is gone "
              f"(pid {gone.owner_pid}; {gone.unmounted} mounts; down.sh "
              f"{'ok' if gone.down_ok else 'failed, removed by hand'})")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`make test` runs its first phase in two workers, `--dist
    loadgroup`), every `slow` test (a whole federation of processes) goes to one worker, one
    after another, while the other worker takes the rest: two federations at once on two
    cores starve each other's Flower processes (an edge's object pushes then time out)."""
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(pytest.mark.xdist_group("federations"))


@pytest.fixture(scope="session")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate("fed-test")


@pytest.fixture(scope="session")
def other_ca() -> CertificateAuthority:
    return CertificateAuthority.generate("fed-test")  # same name, different key


@pytest.fixture(scope="session")
def aggregator(ca: CertificateAuthority) -> Identity:
    return ca.new_identity("aggregator", Role.AGGREGATOR)


@pytest.fixture(scope="session")
def client(ca: CertificateAuthority) -> Identity:
    return ca.new_identity("client-1", Role.CLIENT)
