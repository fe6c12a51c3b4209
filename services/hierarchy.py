"""Who belongs to which edge aggregator in a hierarchical job: pure functions of the spec,
shared by the edge workload (services/edge.py, which needs Flower) and the operator's pod
builder (operator/pods.py, which must not: the operator image carries no Flower)."""

from __future__ import annotations

from pqfed.services.spec import FederationJobSpec

__all__ = ["edge_members", "edge_node_id", "edge_of"]


def edge_of(client_index: int, edges: int) -> int:
    """The edge a client belongs to (round-robin, so edges differ in size by at most one)."""
    return client_index % edges


def edge_members(spec: FederationJobSpec, edge: int) -> list[int]:
    return [i for i in range(spec.clients) if edge_of(i, spec.hierarchy.edges) == edge]


def edge_node_id(edge: int) -> str:
    return f"edge-{edge}"
