"""Compressed global-model broadcast (downlink), with server-side error feedback.

Uplink compression alone leaves the broadcast of the fp32 global model as most of a round's
traffic. Here every aggregator (the central one, and each edge for its clients) keeps a
*public model*: the exact weights its nodes hold. Each round it moves the public model towards
its own model by one compressed step (the same top-k/int8 encoding as the uplink), and what a
step leaves out is added back to the server's model after aggregation, so it is sent in later
steps instead of being lost (error feedback on the server side, as in bidirectional compression
schemes such as DoubleSqueeze, Tang et al. 2019). Clients train from the public model and their
deltas are taken against it.

Nodes hold (epoch, version, weights). A broadcast is a chain of steps from the version the
server last saw the node acknowledge, or a base step (the whole model: int8 at version 0, or
fp32 later, whichever is smaller than the chain) for a node it does not know (new node ids,
a restarted aggregator: new epoch). A node applies the steps it lacks and checks the SHA3-256
digest of the result. In flat jobs broadcasts are not signed: like the dense broadcast they
travel only over the mutually authenticated PQC channel pinned to the aggregator (an ML-DSA-65
signature plus certificate is ~8.6 KiB per message, more than a small model's compressed step).
In hierarchical jobs the central aggregator signs (job, epoch, round, version, digest) once per
version (pqc.signing.sign_model; `weights_digest` below is the digest it signs) and edges
forward that signature to their clients with the exact weights.

Message layout (big-endian): magic "PQM1" | 8-byte epoch | u32 target version | 32-byte
digest of the target weights | u32 step count | per step: u32 from-version (0xFFFFFFFF = base:
replace, not add) | u32 length | compression blob.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from pqfed.services import compression
from pqfed.services.compression import Arrays, Method
from pqfed.services.spec import FederationJobSpec

MAGIC = b"PQM1"
BASE = 0xFFFFFFFF
EPOCH_BYTES = 8
MAX_STEPS = 100_000


class DownlinkError(ValueError):
    """A broadcast is malformed, does not fit the model held, or does not reproduce the
    published weights."""


@dataclass(frozen=True)
class Step:
    start: int  # the version this step applies to; BASE: replaces the weights
    blob: bytes


@dataclass(frozen=True)
class Broadcast:
    epoch: bytes
    target: int
    digest: bytes
    steps: tuple[Step, ...]

    def to_bytes(self) -> bytes:
        parts = [MAGIC, self.epoch, struct.pack(">I", self.target), self.digest,
                 struct.pack(">I", len(self.steps))]
        for s in self.steps:
            parts += [struct.pack(">II", s.start, len(s.blob)), s.blob]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> Broadcast:
        view = memoryview(data)
        fixed = 4 + EPOCH_BYTES + 4 + 32 + 4
        if len(view) < fixed or bytes(view[:4]) != MAGIC:
            raise DownlinkError("not a pqfed model broadcast (bad magic or truncated)")
        epoch = bytes(view[4:12])
        (target,) = struct.unpack(">I", view[12:16])
        digest = bytes(view[16:48])
        (count,) = struct.unpack(">I", view[48:52])
        if count == 0 or count > MAX_STEPS:
            raise DownlinkError(f"{count} steps in a broadcast")
        pos, steps = fixed, []
        for i in range(count):
            if pos + 8 > len(view):
                raise DownlinkError(f"truncated broadcast at step {i}")
            start, size = struct.unpack(">II", view[pos:pos + 8])
            pos += 8
            if pos + size > len(view):
                raise DownlinkError(f"truncated broadcast in step {i}")
            steps.append(Step(start, bytes(view[pos:pos + size])))
            pos += size
        if pos != len(view):
            raise DownlinkError(f"{len(view) - pos} trailing bytes after the last step")
        return cls(epoch, target, digest, tuple(steps))


def weights_digest(weights: Sequence[npt.NDArray[np.float32]]) -> bytes:
    h = hashlib.sha3_256()
    for w in weights:
        a = np.ascontiguousarray(w, dtype=np.float32)
        h.update(struct.pack(">I", a.ndim) + struct.pack(f">{a.ndim}I", *a.shape))
        h.update(a.tobytes())
    return h.digest()


@dataclass
class Held:
    """What a node holds: the public model of one aggregator epoch at one version."""

    epoch: bytes
    version: int
    weights: Arrays


def apply(broadcast: Broadcast, held: Held | None,
          template: Sequence[npt.NDArray[np.float32]] | None) -> Held:
    """The node side: applies the steps `held` lacks; a whole model must be shaped like
    `template` (None: as the broadcast says). Raises DownlinkError."""
    steps = list(broadcast.steps)
    try:
        return _apply(broadcast, steps, held, template)
    except compression.CompressionError as exc:
        raise DownlinkError(f"broadcast step does not fit: {exc}") from None


def _apply(broadcast: Broadcast, steps: list[Step], held: Held | None,
           template: Sequence[npt.NDArray[np.float32]] | None) -> Held:
    if steps[0].start == BASE:
        weights: Arrays = compression.decode(steps[0].blob, template)
        version = broadcast.target - (len(steps) - 1)
        steps = steps[1:]
    else:
        if held is None or held.epoch != broadcast.epoch:
            raise DownlinkError("broadcast continues a model this node does not hold "
                                "(the aggregator will send the whole model next round)")
        weights, version = held.weights, held.version
        first = steps[0].start
        if not first <= version <= broadcast.target:
            raise DownlinkError(f"broadcast starts at version {first}, node holds {version}")
        steps = steps[version - first:]  # steps this node already applied are skipped
    for s in steps:
        if s.start != version:
            raise DownlinkError(f"step from version {s.start} where {version} was expected")
        delta = compression.decode(s.blob, weights)
        weights = [w + d for w, d in zip(weights, delta, strict=True)]
        version += 1
    if version != broadcast.target or weights_digest(weights) != broadcast.digest:
        raise DownlinkError("reconstructed model does not match the published digest")
    return Held(broadcast.epoch, version, weights)


@dataclass
class Broadcaster:
    """The aggregator side: the public model, its history of steps, and who holds what."""

    method: Method
    topk_fraction: float = 0.1
    epoch: bytes = field(default_factory=lambda: os.urandom(EPOCH_BYTES))
    public: Arrays | None = None
    version: int = -1
    steps: dict[int, bytes] = field(default_factory=dict)  # version v -> step (v-1 -> v)
    acked: dict[int, int] = field(default_factory=dict)  # node id -> version held
    _cache: dict[int | None, Broadcast] = field(default_factory=dict)
    _full: bytes | None = None  # the public model as one fp32 step, encoded on first need
    _digest: bytes = b""

    def advance(self, target: Sequence[npt.NDArray[np.float32]]) -> Arrays:
        """Moves the public model one compressed step towards `target`; returns it."""
        self._cache.clear()
        self._full = None
        if self.public is None:
            quantize = self.method in (Method.INT8, Method.TOPK_INT8)
            blob, _ = compression.encode(target, Method.INT8 if quantize else Method.NONE)
            zeros = [np.zeros_like(t, dtype=np.float32) for t in target]
            self.public = compression.decode(blob, zeros)
            self.version = 0
        else:
            delta = [np.asarray(t, dtype=np.float32) - p for t, p in
                     zip(target, self.public, strict=True)]
            blob, _ = compression.encode(delta, self.method, self.topk_fraction)
            step = compression.decode(blob, self.public)  # exactly what nodes will add
            self.public = [p + d for p, d in zip(self.public, step, strict=True)]
            self.version += 1
        self.steps[self.version] = blob
        self._digest = weights_digest(self.public)
        self._prune()
        return self.public

    def _prune(self) -> None:
        """Drops steps no known node needs once the history outweighs two whole models
        (nodes unknown to us get the whole model anyway)."""
        assert self.public is not None
        full = sum(p.nbytes for p in self.public)
        if sum(len(b) for b in self.steps.values()) <= 2 * full:
            return
        oldest_needed = min(self.acked.values(), default=self.version) + 1
        for v in [v for v in self.steps if v < oldest_needed]:
            del self.steps[v]

    def broadcast_for(self, node: int) -> Broadcast:
        """The cheapest broadcast that brings `node` to the current version."""
        have = self.acked.get(node)
        if have is not None and have > self.version:
            have = None
        if have not in self._cache:
            self._cache[have] = self._build(have)
        return self._cache[have]

    def _build(self, have: int | None) -> Broadcast:
        assert self.public is not None, "advance() first"
        start = 0 if have is None else have + 1
        if not all(v in self.steps for v in range(start, self.version + 1)):
            have, start = None, self.version + 1  # pruned: the whole model
        chain = [Step(BASE if v == 0 else v - 1, self.steps[v])
                 for v in range(start, self.version + 1)]
        if have is None and (not chain or chain[0].start != BASE or
                             sum(len(s.blob) for s in chain) > len(self._full_blob())):
            chain = [Step(BASE, self._full_blob())]
        elif have is not None and not chain:  # already current: an empty chain is not valid
            chain = [Step(BASE, self._full_blob())] if self.version == 0 else \
                [Step(self.version - 1, self.steps[self.version])]
        return Broadcast(self.epoch, self.version, self._digest, tuple(chain))

    def _full_blob(self) -> bytes:
        """Encoded once per version, whichever nodes need it (or the size comparison)."""
        if self._full is None:
            assert self.public is not None
            self._full, _ = compression.encode(self.public, Method.NONE)
        return self._full

    def ack(self, node: int) -> None:
        self.acked[node] = self.version

    def forget(self, node: int) -> None:
        self.acked.pop(node, None)


def for_spec(spec: FederationJobSpec) -> Broadcaster | None:
    """The job's broadcaster, or None when broadcasts stay dense fp32."""
    method = Method.parse(spec.compression.method)
    if method == Method.NONE or not spec.compression.downlink:
        return None
    return Broadcaster(method, spec.compression.topk_fraction)
