"""The one model of a federation job, shared by the CRD generator, the operator, the local
runner (`pqfed run`) and the CLI.

Field names are camelCase, as in every Kubernetes API, so a job file and a `FederationJob`
custom resource have the same `spec`. Every error names the field by its path
(`spec.secureAggregation.reconstructionThreshold`) and says how to fix it.

One truth for bad input: every bound and pattern here becomes the CRD's OpenAPI schema, every
validator is mirrored by a CEL rule the CRD generator emits (`RULES`, `LABEL_KEY_CEL`) or is
listed in `OPERATOR_ONLY` with the reason CEL cannot check it, and the parsing is as strict as
the API server's: no string-to-number or string-to-bool coercion, no non-finite numbers, null
treated as absent only where the API server prunes it and applies a default.
tests/operator/test_crd.py walks every validator and fails on one that is mirrored nowhere.

It stays one module past our ~500-line habit because the model, its CEL mirrors (`RULES`,
`OPERATOR_ONLY`), the error wording and the API-server-strict loading are one contract: a field,
its bounds, the rule the API server checks and the message a user reads change together, and
the CRD generator and its test read them side by side.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Final, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_camel

from pqfed.pqc.sidecar.config import DEFAULT_PROTOCOL

# The FederationJob custom resource: its one home (operator/crd.py, the operator, the CLI, the
# testbed and the benchmarks import these).
API_GROUP = "pqfed.io"
API_VERSION = "v1alpha1"
API_GROUP_VERSION = f"{API_GROUP}/{API_VERSION}"
KIND = "FederationJob"
PLURAL = "federationjobs"

TaskName = Literal["breast-cancer", "hapt", "ecg-sim"]
# The wire protocols between a job's sidecars (pqfed.pqc.sidecar.config.ChannelProtocolName).
ChannelProtocol = Literal["pqfed1", "tls13"]
# The built-in channel protocol is chosen in one place, the sidecar's DEFAULT_PROTOCOL
# (docs/protocol.md says why); the chart's `jobDefaults.channelProtocol` overrides it
# operator-wide.
DEFAULT_CHANNEL_PROTOCOL: Final[ChannelProtocol] = DEFAULT_PROTOCOL.value
# What the API server answers to an edit of channel.protocol (a CEL transition rule).
PROTOCOL_CHANGE_MESSAGE: Final = (
    "channel.protocol cannot change on an existing job: its identities, sidecars and the "
    "operator's own channel were set up for the protocol it was created with; delete the job "
    "and create it again with the new protocol")
StrategyName = Literal["FedAvg", "FedProx", "FedTrimmedAvg", "Krum", "MultiKrum"]

# Patterns are anchored and use only what both RE2 (the API server, CEL `matches`) and the
# Rust regex engine behind pydantic's `pattern` understand; in both `$` is the end of the
# text, never "before a trailing newline" as in Python's `re.match`.
_PARTITION = r"^(iid|natural|dirichlet:(0\.[0-9]*[1-9][0-9]*|[1-9][0-9]*(\.[0-9]+)?))$"

# Kubernetes label syntax (apimachinery validation.IsQualifiedName / IsValidLabelValue): an
# optional DNS-1123 subdomain prefix of at most 253 characters and '/', then a name of at most
# 63 characters. A Pod whose nodeSelector breaks it is refused, so the job must be too.
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
LABEL_KEY_PATTERN: Final = rf"^({_DNS_LABEL}(\.{_DNS_LABEL})*/)?{_LABEL_NAME}$"
LABEL_KEY_MAX: Final = 253 + 1 + 63
LABEL_VALUE_PATTERN: Final = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
MAX_SELECTOR_LABELS: Final = 32

# Image references as the distribution/reference grammar defines them: [domain/]path[:tag]
# [@digest]; the domain needs a dot, a port or to be localhost (otherwise it is a path
# component, lowercase only); sha256/sha512 digests with their exact lengths.
_DOMAIN_PART = r"([a-zA-Z0-9]|[a-zA-Z0-9][-a-zA-Z0-9]*[a-zA-Z0-9])"
_DOMAIN = (rf"({_DOMAIN_PART}(\.{_DOMAIN_PART})+(:[0-9]{{1,5}})?|localhost(:[0-9]{{1,5}})?|"
           rf"{_DOMAIN_PART}:[0-9]{{1,5}})")
_PATH_PART = r"[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*"
IMAGE_PATTERN: Final = (rf"^({_DOMAIN}/)?{_PATH_PART}(/{_PATH_PART})*"
                        r"(:[A-Za-z0-9_][-A-Za-z0-9_.]{0,127})?"
                        r"(@(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128}))?$")
IMAGE_MAX: Final = 512
# The images `make images` builds (images/build.py): localhost/pqfed/{operator,sidecar,fl}.
IMAGE_PREFIX: Final = "localhost/pqfed"
IMAGE_VERSION: Final = "0.1.0"

# metadata.name: "<name>-aggregator" must stay a valid 63-character Service/DNS label.
NAME_MAX: Final = 63 - len("-aggregator")
NAME_PATTERN: Final = rf"^[a-z0-9]([-a-z0-9]{{0,{NAME_MAX - 2}}}[a-z0-9])?$"


_LABEL_KEY_SYNTAX: Final = (
    "a Kubernetes label key: [prefix/]name, prefix a DNS subdomain of at most 253 characters "
    "(lowercase, digits, '-', single dots), name at most 63 of [-A-Za-z0-9_.] starting and "
    "ending alphanumeric")


def _label_key(key: str) -> str:
    """A node-selector key; the same check as `LABEL_KEY_CEL` on the API server."""
    if len(key) > LABEL_KEY_MAX or not re.fullmatch(LABEL_KEY_PATTERN, key) \
            or ("/" in key and key.index("/") > 253):
        raise ValueError(f"not {_LABEL_KEY_SYNTAX}; fix or remove the key")
    return key


# The CEL twin of `_label_key` (emitted on both selector maps). Sizes are checked first so the
# regex never runs on an oversized key; `indexOf` is from the Kubernetes CEL strings library.
LABEL_KEY_CEL: Final = (f"self.all(k, k.size() <= {LABEL_KEY_MAX} && "
                        f"k.matches(r'{LABEL_KEY_PATTERN}') && "
                        "(!k.contains('/') || k.indexOf('/') <= 253))")
LABEL_KEY_MESSAGE: Final = f"every key must be {_LABEL_KEY_SYNTAX}; fix or remove the key"


# A null label value would be pruned by the API server, silently dropping the constraint
# (`ward:` with nothing after it is null in YAML) and letting pods land on any node. So the
# CRD keeps nulls in the selector maps (`nullable` values) and refuses them with this rule;
# `pqfed run` refuses them as "not a string".
LABEL_VALUE_NOT_NULL_CEL: Final = "self.all(k, type(self[k]) == string)"
LABEL_VALUE_NOT_NULL_MESSAGE: Final = (
    "every value must be a label value, not null; write the value (\"\" for an empty one) or "
    "remove the key")


def _selector(description: str) -> Any:
    return Field(default_factory=dict, max_length=MAX_SELECTOR_LABELS, description=description,
                 json_schema_extra={"x-kubernetes-validations": [
                     {"rule": LABEL_KEY_CEL, "message": LABEL_KEY_MESSAGE,
                      "reason": "FieldValueInvalid"},
                     {"rule": LABEL_VALUE_NOT_NULL_CEL, "message": LABEL_VALUE_NOT_NULL_MESSAGE,
                      "reason": "FieldValueInvalid"}]})


LabelKey = Annotated[str, AfterValidator(_label_key)]
# `nullable` only in the CRD, so the API server keeps a null for the rule above to refuse.
LabelValue = Annotated[str, Field(pattern=LABEL_VALUE_PATTERN, max_length=63,
                                  json_schema_extra={"nullable": True})]


class _Spec(BaseModel):
    # strict: "64" is not 64 and "true" is not True (the API server refuses both); no inf/nan
    # (JSON cannot carry them and the bounds would be meaningless).
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              frozen=True, strict=True, allow_inf_nan=False)


class DatasetSpec(_Spec):
    """Which data each client holds. `natural` is HAPT's per-subject split (non-IID)."""

    partition: Annotated[str, Field(pattern=_PARTITION, max_length=32)] = Field(
        "iid", description="How the data is split over the clients: iid (uniformly at random), "
        "natural (HAPT only: one subject per client) or "
        "dirichlet:<alpha> (label skew; smaller alpha, more skew)")
    seed: int = Field(0, ge=0, le=2**32 - 1,
                      description="Seed for partitioning, model initialisation and training "
                                  "(NumPy: below 2^32)")
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="Reserved: accepted and validated but not applied yet; "
        "every task holds out a fixed 15% per client and 15% as the global test set")


