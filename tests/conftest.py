"""Shared fixtures. Keys are generated once per session (ML-DSA keygen is cheap, but a CA per
test adds up)."""

from __future__ import annotations

import pytest

from pqfed.pqc.identity import CertificateAuthority, Identity, Role


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
