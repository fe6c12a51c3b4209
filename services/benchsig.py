"""The cost of the central aggregator's model signature per round (hierarchical jobs).

Per round the aggregator signs one `ModelManifest` (SHA3-256 of the model + one ML-DSA
signature) and each client behind an edge verifies it (digest of the weights received + one
certificate check + one signature verification). Baseline, measured alternately in the same
run: the digest alone (what a node computes anyway to check a compressed broadcast), so the
difference is the price of the signature itself. Also reports the bytes the signature adds to
each train message.

    python -m pqfed.services.benchsig --clients 8 --runs 7
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

from pqfed.pqc import CertificateAuthority, Role, sign_model, verify_model
from pqfed.services.downlink import weights_digest
from pqfed.services.models import build_model, get_weights


def _round(task: str, clients: int, signed: bool, ca: CertificateAuthority,
           agg: Any) -> tuple[float, float]:
    """(server seconds, client seconds summed over clients) of one round's model check."""
    weights = get_weights(build_model(task, seed=0))
    t0 = time.perf_counter()
    digest = weights_digest(weights)
    blob = sign_model(agg, "bench", os.urandom(8), 1, 1, digest) if signed else None
    server = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(clients):
        got = weights_digest(weights)
        if blob is not None:
            verify_model(blob, ca.trust, job="bench", signer="aggregator", round_number=1,
                         digest=got)
    return server, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--tasks", default="breast-cancer,hapt")
    args = p.parse_args(argv)
    ca = CertificateAuthority.generate("bench")
    agg = ca.new_identity("aggregator", Role.AGGREGATOR)
    from pqfed.pqc.backends import get_backend

    out: dict[str, Any] = {"clients": args.clients, "runs": args.runs,
                           "backend": type(get_backend()).__name__, "tasks": {}}
    for task in args.tasks.split(","):
        weights = get_weights(build_model(task, seed=0))
        res: dict[str, list[float]] = {k: [] for k in ("sign", "verify", "digest_server",
                                                       "digest_client")}
        _round(task, 1, True, ca, agg)  # warm-up
        for _ in range(args.runs):  # alternating: signed, then the digest-only baseline
            s, c = _round(task, args.clients, True, ca, agg)
            res["sign"].append(s)
            res["verify"].append(c / args.clients)
            s, c = _round(task, args.clients, False, ca, agg)
            res["digest_server"].append(s)
            res["digest_client"].append(c / args.clients)
        sig = sign_model(agg, "bench", os.urandom(8), 1, 1, weights_digest(weights))
        out["tasks"][task] = {
            "model_bytes": sum(w.nbytes for w in weights),
            "signature_bytes_per_message": len(sig.to_bytes()),
            **{k: {"median_ms": statistics.median(v) * 1e3, "min_ms": min(v) * 1e3,
                   "max_ms": max(v) * 1e3} for k, v in res.items()}}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
