"""The one model of a federation job, shared by the CRD generator, the operator, the local
runner (`pqfed run`) and the CLI.

Field names are camelCase, as in every Kubernetes API, so a job file and a `FederationJob`
custom resource have the same `spec`. Every error names the field and says how to fix it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

API_GROUP = "pqfed.io"
API_VERSION = "v1alpha1"
KIND = "FederationJob"

TaskName = Literal["breast-cancer", "hapt", "ecg-sim"]
StrategyName = Literal["FedAvg", "FedProx", "FedTrimmedAvg", "Krum", "MultiKrum"]
_PARTITION = r"^(iid|natural|dirichlet:(0\.[0-9]*[1-9][0-9]*|[1-9][0-9]*(\.[0-9]+)?))$"
_LABEL_KEY = r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
_LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"


class _Spec(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              frozen=True)


class DatasetSpec(_Spec):
    """Which data each client holds. `natural` is HAPT's per-subject split (non-IID)."""

    partition: Annotated[str, Field(pattern=_PARTITION)] = Field(
        "iid", description="iid, natural (HAPT: one subject per client) or dirichlet:<alpha>")
    seed: int = Field(0, ge=0, description="Seed for partitioning and training")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Per-client held-out fraction")


class TrainingSpec(_Spec):
    local_epochs: int = Field(1, ge=1, le=100)
    batch_size: int = Field(32, ge=1, le=4096)
    learning_rate: float = Field(0.01, gt=0, le=10)


class StrategySpec(_Spec):
    """Flower strategies. Robust ones (FedTrimmedAvg, Krum, MultiKrum) defend against
    poisoned updates; FedProx adds a proximal term for non-IID clients."""

    name: StrategyName = "FedAvg"
    proximal_mu: float = Field(0.0, ge=0, description="FedProx proximal term (mu)")
    trim_fraction: float = Field(0.2, ge=0, lt=0.5, description="FedTrimmedAvg beta")
    byzantine_clients: int = Field(0, ge=0, description="Krum/MultiKrum: assumed attackers")


class PrivacySpec(_Spec):
    """Differential privacy with Flower's wrappers: central (server adds noise to the clipped
    aggregate) or local (LocalDpMod on each client)."""

    enabled: bool = False
    mode: Literal["central", "local"] = "central"
    clipping_norm: float = Field(1.0, gt=0)
    noise_multiplier: float = Field(1.0, ge=0)
    target_epsilon: float | None = Field(None, gt=0, description="Stop before exceeding it")
    delta: float = Field(1e-5, gt=0, lt=1)


class SecureAggregationSpec(_Spec):
    """Flower SecAgg+: the aggregator only learns the sum of the updates."""

    enabled: bool = False
    num_shares: int = Field(3, ge=2)
    reconstruction_threshold: int = Field(2, ge=1)
    clipping_range: float = Field(8.0, gt=0)
    quantization_range: int = Field(4194304, ge=2)


class CompressionSpec(_Spec):
    method: Literal["none", "topk", "int8", "topk+int8"] = "none"
    topk_fraction: float = Field(0.1, gt=0, le=1, description="Share of weights kept by top-k")
    downlink: bool = Field(True, description="Also compress the global-model broadcast (signed "
                                             "deltas against the model each node holds)")


class HierarchySpec(_Spec):
    """Edge aggregators pre-aggregate their clients before the central aggregator."""

    enabled: bool = False
    edges: int = Field(2, ge=1, le=100)


class CryptoSpec(_Spec):
    kem: Literal["ML-KEM-768", "ML-KEM-1024"] = "ML-KEM-768"
    signature: Literal["ML-DSA-44", "ML-DSA-65", "ML-DSA-87"] = "ML-DSA-65"
    aead: Literal["auto", "AES-256-GCM", "CHACHA20-POLY1305"] = "auto"
    backend: Literal["auto", "pyca", "liboqs"] = Field(
        "auto", description="PQC implementation: auto (liboqs when its library is present, "
        "else pyca; liboqs measured faster, docs/BENCHMARKS.md), pyca (OpenSSL via "
        "pyca/cryptography) or liboqs (Open Quantum Safe; fails if absent)")
    parallel_workers: int = Field(0, ge=0, le=256, description="0 = one per CPU")
    pool: Literal["auto", "sequential", "threads", "processes"] = "auto"