class TrainingSpec(_Spec):
    """Local training on each client, every round."""

    local_epochs: int = Field(1, ge=1, le=100,
                              description="Passes over the client's training data per round")
    batch_size: int = Field(32, ge=1, le=4096, description="Examples per SGD mini-batch")
    learning_rate: float = Field(0.01, gt=0, le=10, description="SGD learning rate")


class StrategySpec(_Spec):
    """Flower strategies. Robust ones (FedTrimmedAvg, Krum, MultiKrum) defend against
    poisoned updates; FedProx adds a proximal term for non-IID clients."""

    name: StrategyName = Field("FedAvg", description="The Flower aggregation strategy")
    proximal_mu: float = Field(0.0, ge=0, le=100,
                               description="FedProx only: weight (mu) of the proximal term "
                                           "that keeps local models near the global one")
    trim_fraction: float = Field(0.2, ge=0, lt=0.5,
                                 description="FedTrimmedAvg only: fraction (beta) of the "
                                             "largest and of the smallest values dropped per "
                                             "coordinate before averaging")
    byzantine_clients: int = Field(0, ge=0, le=1000,
                                   description="Krum/MultiKrum only: how many attackers to "
                                               "tolerate per round (needs clients per round "
                                               ">= 2*byzantineClients+3)")


class PrivacySpec(_Spec):
    """Differential privacy with Flower's wrappers: central (server adds noise to the clipped
    aggregate) or local (LocalDpMod on each client)."""

    enabled: bool = Field(False, description="Apply differential privacy")
    mode: Literal["central", "local"] = Field(
        "central", description="central: the aggregator clips each update and adds Gaussian "
        "noise to the aggregate; local: each client clips and noises its own update")
    clipping_norm: float = Field(1.0, gt=0, le=1e6,
                                 description="L2 norm each model update is clipped to")
    noise_multiplier: float = Field(
        1.0, ge=0, le=1000, description="Central DP: noise standard deviation as a multiple "
        "of clippingNorm (0 adds no noise and spends an unbounded epsilon)")
    target_epsilon: float | None = Field(
        None, gt=0, le=1e6, description="Privacy budget (epsilon) of the whole job. Central "
        "DP runs fewer rounds rather than exceed it; local DP needs it and spends it evenly "
        "over the rounds. Default: no budget")
    delta: float = Field(1e-5, gt=0, lt=1,
                         description="DP delta of the whole job (the (epsilon, delta) budget)")


