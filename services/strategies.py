"""Flower strategies configured from a FederationJob spec (configured, not rewritten)."""

from __future__ import annotations

from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

from pqfed.services.spec import FederationJobSpec


def clients_per_round(spec: FederationJobSpec) -> int:
    return spec.clients_per_round or spec.clients


def build_strategy(spec: FederationJobSpec) -> Strategy:
    per_round = clients_per_round(spec)
    fraction = per_round / spec.clients
    n = spec.min_clients
    # Evaluation is central (global held-out set at the aggregator): fraction_evaluate=0
    # saves a round trip per round.
    s = spec.strategy
    inner: Strategy
    if s.name == "FedAvg":
        inner = FedAvg(fraction, 0.0, n, 0, n)
    elif s.name == "FedProx":
        inner = FedProx(fraction, 0.0, n, 0, n, proximal_mu=s.proximal_mu)
    elif s.name == "FedTrimmedAvg":
        inner = FedTrimmedAvg(fraction, 0.0, n, 0, n, beta=s.trim_fraction)
    elif s.name == "Krum":
        inner = Krum(fraction, 0.0, n, 0, n, num_malicious_nodes=s.byzantine_clients)
    else:
        inner = MultiKrum(fraction, 0.0, n, 0, n, num_malicious_nodes=s.byzantine_clients,
                          num_nodes_to_select=max(1, per_round - s.byzantine_clients))
    p = spec.privacy
    if p.enabled and p.mode == "central":
        inner = DifferentialPrivacyServerSideFixedClipping(
            inner, noise_multiplier=p.noise_multiplier, clipping_norm=p.clipping_norm,
            num_sampled_clients=per_round)
    return inner