class TimeoutSpec(_Spec):
    round_seconds: int = Field(600, ge=5)
    handshake_seconds: float = Field(10.0, gt=0, le=300)


class PlacementSpec(_Spec):
    """Where pods run (Kubernetes only): client pods spread over nodes matching
    `nodeSelector`, the aggregator on nodes matching `aggregatorNodeSelector`."""

    node_selector: dict[Annotated[str, Field(pattern=_LABEL_KEY)],
                        Annotated[str, Field(pattern=_LABEL_VALUE)]] = Field(
        default_factory=dict)
    aggregator_node_selector: dict[Annotated[str, Field(pattern=_LABEL_KEY)],
                                   Annotated[str, Field(pattern=_LABEL_VALUE)]] = Field(
        default_factory=dict)
    spread: bool = Field(True, description="Spread client pods across nodes")


class FederationJobSpec(_Spec):
    task: TaskName = "breast-cancer"
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    rounds: int = Field(3, ge=1, le=10000)
    clients: int = Field(3, ge=1, le=1000, description="Client nodes taking part")
    clients_per_round: int | None = Field(None, ge=1, description="Default: all clients")
    min_clients: int = Field(2, ge=1, description="A round fails below this many updates")
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    strategy: StrategySpec = Field(default_factory=StrategySpec)
    privacy: PrivacySpec = Field(default_factory=PrivacySpec)
    secure_aggregation: SecureAggregationSpec = Field(default_factory=SecureAggregationSpec)
    compression: CompressionSpec = Field(default_factory=CompressionSpec)
    hierarchy: HierarchySpec = Field(default_factory=HierarchySpec)
    crypto: CryptoSpec = Field(default_factory=CryptoSpec)
    timeouts: TimeoutSpec = Field(default_factory=TimeoutSpec)
    placement: PlacementSpec = Field(default_factory=PlacementSpec)
    image: str = Field("ghcr.io/pqfed/pqfed:0.1.0", min_length=1,
                       description="Image of the FL and sidecar containers")

    @model_validator(mode="after")
    def _cross_field(self) -> FederationJobSpec:
        # Every rule here is mirrored as a CEL rule in the CRD (operator/crd.py), so the API
        # server rejects the same jobs that `pqfed run` refuses.
        def fail(field: str, msg: str) -> None:
            raise ValueError(f"{field}: {msg}")

        if self.min_clients > self.clients:
            fail("minClients", f"{self.min_clients} exceeds clients ({self.clients}); "
                               "lower minClients or add clients")
        per_round = self.clients_per_round or self.clients
        if per_round > self.clients:
            fail("clientsPerRound", f"{per_round} exceeds clients ({self.clients})")
        if per_round < self.min_clients:
            fail("clientsPerRound", f"{per_round} is below minClients ({self.min_clients})")
        if self.strategy.name in ("Krum", "MultiKrum") and \
                per_round < 2 * self.strategy.byzantine_clients + 3:
            fail("strategy.byzantineClients",
                 f"Krum needs clientsPerRound >= 2*byzantineClients+3 "
                 f"({2 * self.strategy.byzantine_clients + 3}); lower byzantineClients")
        if self.secure_aggregation.enabled:
            if self.strategy.name not in ("FedAvg", "FedProx"):
                fail("secureAggregation.enabled",
                     f"{self.strategy.name} must see individual updates; SecAgg+ hides them. "
                     "Use FedAvg/FedProx or disable secure aggregation")
            sa = self.secure_aggregation
            if sa.reconstruction_threshold > sa.num_shares:
                fail("secureAggregation.reconstructionThreshold", "must be <= numShares")
            if sa.num_shares > per_round:
                fail("secureAggregation.numShares",
                     f"{sa.num_shares} exceeds clientsPerRound ({per_round})")
        if self.hierarchy.enabled:
            edges = self.hierarchy.edges
            if edges > self.clients:
                fail("hierarchy.edges", f"{edges} edges for {self.clients} clients; use at "
                                        "most one edge aggregator per client")
            if self.privacy.enabled and self.privacy.mode == "central":
                fail("privacy.mode", "central DP clips individual updates, which only the "
                                     "edges see in hierarchical mode; use privacy.mode: local "
                                     "or disable hierarchy")
            if self.secure_aggregation.enabled:
                fail("secureAggregation.enabled", "SecAgg+ is not available with edge "
                                                  "aggregators; disable one of them")
            if self.strategy.name in ("Krum", "MultiKrum") and \
                    self.clients // edges < 2 * self.strategy.byzantine_clients + 3:
                fail("strategy.byzantineClients",
                     f"Krum runs at each edge and needs clients/edges >= 2*byzantineClients+3 "
                     f"({2 * self.strategy.byzantine_clients + 3}); lower byzantineClients, "
                     "use fewer edges or add clients")
        if self.dataset.partition == "natural" and self.task != "hapt":
            fail("dataset.partition", "natural is HAPT's per-subject split; use iid or "
                                      "dirichlet:<alpha> for this task")
        if self.task == "hapt" and self.clients > 30:
            fail("clients", "HAPT has 30 subjects; use at most 30 clients")
        return self