class SecureAggregationSpec(_Spec):
    """Flower SecAgg+: the aggregator only learns the sum of the updates."""

    enabled: bool = Field(False, description="Run every round as a SecAgg+ round "
                                             "(not with compression, DP or hierarchy)")
    num_shares: int = Field(3, ge=2, le=1000,
                            description="Shares each client's secrets are split into, one per "
                                        "peer (at least 3 and at most the clients per round)")
    reconstruction_threshold: int = Field(
        2, ge=1, le=1000, description="Shares needed to reconstruct a dropped client's secret "
        "(at least 2 and below numShares)")
    clipping_range: float = Field(8.0, gt=0, le=1e6,
                                  description="Model values are clipped to "
                                              "[-clippingRange, clippingRange] before "
                                              "quantization")
    quantization_range: int = Field(4194304, ge=2, le=2**31 - 1,
                                    description="Number of integer levels the clipped values "
                                                "are quantized to")


class CompressionSpec(_Spec):
    """Compression of client updates and, optionally, of the global-model broadcast, with
    error feedback on both sides (docs/federation.md)."""

    method: Literal["none", "topk", "int8", "topk+int8"] = Field(
        "none", description="Client update encoding: none (fp32), topk (largest magnitudes "
        "only), int8 (symmetric 8-bit quantization) or both")
    topk_fraction: float = Field(0.1, gt=0, le=1,
                                 description="Share of each tensor's weights top-k keeps")
    downlink: bool = Field(True, description="When a method is set, also compress the "
                                             "global-model broadcast (steps against the model "
                                             "each node holds)")


class HierarchySpec(_Spec):
    """Edge aggregators pre-aggregate their clients before the central aggregator."""

    enabled: bool = Field(False, description="Put edge aggregators between the clients and "
                                             "the central aggregator")
    edges: int = Field(2, ge=1, le=100,
                       description="Number of edge aggregators; client i joins edge i mod "
                                   "edges (at most clients)")


class CryptoSpec(_Spec):
    """Post-quantum settings of the job's channels, certificates and signatures."""

    kem: Literal["ML-KEM-768", "ML-KEM-1024"] = Field(
        "ML-KEM-768", description="Key establishment of the PQC channels: hybrid X25519 + "
        "this ML-KEM parameter set (FIPS 203)")
    signature: Literal["ML-DSA-44", "ML-DSA-65", "ML-DSA-87"] = Field(
        "ML-DSA-65", description="Signature of the node certificates, handshakes, updates and "
        "models: this ML-DSA parameter set (FIPS 204)")
    aead: Literal["auto", "AES-256-GCM", "CHACHA20-POLY1305"] = Field(
        "auto", description="Reserved: accepted and validated but not applied yet; the "
        "sidecars negotiate AES-256-GCM first where the CPU has AES instructions, else "
        "ChaCha20-Poly1305")
    backend: Literal["auto", "pyca", "liboqs"] = Field(
        "auto", description="PQC implementation: auto (liboqs when its library is present, "
        "else pyca; liboqs measured faster, docs/BENCHMARKS.md), pyca (OpenSSL via "
        "pyca/cryptography) or liboqs (Open Quantum Safe; fails if absent)")
    parallel_workers: int = Field(
        0, ge=0, le=256, description="Reserved: accepted and validated but not applied yet "
        "(0 = one per CPU); the sidecars size their crypto thread pool themselves")
    pool: Literal["auto", "sequential", "threads", "processes"] = Field(
        "auto", description="Reserved: accepted and validated but not applied yet; how crypto "
        "for many peers would run in parallel (pqfed.pqc.pool, measured by make bench-pqc)")
    certificate_lifetime_seconds: int = Field(
        86400, ge=300, le=30 * 86400,
        description="Lifetime of the node certificates the operator issues (and of its "
        "revocation lists); it renews each at 2/3 of its lifetime, and the sidecars reload "
        "them. Short lifetimes bound how long a key that leaked stays usable even unrevoked")


class ChannelSpec(_Spec):
    """The secure channel between the job's sidecars (and the operator's to the aggregator)."""

    protocol: ChannelProtocol = Field(
        DEFAULT_CHANNEL_PROTOCOL, description="Wire protocol of every channel of the job: "
        "pqfed1 (pqfed's own hybrid handshake and certificate format, docs/protocol.md) or "
        "tls13 (TLS 1.3 with X25519MLKEM768 and X.509 ML-DSA-65 certificates both ways, "
        "docs/pki.md). Default: the chart's jobDefaults.channelProtocol, else pqfed1. Fixed "
        "when the job is created",
        json_schema_extra={"x-kubernetes-validations": [
            {"rule": "self == oldSelf", "message": PROTOCOL_CHANGE_MESSAGE,
             "reason": "FieldValueForbidden"}]})


class TimeoutSpec(_Spec):
    """Time limits, in seconds."""

    round_seconds: int = Field(600, ge=5, le=7 * 86400,
                               description="Seconds the aggregator waits for a round's "
                                           "replies; late updates miss the round")
    handshake_seconds: float = Field(
        10.0, gt=0, le=300, description="Reserved: accepted and validated but not applied "
        "yet; the sidecars give a PQC handshake 10 seconds")


class PlacementSpec(_Spec):
    """Where pods run (Kubernetes only): client pods spread over nodes matching
    `nodeSelector`, the aggregator on nodes matching `aggregatorNodeSelector`."""

    node_selector: dict[LabelKey, LabelValue] = _selector(
        "Labels a node must carry to run client pods (Kubernetes label syntax)")
    aggregator_node_selector: dict[LabelKey, LabelValue] = _selector(
        "Labels a node must carry to run the aggregator pod (Kubernetes label syntax)")
    spread: bool = Field(True, description="Spread client pods evenly across nodes (a "
                                           "topology spread constraint on the hostname)")


# A node id of a site (pqfed://<job>/client/<node id>, docs/pki.md): the node URI's label rule.
NODE_ID_PATTERN: Final = r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$"
# Node ids the operator issues to the nodes it runs (operator/pods.py); a site cannot take one.
RESERVED_NODE_IDS: Final = ("aggregator", "operator")
RESERVED_NODE_ID_PATTERN: Final = r"^(client|edge)-[0-9]+$"


