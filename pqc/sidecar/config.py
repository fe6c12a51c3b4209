"""Sidecar configuration: typed, validated, loadable from YAML or CLI flags."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from pqfed.pqc.handshake import Group, Suite
from pqfed.pqc.identity import Role
from pqfed.pqc.pool import default_suites


class ConfigError(ValueError):
    """A sidecar setting is invalid; the message names the field and the fix."""

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"sidecar config field {field_name!r}: {reason}")
        self.field = field_name


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, field_name: str) -> Endpoint:
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(field_name, f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:9092)")
        return cls(host.strip("[]"), int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Route:
    """Outbound: plaintext on `listen` (loopback) is carried to the sidecar at `peer`."""

    listen: Endpoint
    peer: Endpoint
    peer_node_id: str | None = None
    peer_roles: tuple[Role, ...] = (Role.AGGREGATOR, Role.EDGE)

    @classmethod
    def parse(cls, text: str) -> Route:
        """LISTEN=PEER[@NODE_ID], e.g. 127.0.0.1:19092=aggregator.fl.svc:7443@aggregator."""
        left, sep, right = text.partition("=")
        if not sep:
            raise ConfigError("routes", f"{text!r} is not LISTEN=PEER[@NODE_ID]")
        peer, _, node = right.partition("@")
        return cls(Endpoint.parse(left, "routes.listen"), Endpoint.parse(peer, "routes.peer"),
                   node or None)


_E = TypeVar("_E", bound=enum.Enum)


def _member(cls: type[_E], text: str, field_name: str) -> _E:
    """The member of `cls` whose value is `text`; ConfigError naming the field otherwise."""
    try:
        return cls(text)
    except ValueError:
        raise ConfigError(field_name, f"{text!r} is not one of: "
                          f"{', '.join(str(m.value) for m in cls)}") from None


class ChannelProtocolName(enum.Enum):
    """The wire protocol between sidecars. Both ends of a route must speak the same one."""

    PQFED1 = "pqfed1"  # pqfed's own channel and certificate format (docs/protocol.md)
    TLS13 = "tls13"  # TLS 1.3 with X.509 ML-DSA-65 certificates (docs/pki.md)

    @classmethod
    def parse(cls, text: str | None, field_name: str = "protocol") -> ChannelProtocolName:
        """The named protocol; None (not given): DEFAULT_PROTOCOL."""
        return DEFAULT_PROTOCOL if text is None else _member(cls, text, field_name)


# The sidecar's admin API (/identity, /metrics, ...; loopback only) and probe listener
# (/healthz, /readyz; no data, for the kubelet): the defaults here, the operator's pods too.
ADMIN_PORT: Final = 9901
PROBE_PORT: Final = 9902

# The channel protocol wherever none is named (the sidecar's --protocol and YAML `protocol`,
# SidecarConfig; the operator's spec.channel.protocol reads it from here). Why pqfed1:
# docs/protocol.md, "Which protocol is the default, and why".
DEFAULT_PROTOCOL = ChannelProtocolName.PQFED1


class DataPath(enum.Enum):
    """Where an established channel's bytes are moved (docs/protocol.md, "Data path")."""

    THREADS = "threads"  # two pump threads per channel, OpenSSL on large buffers (tls13 only)
    EVENT_LOOP = "asyncio"  # the sidecar's event loop, 64 KiB per round (both protocols)

    @classmethod
    def parse(cls, text: str | None, field_name: str = "dataPath") -> DataPath | None:
        return None if text is None else _member(cls, text, field_name)


# The TLS 1.3 name of each group the tls13 protocol offers (draft-ietf-tls-ecdhe-mlkem).
TLS_GROUP_NAMES: dict[Group, str] = {Group.X25519_MLKEM768: "X25519MLKEM768"}