class JobSpecError(ValueError):
    """A job file or FederationJob spec is invalid. `problems` maps field path -> message."""

    def __init__(self, source: str, problems: dict[str, str]) -> None:
        lines = "\n".join(f"  - {f}: {m}" for f, m in problems.items())
        super().__init__(f"invalid FederationJob ({source}):\n{lines}")
        self.problems = problems


def _problems(exc: ValidationError) -> dict[str, str]:
    out: dict[str, str] = {}
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "value_error":
            # cross-field errors carry their own field name: "minClients: ..."
            text = msg.removeprefix("Value error, ")
            field, sep, rest = text.partition(": ")
            if sep and re.fullmatch(r"[A-Za-z.]+", field):
                loc, msg = field, rest
            else:
                msg = text
        elif err["type"] == "extra_forbidden":
            msg = "unknown field; check the spelling (fields are camelCase)"
        elif err["type"] == "literal_error":
            msg = f"{msg} (got {err.get('input')!r})"
        out["spec." + loc if loc else "spec"] = msg
    return out


def check_runnable(spec: FederationJobSpec, source: str = "spec") -> None:
    """Valid specs this release cannot run yet; refused before anything starts. (Every spec
    that validates runs today; the hook stays for features that land in stages.)"""
    del spec, source


def parse_spec(data: Any, source: str = "spec") -> FederationJobSpec:
    try:
        return FederationJobSpec.model_validate(data or {})
    except ValidationError as exc:
        raise JobSpecError(source, _problems(exc)) from None


# "<name>-aggregator" must stay a valid 63-character Service/DNS label.
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,50}[a-z0-9])?$")


class FederationJobFile(BaseModel):
    """A job file: the same shape as the custom resource."""

    name: str
    namespace: str = "default"
    spec: FederationJobSpec


def load_job(path: Path) -> FederationJobFile:
    """Reads a job YAML (a FederationJob manifest). Raises JobSpecError naming the field."""
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise JobSpecError(str(path), {"(file)": str(exc)}) from None
    if not isinstance(doc, dict):
        raise JobSpecError(str(path), {"(file)": "must hold a FederationJob mapping"})
    problems: dict[str, str] = {}
    if doc.get("apiVersion") != f"{API_GROUP}/{API_VERSION}":
        problems["apiVersion"] = f"must be {API_GROUP}/{API_VERSION}"
    if doc.get("kind") != KIND:
        problems["kind"] = f"must be {KIND}"
    meta = doc.get("metadata") or {}
    name = str(meta.get("name", ""))
    if not _NAME.match(name):
        problems["metadata.name"] = ("required: lowercase letters, digits and '-', at most "
                                     "52 characters (pod and Service names derive from it)")
    try:
        spec = parse_spec(doc.get("spec"), str(path))
    except JobSpecError as exc:
        problems.update(exc.problems)
    if problems:
        raise JobSpecError(str(path), problems)
    return FederationJobFile(name=name, namespace=str(meta.get("namespace", "default")),
                             spec=spec)
