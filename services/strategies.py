"""Flower strategies configured from a FederationJob spec (configured, not rewritten)."""

from __future__ import annotations

from typing import Literal

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
    return spec.per_round


def build_strategy(spec: FederationJobSpec, level: Literal["central", "edge"] = "central"
                   ) -> Strategy:
    """The Flower strategy of one aggregation level.

    Flat jobs: the job's strategy at the central aggregator. Hierarchical jobs: the job's
    strategy at each edge (sampling the same fraction of the edge's clients, so robust
    strategies see individual client updates) and FedAvg over the edges' aggregates at the
    central aggregator, weighted by the examples behind each."""
    per_round = clients_per_round(spec)
    # Flower samples this fraction of the connected nodes: the operator's clients and the
    # external ones alike.
    fraction = per_round / spec.total_clients
    n = spec.min_clients
    if spec.hierarchy.enabled:
        if level == "central":
            return FedAvg(1.0, 0.0, 1, 0, 1)
        n = 1  # minClients is checked over all edges by the central aggregator
        per_round = max(1, per_round // spec.hierarchy.edges)
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
