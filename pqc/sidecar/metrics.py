"""Prometheus metrics of one sidecar (its own registry, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Handshakes take milliseconds on x86 and tens of milliseconds on a Raspberry Pi 4.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class SidecarMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.handshake_seconds = Histogram(
            "pqfed_handshake_seconds", "Full handshake latency", ["side"],
            buckets=_LATENCY_BUCKETS, registry=r)
        self.sign_seconds = Histogram(
            "pqfed_sign_seconds", "ML-DSA signing latency", buckets=_LATENCY_BUCKETS, registry=r)
        self.verify_seconds = Histogram(
            "pqfed_verify_seconds", "ML-DSA verification latency", buckets=_LATENCY_BUCKETS,
            registry=r)
        self.failures = Counter(
            "pqfed_channel_failures", "Handshakes or channels closed on an error",
            ["stage", "field"], registry=r)
        self.bytes = Counter("pqfed_channel_bytes", "Bytes on the wire", ["direction"],
                             registry=r)
        self.connections = Counter("pqfed_connections", "Connections accepted or opened",
                                   ["direction"], registry=r)
        self.negotiated = Counter(
            "pqfed_channels_negotiated", "Channels established, by the protocol version and "
            "key-exchange group they negotiated", ["version", "group"], registry=r)
        self.active = Gauge("pqfed_connections_active", "Open secure channels", registry=r)
        self.pump_channels = Gauge(
            "pqfed_pump_channels", "Channels whose data path runs on pump threads (TLS 1.3)",
            registry=r)
        self.pump_overflow = Counter(
            "pqfed_pump_overflow", "Channels kept on the event loop because max_pump_channels "
            "channels were on pump threads", registry=r)
        self.crl_number = Gauge("pqfed_revocation_list_number",
                                "Number of the CA revocation list in force (-1: none)",
                                registry=r)
        self.crl_number.set(-1)
        # Export every series from the start, so dashboards and alerts see zeros, not gaps.
        for side in ("server", "client"):
            self.handshake_seconds.labels(side)
        for direction in ("tx", "rx"):
            self.bytes.labels(direction)
        for direction in ("inbound", "outbound"):
            self.connections.labels(direction)
