"""The PQC sidecar: a TCP proxy that carries an FL container's plaintext loopback traffic to
the peer's sidecar over a pqfed1 or TLS 1.3 channel (`SidecarConfig.protocol`), with FastAPI
admin endpoints."""

from pqfed.pqc.sidecar.config import Endpoint, Route, SidecarConfig
from pqfed.pqc.sidecar.proxy import Sidecar

__all__ = ["Endpoint", "Route", "Sidecar", "SidecarConfig"]