class ExternalClientSpec(_Spec):
    """A client the operator does not run: a site that keeps its own ML-DSA-65 key, enrolled
    through a PKCS#10 request and an admin's approval (docs/pki.md), running its own sidecar
    and Flower client (`pqfed site run`)."""

    node_id: str = Field(
        min_length=1, max_length=63, pattern=NODE_ID_PATTERN,
        description="The site's node id: the last segment of its certificate's URI "
        "pqfed://<job>/client/<nodeId> and of its request ConfigMap <job>-csr-<nodeId>. "
        "Lowercase letters, digits, '-' and '.'; not aggregator, operator, client-N or edge-N "
        "(the operator's own nodes)")


class FederationJobSpec(_Spec):
    task: TaskName = Field(
        "breast-cancer", description="What to learn: breast-cancer (Wisconsin diagnostic, "
        "tabular), hapt (smartphone activity recognition, 30 subjects) or ecg-sim "
        "(simulated single-lead ECG rhythms, not patient data)")
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    rounds: int = Field(3, ge=1, le=10000, description="Federated rounds to run")
    clients: int = Field(3, ge=1, le=1000,
                         description="Client nodes taking part (one pod each under the "
                                     "operator)")
    clients_per_round: int | None = Field(None, ge=1, le=1000,
                                          description="Clients sampled each round. Default: "
                                                      "all clients")
    min_clients: int = Field(2, ge=1, le=1000,
                             description="A round with fewer valid updates keeps the global "
                                         "model (at most clients)")
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    strategy: StrategySpec = Field(default_factory=StrategySpec)
    privacy: PrivacySpec = Field(default_factory=PrivacySpec)
    secure_aggregation: SecureAggregationSpec = Field(default_factory=SecureAggregationSpec)
    compression: CompressionSpec = Field(default_factory=CompressionSpec)
    hierarchy: HierarchySpec = Field(default_factory=HierarchySpec)
    crypto: CryptoSpec = Field(default_factory=CryptoSpec)
    channel: ChannelSpec = Field(default_factory=ChannelSpec)
    external_clients: list[ExternalClientSpec] = Field(
        default_factory=list, max_length=100,
        description="Clients run by their sites, not by the operator (tls13 jobs only): each "
        "enrols its own key (docs/pki.md) and counts as a client like the `clients` the "
        "operator runs (minClients, clientsPerRound and the rounds' participants count both). "
        "One that never connects is treated like a lost client: its rounds go on without it, "
        "and a round with fewer than minClients valid updates keeps the global model")
    timeouts: TimeoutSpec = Field(default_factory=TimeoutSpec)
    placement: PlacementSpec = Field(default_factory=PlacementSpec)
    image: str = Field(f"{IMAGE_PREFIX}/fl:{IMAGE_VERSION}", min_length=1,
                       max_length=IMAGE_MAX, pattern=IMAGE_PATTERN,
                       description="Image of the FL container (torch + Flower): "
                                   "[registry/]repository[:tag][@sha256:digest], repository "
                                   "lowercase. The default is what `make images` builds and "
                                   "docs/helm.md imports (air-gapped k3s) or pushes")
    sidecar_image: str = Field(f"{IMAGE_PREFIX}/sidecar:{IMAGE_VERSION}", min_length=1,
                               max_length=IMAGE_MAX, pattern=IMAGE_PATTERN,
                               description="Image of the PQC sidecar containers (no torch): "
                                           "[registry/]repository[:tag][@sha256:digest]")

    @property
    def total_clients(self) -> int:
        """The operator's clients plus the external ones."""
        return self.clients + len(self.external_clients)

    @property
    def external_node_ids(self) -> tuple[str, ...]:
        return tuple(e.node_id for e in self.external_clients)

    @property
    def per_round(self) -> int:
        return self.clients_per_round or self.total_clients

    @model_validator(mode="after")
    def _cross_field(self) -> FederationJobSpec:
        # Every rule is a `SpecRule`: the same rule in Python (here) and in CEL (emitted into
        # the CRD), so the API server refuses the jobs `pqfed run` refuses, with the same text.
        broken = [r for r in RULES if not r.holds(self)]
        if broken:
            raise ValueError("\n".join(f"{r.field}: {r.message}" for r in broken))
        return self


@dataclass(frozen=True)
class SpecRule:
    """One cross-field rule of `FederationJobSpec`.

    `holds` is the rule in Python, `cel` the same rule in CEL evaluated on `spec` (`self`).
    Both report `field` (relative to spec; the CRD's `fieldPath`) with `message`, which is
    static: the API server's cost estimator treats `string(int)` as unbounded and refuses a
    `messageExpression` that prints a number. CEL arithmetic is written so that it can neither
    overflow nor divide by zero on any value the schema lets through (or rejects: the API
    server evaluates the rules even when a bound already failed).
    """

    name: str
    field: str
    cel: str
    message: str
    holds: Callable[[FederationJobSpec], bool]


@dataclass(frozen=True)
class OperatorOnlyRule:
    """A rule no CEL rule can check, checked by the operator and reported in
    `status.conditions[type=condition]` with `reason`; `why_not_cel` says why."""

    name: str
    field: str
    why_not_cel: str
    condition: str
    reason: str


# Every client: the operator's and the external ones (`FederationJobSpec.total_clients`).
_TOTAL: Final = "(self.clients + size(self.externalClients))"
# Per-round client count (`clientsPerRound or` all clients).
_PER_ROUND: Final = f"(has(self.clientsPerRound) ? self.clientsPerRound : {_TOTAL})"
_KRUM: Final = ("Krum", "MultiKrum")


def _krum_ok(clients: int, byzantine: int) -> bool:
    return clients >= 3 and byzantine <= (clients - 3) // 2  # clients >= 2f+3, no overflow