# What an operator may read through an aggregator's sidecar: progress and the checkpoint.
OPERATOR_PATHS: tuple[str, ...] = ("/status", "/checkpoint")
LOOPBACK_HOSTS: tuple[str, ...] = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    # pqfed1: pqfed certificate, key, CA and revocation list (`pqfed ca init|issue|crl`).
    # tls13: X.509 PEM: the ML-DSA-65 node certificate, its PKCS#8 key, the X.509 CA
    # certificate and the CA's X.509 CRL (`pqfed ca x509-init|csr|sign|x509-crl`).
    cert: Path
    key: Path
    ca: Path
    listen: Endpoint | None = None  # inbound secure port (aggregators, edge aggregators)
    upstream: Endpoint | None = None  # local plaintext app port for inbound connections
    routes: tuple[Route, ...] = ()
    # The admin API (/identity, /metrics, /healthz, /readyz) has no authentication, so it
    # listens on loopback only. A kubelet's httpGet probes reach the pod IP: give them
    # `probes`, a second listener that answers /healthz and /readyz with a status and nothing
    # else, and may bind the pod network (e.g. 0.0.0.0:9902).
    admin: Endpoint | None = field(default_factory=lambda: Endpoint("127.0.0.1", ADMIN_PORT))
    probes: Endpoint | None = None
    groups: tuple[Group, ...] = (Group.X25519_MLKEM768,)
    suites: tuple[Suite, ...] = field(default_factory=default_suites)
    handshake_timeout_s: float = 10.0
    crypto_threads: int = 4
    # Inbound handshakes not yet authenticated, at most: a ClientHello needs no secret but
    # costs the server an encapsulation and an ML-DSA signature. Past it, connections are
    # refused at once (and counted) instead of queueing crypto work for strangers.
    max_pending_handshakes: int = 64
    allowed_client_roles: tuple[Role, ...] = (Role.CLIENT, Role.EDGE)
    # Inbound only: if set, peers may send nothing but HTTP/1.1 requests under these paths.
    allow_path_prefixes: tuple[str, ...] = ()
    # Inbound only: channels from an operator identity go here instead (the aggregator's
    # status API on loopback), limited to GET of OPERATOR_PATHS. None: operators are refused.
    operator_upstream: Endpoint | None = None
    # The federation CA's revocation list (revocation.py), re-read every reload_interval_s
    # together with cert and key; None: no list (nothing revoked). A missing file counts as
    # "not published yet" until it appears.
    crl: Path | None = None
    reload_interval_s: float = 2.0
    protocol: ChannelProtocolName = DEFAULT_PROTOCOL
    # None: the protocol's own (tls13: threads; pqfed1, whose records are sealed in Python:
    # the event loop). THREADS bounds its threads: past max_pump_channels channels (two
    # threads each) a channel stays on the event loop.
    data_path: DataPath | None = None
    max_pump_channels: int = 64

    def __post_init__(self) -> None:
        if (self.data_path is DataPath.THREADS
                and self.protocol is not ChannelProtocolName.TLS13):
            raise ConfigError("dataPath", "threads needs protocol tls13 (pqfed1 runs on the "
                              "event loop): drop dataPath or set protocol tls13")
        if self.max_pump_channels < 0:
            raise ConfigError("maxPumpChannels", "must be >= 0 (0: every channel on the event "
                              "loop)")
        if self.protocol is ChannelProtocolName.TLS13:
            bad = [g.name for g in self.groups if g not in TLS_GROUP_NAMES]
            if bad:
                raise ConfigError("groups", f"{', '.join(bad)} not available with protocol "
                                  f"tls13; use {', '.join(g.name for g in TLS_GROUP_NAMES)}")
        if (self.listen is None) != (self.upstream is None):
            raise ConfigError("listen", "set both listen and upstream, or neither")
        if self.listen is None and not self.routes:
            raise ConfigError("routes", "nothing to do: give listen+upstream and/or routes")
        if self.handshake_timeout_s <= 0:
            raise ConfigError("handshake_timeout_s", "must be > 0 seconds")
        if self.reload_interval_s <= 0:
            raise ConfigError("reloadIntervalSeconds", "must be > 0 seconds")
        if self.crypto_threads < 1:
            raise ConfigError("crypto_threads", "must be >= 1")
        if self.max_pending_handshakes < 1:
            raise ConfigError("maxPendingHandshakes", "must be >= 1")
        if self.admin is not None and self.admin.host not in LOOPBACK_HOSTS:
            raise ConfigError("admin", f"{self.admin} must be a loopback address (e.g. "
                              f"127.0.0.1:{ADMIN_PORT}): /identity and /metrics are "
                              "unauthenticated; for kubelet probes on the pod IP give probes "
                              f"(--probes 0.0.0.0:{PROBE_PORT}) instead")
        if (self.admin is not None and self.probes is not None
                and self.admin.port == self.probes.port and self.admin.port != 0):
            raise ConfigError("probes", f"{self.probes} shares its port with admin "
                              f"{self.admin}; give it its own port")
        for route in self.routes:
            if route.listen.host not in LOOPBACK_HOSTS:
                raise ConfigError("routes.listen", f"{route.listen} must be a loopback address: "
                                  "plaintext never leaves the pod")
        for prefix in self.allow_path_prefixes:
            if not prefix.startswith("/"):
                raise ConfigError("allowPathPrefixes", f"{prefix!r} must start with '/'")
        for name, upstream in (("upstream", self.upstream),
                               ("operatorUpstream", self.operator_upstream)):
            if upstream is not None and upstream.host not in LOOPBACK_HOSTS:
                raise ConfigError(name, "must be a loopback address: plaintext stays local")
        if self.operator_upstream is not None and self.listen is None:
            raise ConfigError("operatorUpstream", "needs listen + upstream (an inbound sidecar)")
        if Role.OPERATOR in self.allowed_client_roles:
            raise ConfigError("allowed_client_roles", "an operator never reaches the Fleet "
                              "API: give operatorUpstream instead")

    @property
    def pump_threads(self) -> bool:
        """Whether established channels move their bytes on pump threads."""
        if self.data_path is None:
            return self.protocol is ChannelProtocolName.TLS13
        return self.data_path is DataPath.THREADS

    @property
    def inbound_peer_roles(self) -> tuple[Role, ...]:
        """Who may open a channel to `listen`: the allowed client roles, and the operator
        when `operator_upstream` is set (its channels go there, limited to GET)."""
        operator = (Role.OPERATOR,) if self.operator_upstream is not None else ()
        return (*self.allowed_client_roles, *operator)

    @classmethod
    def from_mapping(cls, data: dict[str, Any], base: Path = Path()) -> SidecarConfig:
        known = {"cert", "key", "ca", "listen", "upstream", "routes", "admin", "groups",
                 "suites", "handshakeTimeoutSeconds", "cryptoThreads", "allowPathPrefixes",
                 "operatorUpstream", "maxPendingHandshakes", "probes", "crl",
                 "reloadIntervalSeconds", "protocol", "dataPath", "maxPumpChannels"}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(sorted(unknown)[0],
                              f"unknown field; known: {', '.join(sorted(known))}")
        for required in ("cert", "key", "ca"):
            if required not in data:
                raise ConfigError(required, "required (path to a PEM file)")
        if "groups" in data and not isinstance(data["groups"], list):
            raise ConfigError("groups", "must be a list of group names")
        try:
            groups = tuple(Group[g] for g in data.get("groups", ["X25519_MLKEM768"]))
        except KeyError as exc:
            raise ConfigError("groups", f"unknown group {exc}; use {[g.name for g in Group]}"
                              ) from None
        try:
            suites = (tuple(Suite[s] for s in data["suites"]) if "suites" in data
                      else default_suites())
        except KeyError as exc:
            raise ConfigError("suites", f"unknown suite {exc}; use {[s.name for s in Suite]}"
                              ) from None
        return cls(
            cert=base / data["cert"], key=base / data["key"], ca=base / data["ca"],
            listen=Endpoint.parse(data["listen"], "listen") if data.get("listen") else None,
            upstream=(Endpoint.parse(data["upstream"], "upstream") if data.get("upstream")
                      else None),
            routes=tuple(Route.parse(r) for r in data.get("routes", [])),
            admin=Endpoint.parse(data["admin"], "admin") if data.get("admin") else None,
            probes=Endpoint.parse(data["probes"], "probes") if data.get("probes") else None,
            groups=groups, suites=suites,
            handshake_timeout_s=float(data.get("handshakeTimeoutSeconds", 10.0)),
            crypto_threads=int(data.get("cryptoThreads", 4)),
            allow_path_prefixes=tuple(data.get("allowPathPrefixes", ())),
            operator_upstream=(Endpoint.parse(data["operatorUpstream"], "operatorUpstream")
                               if data.get("operatorUpstream") else None),
            max_pending_handshakes=int(data.get("maxPendingHandshakes", 64)),
            crl=base / data["crl"] if data.get("crl") else None,
            reload_interval_s=float(data.get("reloadIntervalSeconds", 2.0)),
            protocol=ChannelProtocolName.parse(
                None if data.get("protocol") is None else str(data["protocol"])),
            data_path=DataPath.parse(
                None if data.get("dataPath") is None else str(data["dataPath"])),
            max_pump_channels=int(data.get("maxPumpChannels", 64)),
        )

    @classmethod
    def from_yaml(cls, path: Path) -> SidecarConfig:
        import yaml  # only for --config: the flag-built sidecar never loads it

        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict):
            raise ConfigError("(root)", f"{path} must hold a mapping")
        return cls.from_mapping(data, path.parent)