RULES: Final[tuple[SpecRule, ...]] = (
    SpecRule(
        "minClients<=clients", "minClients",
        f"self.minClients <= {_TOTAL}",
        "minClients must be <= clients (plus externalClients); lower minClients or add "
        "clients",
        lambda s: s.min_clients <= s.total_clients),
    SpecRule(
        "clientsPerRound<=clients", "clientsPerRound",
        f"!has(self.clientsPerRound) || self.clientsPerRound <= {_TOTAL}",
        "clientsPerRound must be <= clients (plus externalClients); lower clientsPerRound or "
        "add clients",
        lambda s: s.per_round <= s.total_clients),
    SpecRule(
        "clientsPerRound>=minClients", "clientsPerRound",
        "!has(self.clientsPerRound) || self.clientsPerRound >= self.minClients",
        "clientsPerRound must be >= minClients; raise clientsPerRound or lower minClients",
        lambda s: s.clients_per_round is None or s.clients_per_round >= s.min_clients),
    SpecRule(
        "krum-byzantine", "strategy.byzantineClients",
        "!(self.strategy.name in ['Krum', 'MultiKrum']) || "
        f"({_PER_ROUND} >= 3 && self.strategy.byzantineClients <= ({_PER_ROUND} - 3) / 2)",
        "Krum/MultiKrum need clientsPerRound (default: clients) >= 2*byzantineClients+3; "
        "lower strategy.byzantineClients or add clients",
        lambda s: s.strategy.name not in _KRUM or _krum_ok(s.per_round,
                                                           s.strategy.byzantine_clients)),
    SpecRule(
        "secagg-strategy", "secureAggregation.enabled",
        "!self.secureAggregation.enabled || self.strategy.name in ['FedAvg', 'FedProx']",
        "secureAggregation.enabled: FedTrimmedAvg/Krum/MultiKrum must see individual updates "
        "and SecAgg+ hides them; use strategy FedAvg/FedProx or disable secure aggregation",
        lambda s: not s.secure_aggregation.enabled or s.strategy.name in ("FedAvg", "FedProx")),
    SpecRule(
        "secagg-min-shares", "secureAggregation.numShares",
        "!self.secureAggregation.enabled || self.secureAggregation.numShares >= 3",
        "secureAggregation.numShares must be >= 3 (Flower's SecAgg+ minimum); raise numShares "
        "and add clients if needed",
        lambda s: not s.secure_aggregation.enabled or s.secure_aggregation.num_shares >= 3),
    SpecRule(
        "secagg-min-threshold", "secureAggregation.reconstructionThreshold",
        "!self.secureAggregation.enabled || "
        "self.secureAggregation.reconstructionThreshold >= 2",
        "secureAggregation.reconstructionThreshold must be >= 2 (one share would reveal a "
        "client's mask seed); raise reconstructionThreshold",
        lambda s: not s.secure_aggregation.enabled
        or s.secure_aggregation.reconstruction_threshold >= 2),
    SpecRule(
        "secagg-threshold<shares", "secureAggregation.reconstructionThreshold",
        "!self.secureAggregation.enabled || "
        "self.secureAggregation.reconstructionThreshold < self.secureAggregation.numShares",
        "secureAggregation.reconstructionThreshold must be < numShares (Flower's SecAgg+); "
        "lower reconstructionThreshold or raise numShares",
        lambda s: not s.secure_aggregation.enabled
        or s.secure_aggregation.reconstruction_threshold < s.secure_aggregation.num_shares),
    SpecRule(
        "secagg-shares<=clientsPerRound", "secureAggregation.numShares",
        f"!self.secureAggregation.enabled || self.secureAggregation.numShares <= {_PER_ROUND}",
        "secureAggregation.numShares must be <= clientsPerRound (default: clients); lower "
        "numShares or add clients",
        lambda s: not s.secure_aggregation.enabled
        or s.secure_aggregation.num_shares <= s.per_round),
    SpecRule(
        "secagg-privacy", "privacy.enabled",
        "!self.secureAggregation.enabled || !self.privacy.enabled",
        "privacy.enabled: differential privacy is not combined with secure aggregation in "
        "this release; disable one of them",
        lambda s: not (s.secure_aggregation.enabled and s.privacy.enabled)),
    SpecRule(
        "secagg-compression", "compression.method",
        "!self.secureAggregation.enabled || self.compression.method == 'none'",
        "compression.method: SecAgg+ masks dense quantized parameters; use method: none with "
        "secure aggregation or disable it",
        lambda s: not s.secure_aggregation.enabled or s.compression.method == "none"),
    SpecRule(
        "epsilon-needs-privacy", "privacy.targetEpsilon",
        "self.privacy.enabled || !has(self.privacy.targetEpsilon)",
        "privacy.targetEpsilon is a budget for differential privacy, which is disabled; set "
        "privacy.enabled: true or remove targetEpsilon",
        lambda s: s.privacy.enabled or s.privacy.target_epsilon is None),
    SpecRule(
        "local-dp-needs-epsilon", "privacy.targetEpsilon",
        "!self.privacy.enabled || self.privacy.mode != 'local' || "
        "has(self.privacy.targetEpsilon)",
        "privacy.targetEpsilon: local DP splits this budget over the rounds (epsilon and delta "
        "each divided by rounds); set it, e.g. targetEpsilon: 8",
        lambda s: not s.privacy.enabled or s.privacy.mode != "local"
        or s.privacy.target_epsilon is not None),
    SpecRule(
        "epsilon-needs-noise", "privacy.noiseMultiplier",
        "!self.privacy.enabled || self.privacy.mode != 'central' || "
        "!has(self.privacy.targetEpsilon) || self.privacy.noiseMultiplier > 0.0",
        "privacy.noiseMultiplier: central DP without noise spends an infinite epsilon, so "
        "targetEpsilon can never hold; raise noiseMultiplier or remove targetEpsilon",
        lambda s: not (s.privacy.enabled and s.privacy.mode == "central"
                       and s.privacy.target_epsilon is not None)
        or s.privacy.noise_multiplier > 0),
    SpecRule(
        "hierarchy-edges<=clients", "hierarchy.edges",
        "!self.hierarchy.enabled || self.hierarchy.edges <= self.clients",
        "hierarchy.edges must be <= clients; use at most one edge aggregator per client",
        lambda s: not s.hierarchy.enabled or s.hierarchy.edges <= s.clients),
    SpecRule(
        "hierarchy-central-dp", "privacy.mode",
        "!self.hierarchy.enabled || !self.privacy.enabled || self.privacy.mode != 'central'",
        "privacy.mode: central DP clips individual updates, which only the edges see in "
        "hierarchical mode; use privacy.mode: local or disable hierarchy",
        lambda s: not (s.hierarchy.enabled and s.privacy.enabled
                       and s.privacy.mode == "central")),
    SpecRule(
        "hierarchy-secagg", "secureAggregation.enabled",
        "!self.hierarchy.enabled || !self.secureAggregation.enabled",
        "secureAggregation.enabled: SecAgg+ is not available with edge aggregators; disable "
        "one of them",
        lambda s: not (s.hierarchy.enabled and s.secure_aggregation.enabled)),
    SpecRule(
        "hierarchy-krum", "strategy.byzantineClients",
        "!self.hierarchy.enabled || !(self.strategy.name in ['Krum', 'MultiKrum']) || "
        "self.hierarchy.edges < 1 || (self.clients / self.hierarchy.edges >= 3 && "
        "self.strategy.byzantineClients <= (self.clients / self.hierarchy.edges - 3) / 2)",
        "strategy.byzantineClients: Krum runs at each edge and needs clients/edges >= "
        "2*byzantineClients+3; lower byzantineClients, use fewer edges or add clients",
        lambda s: not s.hierarchy.enabled or s.strategy.name not in _KRUM
        or _krum_ok(s.clients // s.hierarchy.edges, s.strategy.byzantine_clients)),
    SpecRule(
        "tls13-signature", "crypto.signature",
        "self.channel.protocol != 'tls13' || self.crypto.signature == 'ML-DSA-65'",
        "crypto.signature: the tls13 channel authenticates with X.509 ML-DSA-65 certificates "
        "(the profile of docs/pki.md); use signature ML-DSA-65 or channel.protocol pqfed1",
        lambda s: s.channel.protocol != "tls13" or s.crypto.signature == "ML-DSA-65"),
    SpecRule(
        "tls13-kem", "crypto.kem",
        "self.channel.protocol != 'tls13' || self.crypto.kem == 'ML-KEM-768'",
        "crypto.kem: the tls13 channel offers the X25519MLKEM768 group only; use kem "
        "ML-KEM-768 or channel.protocol pqfed1",
        lambda s: s.channel.protocol != "tls13" or s.crypto.kem == "ML-KEM-768"),
    SpecRule(
        "external-tls13", "externalClients",
        "size(self.externalClients) == 0 || self.channel.protocol == 'tls13'",
        "externalClients: sites join with X.509 certificates from the job's CA, which only "
        "tls13 jobs have; set channel.protocol: tls13 or remove externalClients",
        lambda s: not s.external_clients or s.channel.protocol == "tls13"),
    SpecRule(
        "external-node-ids-unique", "externalClients",
        "self.externalClients.all(x, self.externalClients.exists_one(y, y.nodeId == x.nodeId))",
        "externalClients: each nodeId may appear once; remove the duplicate",
        lambda s: len(set(s.external_node_ids)) == len(s.external_clients)),
    SpecRule(
        "external-node-ids-reserved", "externalClients",
        "self.externalClients.all(x, !(x.nodeId in "
        f"{list(RESERVED_NODE_IDS)!r}) && !x.nodeId.matches('{RESERVED_NODE_ID_PATTERN}'))",
        "externalClients: aggregator, operator, client-N and edge-N name the operator's own "
        "nodes; use another nodeId (the one the site's request names)",
        lambda s: not any(n in RESERVED_NODE_IDS or re.fullmatch(RESERVED_NODE_ID_PATTERN, n)
                          for n in s.external_node_ids)),
    SpecRule(
        "external-hierarchy", "externalClients",
        "!self.hierarchy.enabled || size(self.externalClients) == 0",
        "externalClients: external clients join the central aggregator, which accepts only "
        "edges in hierarchical jobs; disable hierarchy or remove externalClients",
        lambda s: not (s.hierarchy.enabled and s.external_clients)),
    SpecRule(
        "external-secagg", "externalClients",
        "!self.secureAggregation.enabled || size(self.externalClients) == 0",
        "externalClients: secure aggregation is not available with external clients in this "
        "release; disable secureAggregation or remove externalClients",
        lambda s: not (s.secure_aggregation.enabled and s.external_clients)),
    SpecRule(
        "natural-partition-only-hapt", "dataset.partition",
        "self.dataset.partition != 'natural' || self.task == 'hapt'",
        "dataset.partition: natural is HAPT's per-subject split; use iid or dirichlet:<alpha> "
        "for this task",
        lambda s: s.dataset.partition != "natural" or s.task == "hapt"),
    SpecRule(
        "hapt-clients<=30", "clients",
        "self.task != 'hapt' || self.clients <= 30",
        "clients: HAPT has 30 subjects; use at most 30 clients",
        lambda s: s.task != "hapt" or s.clients <= 30),
)

# Rules that need the cluster, not the object: the operator reports them in status.conditions.
OPERATOR_ONLY: Final[tuple[OperatorOnlyRule, ...]] = (
    OperatorOnlyRule(
        "client-nodes-exist", "placement.nodeSelector",
        "whether a schedulable node carries these labels is cluster state that changes after "
        "admission; CEL sees only the FederationJob",
        "ClientsReady", "Unschedulable"),
    OperatorOnlyRule(
        "aggregator-node-exists", "placement.aggregatorNodeSelector",
        "whether a schedulable node carries these labels is cluster state that changes after "
        "admission; CEL sees only the FederationJob",
        "AggregatorReady", "Unschedulable"),
)

# Every validator function of the model and what mirrors it on the API server: the names of
# `RULES` it evaluates, or "cel:<field>" for a CEL rule emitted on that field's schema node.
# tests/operator/test_crd.py walks the model and fails on a validator missing here.
VALIDATOR_MIRRORS: Final[Mapping[str, tuple[str, ...]]] = {
    "FederationJobSpec._cross_field": tuple(r.name for r in RULES),
    "_label_key": ("cel:placement.nodeSelector", "cel:placement.aggregatorNodeSelector"),
}


class JobSpecError(ValueError):
    """A job file or FederationJob spec is invalid. `problems` maps field path -> message."""

    def __init__(self, source: str, problems: dict[str, str]) -> None:
        lines = "\n".join(f"  - {f}: {m}" for f, m in problems.items())
        super().__init__(f"invalid FederationJob ({source}):\n{lines}")
        self.problems = problems


# What to write instead, per pydantic error type (the default text says what is wrong only).
_FIXES: Final[Mapping[str, str]] = {
    "int_type": "write a whole number without quotes",
    "float_type": "write a number without quotes",
    "bool_type": "write true or false without quotes",
    "string_type": "write a string",
    "finite_number": ".inf and .nan are not allowed; write a finite number",
    "model_type": "write a mapping of the fields below it",
    "dict_type": "write a mapping",
    "extra_forbidden": "check the spelling (fields are camelCase)",
}
# Pattern fields: the pattern itself is no help to a reader.
_PATTERN_HINTS: Final[Mapping[str, str]] = {
    "image": "not an image reference: [registry[:port]/]repository[:tag][@sha256:<64 hex>], "
             "the repository in lowercase, no spaces",
    "sidecarImage": "not an image reference: [registry[:port]/]repository[:tag]"
                    "[@sha256:<64 hex>], the repository in lowercase, no spaces",
    "dataset.partition": "use iid, natural or dirichlet:<alpha> with alpha > 0",
    "externalClients": "not a node id: 1-63 of [a-z0-9.-], starting and ending with a "
                       "letter or digit (the --node-id the site gave `pqfed ca csr`)",
    "placement.nodeSelector": "not a Kubernetes label value: at most 63 of [-A-Za-z0-9_.], "
                              "starting and ending alphanumeric",
    "placement.aggregatorNodeSelector": "not a Kubernetes label value: at most 63 of "
                                        "[-A-Za-z0-9_.], starting and ending alphanumeric",
}


def _path(loc: tuple[int | str, ...]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[-1] == "[key]":  # a map key: spec.placement.nodeSelector["bad key"]
        return ".".join(parts[:-2]) + f"[{parts[-2]!r}]"
    # A list index as the API server writes it: spec.externalClients[0].nodeId
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _problems(exc: ValidationError) -> dict[str, str]:
    out: dict[str, str] = {}
    for err in exc.errors():
        loc = _path(err["loc"])
        msg = err["msg"]
        kind = err["type"]
        if kind == "value_error":
            # cross-field errors carry their own field names: "minClients: ...", one a line
            text = msg.removeprefix("Value error, ")
            for line in text.splitlines():
                field, sep, rest = line.partition(": ")
                if sep and re.fullmatch(r"[A-Za-z.]+", field):
                    out[f"spec.{field}"] = rest
                else:
                    out["spec." + loc if loc else "spec"] = line
            continue
        if kind == "extra_forbidden":
            msg = "unknown field"
        elif kind == "literal_error":
            msg = f"{msg} (got {err.get('input')!r})"
        elif kind == "string_pattern_mismatch":
            hint = next((h for f, h in _PATTERN_HINTS.items() if loc.startswith(f)), None)
            msg = f"{hint or msg} (got {_short(err.get('input'))})"
        elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal",
                      "string_too_long", "too_long"):
            msg = f"{msg} (got {_short(err.get('input'))})"
        if kind in _FIXES:
            msg = f"{msg} (got {_short(err.get('input'))}); {_FIXES[kind]}" \
                if kind not in ("extra_forbidden", "model_type", "dict_type") \
                else f"{msg}; {_FIXES[kind]}"
        out["spec." + loc if loc else "spec"] = msg
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"


def _fields_by_alias(model: type[BaseModel]) -> dict[str, Any]:
    return {field.alias or name: field for name, field in model.model_fields.items()}


def _prune_nulls(data: Any, model: type[BaseModel], path: str,
                 problems: dict[str, str]) -> Any:
    """What the API server does before validating: null in a field that is not nullable is
    pruned and the field's default applied; null where the schema allows it (an optional
    field) stays. Keys are matched by their camelCase name only: the API server knows no
    other, so `batch_size` is an unknown field here too."""
    if not isinstance(data, dict):
        return data
    fields = _fields_by_alias(model)
    out: dict[Any, Any] = {}
    for key, value in data.items():
        field = fields.get(key) if isinstance(key, str) else None
        if field is None:
            problems[f"{path}.{key}"] = f"unknown field; {_FIXES['extra_forbidden']}"
            continue
        has_default = field.default_factory is not None or field.default is not None
        if value is None and has_default:
            continue
        ann = field.annotation
        nested = isinstance(ann, type) and issubclass(ann, BaseModel)
        out[key] = _prune_nulls(value, ann, f"{path}.{key}", problems) if nested else value
    return out


def check_runnable(spec: FederationJobSpec, source: str = "spec") -> None:
    """Valid specs this release cannot run yet; refused before anything starts. (Every spec
    that validates runs today; the hook stays for features that land in stages.)"""
    del spec, source


def parse_spec(data: Any, source: str = "spec") -> FederationJobSpec:
    """A FederationJob `spec` (absent or null: every default) -> the model, as strictly as the
    API server with the chart's CRD. Raises JobSpecError mapping each field path to a fix."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise JobSpecError(source, {"spec": f"must be a mapping of fields, not "
                                            f"{type(data).__name__}; write spec: {{...}}"})
    problems: dict[str, str] = {}
    pruned = _prune_nulls(data, FederationJobSpec, "spec", problems)
    try:
        spec = FederationJobSpec.model_validate(pruned)
    except ValidationError as exc:
        problems.update(_problems(exc))
    if problems:
        raise JobSpecError(source, problems)
    return spec


_NAME = re.compile(NAME_PATTERN)
_NAMESPACE = re.compile(rf"^{_DNS_LABEL}$")
NAME_RULE: Final = (f"required: at most {NAME_MAX} lowercase letters, digits and '-', starting "
                    f"and ending alphanumeric (the aggregator Service <name>-aggregator must "
                    f"be a 63-character DNS label)")


class FederationJobFile(BaseModel):
    """A job file: the same shape as the custom resource."""

    name: str
    namespace: str = "default"
    spec: FederationJobSpec


def _duplicate_keys(node: yaml.Node, path: str, out: dict[str, str]) -> None:
    """PyYAML keeps the last of two equal keys; the API server's strict decoder refuses
    them, so we do too, naming the key by its path."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            child = f"{path}.{key}" if path else key
            line = key_node.start_mark.line + 1
            if key in seen:
                out[child] = (f"duplicate key (lines {seen[key]} and {line}); keep one of them")
            else:
                seen[key] = line
            _duplicate_keys(value_node, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _duplicate_keys(item, f"{path}[{i}]", out)


class _ApiServerYamlLoader(yaml.SafeLoader):
    """YAML read as the API server (and kubectl) read it: sigs.k8s.io/yaml's YAML 1.1, where
    `y` and `n` are booleans too (PyYAML keeps them strings)."""

    bool_values: ClassVar[dict[str, bool]] = {**yaml.SafeLoader.bool_values, "y": True,
                                               "n": False}


_ApiServerYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:y|Y|n|N)$"), list("yYnN"))


def _as_json(value: Any) -> Any:
    """The API server turns YAML into JSON before it validates, and Go writes a whole float64
    as an integer (3.0 -> 3), so `rounds: 3.0` is the integer 3 there; the same here. 2.5 stays
    a float and is refused for an integer field by both."""
    if isinstance(value, dict):
        return {k: _as_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_json(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def read_job_document(text: str, source: str) -> Any:
    """One YAML document -> the JSON data the API server would validate; duplicate keys
    refused (JobSpecError)."""
    try:
        node = yaml.compose(text, Loader=_ApiServerYamlLoader)
        duplicates: dict[str, str] = {}
        if node is not None:
            _duplicate_keys(node, "", duplicates)
        if duplicates:
            raise JobSpecError(source, duplicates)
        # a SafeLoader subclass: no arbitrary objects
        return _as_json(yaml.load(text, Loader=_ApiServerYamlLoader))  # noqa: S506
    except yaml.YAMLError as exc:
        raise JobSpecError(source, {"(file)": f"not valid YAML: {exc}"}) from None


def parse_job(doc: Any, source: str) -> FederationJobFile:
    """A FederationJob manifest (parsed YAML/JSON) -> the job; JobSpecError names each field."""
    if not isinstance(doc, dict):
        raise JobSpecError(source, {"(file)": "must hold one FederationJob mapping "
                                              "(apiVersion, kind, metadata, spec)"})
    problems: dict[str, str] = {}
    if doc.get("apiVersion") != f"{API_GROUP}/{API_VERSION}":
        problems["apiVersion"] = f"must be {API_GROUP}/{API_VERSION}"
    if doc.get("kind") != KIND:
        problems["kind"] = f"must be {KIND}"
    meta = doc.get("metadata")
    name = namespace = ""
    if not isinstance(meta, dict):
        problems["metadata"] = "required: a mapping with name (and optionally namespace)"
    else:
        raw_name = meta.get("name")
        name = raw_name if isinstance(raw_name, str) else ""
        # fullmatch: `re.match` with `$` would let "x\n" through.
        if not _NAME.fullmatch(name):
            problems["metadata.name"] = f"{NAME_RULE} (got {_short(raw_name)})"
        raw_ns = meta.get("namespace", "default")
        namespace = raw_ns if isinstance(raw_ns, str) else ""
        if not (_NAMESPACE.fullmatch(namespace) and len(namespace) <= 63):
            problems["metadata.namespace"] = (f"a DNS label: at most 63 lowercase letters, "
                                              f"digits and '-' (got {_short(raw_ns)})")
    spec: FederationJobSpec | None = None
    try:
        spec = parse_spec(doc.get("spec"), source)
    except JobSpecError as exc:
        problems.update(exc.problems)
    if problems or spec is None:
        raise JobSpecError(source, problems)
    return FederationJobFile(name=name, namespace=namespace, spec=spec)


def load_job(path: Path) -> FederationJobFile:
    """Reads a job YAML (a FederationJob manifest). Raises JobSpecError naming the field."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise JobSpecError(str(path), {"(file)": str(exc)}) from None
    return parse_job(read_job_document(text, str(path)), str(path))


def load_spec(path: Path) -> tuple[str, FederationJobSpec]:
    """A job YAML (FederationJob manifest) or the JSON spec the operator mounts in its pods
    (`{"name": ..., "spec": ...}`): the job's name and its checked spec."""
    if path.suffix in (".yaml", ".yml"):
        job = load_job(path)
        return job.name, job.spec
    data = json.loads(path.read_text())
    return str(data["name"]), parse_spec(data["spec"], str(path))
