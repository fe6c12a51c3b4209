"""Structure-aware mutation fuzzing of every parser that sees untrusted bytes.

    .venv/bin/python tests/fuzz/harness.py --budget 1000000 [--seed 1] [--only NAME,...]
    make fuzz                     # the same, FUZZ_BUDGET=1000000 FUZZ_SEED=1

Each target starts from a seed corpus of valid inputs built from fixed values and mutates
them: bit flips, interesting bytes, integer fields set to boundary values (both byte orders,
1/2/4/8 bytes wide), chunks deleted, duplicated or spliced in from another seed, truncation,
tokens from a per-target dictionary (CRLF, bare LF, header names, JSON keys, PEM lines ...),
and target-specific structure edits (a JSON entry edited and re-hashed so it reaches the checks
behind the hash; a record sealed around a mutated plaintext so it reaches the checks behind
the AEAD). Mutations stack 1-4 deep, and a mutant that was accepted joins the corpus. Every
random choice comes from `random.Random(seed, target)`, so a run is reproducible.

The contract of every parser: return a value, or raise the module's documented error type
(RequestRejected, RecordError, DecodeError, AuditLogError, CompressionError, DownlinkError);
anything else (IndexError, struct.error, TypeError, MemoryError, an assertion of the
harness's own invariants) is a crash, and an input that runs past the time limit is a hang.
Crashing inputs are written to --crash-dir and the run exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HANG_S = 5.0


class Hang(Exception):
    """One input ran past HANG_S."""


@dataclass
class Target:
    name: str
    run: Callable[[bytes], object]
    errors: tuple[type[BaseException], ...]
    seeds: list[bytes]
    tokens: list[bytes] = field(default_factory=list)
    weight: float = 1.0
    # Target-specific mutation (e.g. re-hash a JSON entry); None: byte mutations only.
    structured: Callable[[random.Random, bytes], bytes] | None = None


@dataclass
class Result:
    name: str
    inputs: int = 0
    accepted: int = 0
    rejected: int = 0
    crashes: list[tuple[bytes, str]] = field(default_factory=list)
    seconds: float = 0.0


# --- mutation ----------------------------------------------------------------------------------

_INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0x0A, 0x0D, 0x20, 0x00)
_BOUNDARY = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF,
             0x80000000, 0xFFFFFFFF, 0x100000000, (1 << 63) - 1, (1 << 64) - 1)


def _int_field(rng: random.Random, data: bytearray) -> None:
    width = rng.choice((1, 2, 4, 8))
    if len(data) < width:
        return
    pos = rng.randrange(len(data) - width + 1)
    value = rng.choice(_BOUNDARY) & ((1 << (8 * width)) - 1)
    if rng.random() < 0.3:  # nudge the current value instead
        cur = int.from_bytes(data[pos:pos + width], "big")
        value = (cur + rng.choice((-1, 1, -16, 16, 255))) % (1 << (8 * width))
    data[pos:pos + width] = value.to_bytes(width, rng.choice(("big", "little")))


def mutate(rng: random.Random, data: bytes, corpus: list[bytes], tokens: list[bytes]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        op = rng.randrange(10)
        n = len(out)
        if op == 0 and n:  # flip a bit
            out[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # interesting byte
            out[rng.randrange(n)] = rng.choice(_INTERESTING)
        elif op == 2:
            _int_field(rng, out)
        elif op == 3 and n:  # delete a chunk
            a = rng.randrange(n)
            del out[a:a + rng.choice((1, 2, 4, 16, 64, 512))]
        elif op == 4 and n:  # duplicate a chunk in place
            a = rng.randrange(n)
            out[a:a] = out[a:a + rng.choice((1, 4, 32, 256))]
        elif op == 5 and corpus:  # splice with another corpus entry
            other = rng.choice(corpus)
            a, b = rng.randrange(n + 1), rng.randrange(len(other) + 1)
            out = out[:a] + bytearray(other[b:])
        elif op == 6 and n:  # truncate
            del out[rng.randrange(n):]
        elif op == 7:  # random bytes
            a = rng.randrange(n + 1)
            out[a:a] = rng.randbytes(rng.choice((1, 3, 8, 40)))
        elif tokens:  # insert or overwrite with a dictionary token
            tok = rng.choice(tokens)
            a = rng.randrange(n + 1)
            if rng.random() < 0.5:
                out[a:a] = tok
            else:
                out[a:a + len(tok)] = tok
    return bytes(out)


# --- targets -----------------------------------------------------------------------------------

def _split(data: bytes) -> Iterator[bytes]:
    """Feeds a stream in pieces: the first byte picks up to 3 cut points (incremental parsers
    must not depend on how the bytes arrive)."""
    if not data:
        return
    cuts = sorted({(data[0] * (i + 7)) % len(data) for i in range(data[0] % 4)})
    prev = 1
    for c in cuts:
        if c > prev:
            yield data[prev:c]
            prev = c
    yield data[prev:]


def http_target() -> Target:
    from pqfed.pqc.sidecar.httpfilter import HttpRequestFilter, RequestRejected

    def run(data: bytes) -> object:
        f = HttpRequestFilter(("/v1/fleet/",))
        out = b"".join(f.feed(piece) for piece in _split(data))
        # What passed is re-serialised: a second filter must pass it unchanged (one parse).
        again = HttpRequestFilter(("/v1/fleet/",))
        if again.feed(out) != out or again.requests != f.requests:
            raise AssertionError("filter output is not stable under a second filter")
        return out

    seeds = [b"\x00" + s for s in (
        b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: agg\r\nContent-Type: application/"
        b"protobuf\r\nContent-Length: 5\r\n\r\nhello",
        b"POST /v1/fleet/push-messages HTTP/1.1\r\nHost: agg\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n",
        b"GET /v1/fleet/health HTTP/1.1\r\nHost: agg\r\n\r\nGET /v1/fleet/x?a=b HTTP/1.1\r\n"
        b"Host: agg\r\nContent-Length: 0\r\n\r\n",
        b"GET /v1/control/stop HTTP/1.1\r\nHost: agg\r\n\r\n")]
    tokens = [b"\r\n", b"\n", b"\r", b"\r\n\r\n", b": ", b" ", b"\t", b"Content-Length: ",
              b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip, chunked",
              b"Connection: upgrade", b"Upgrade: h2c", b"%2e", b"%2F", b"/../", b"/./", b"//",
              b"0\r\n\r\n", b"ffffffff\r\n", b";", b"HTTP/1.0", b"\x00", b"\x7f", b"\x80",
              b"/v1/fleet/", b"/v1/control/"]
    return Target("http-filter", run, (RequestRejected,), seeds, tokens, weight=3.0)


def _record_key() -> bytes:
    return bytes(range(48))


def record_target() -> Target:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from pqfed.pqc.errors import RecordError
    from pqfed.pqc.keyschedule import traffic_key_iv
    from pqfed.pqc.record import (
        HEADER,
        WIRE_VERSION,
        FrameDecoder,
        FrameType,
        InnerType,
        RecordProtection,
        encode_frame,
    )

    key, iv = traffic_key_iv(_record_key(), 32)

    def run(data: bytes) -> object:
        dec = FrameDecoder(max_plaintext=4096)
        prot = RecordProtection("AES-256-GCM", _record_key())
        opened = []
        for piece in _split(data):
            for frame in dec.feed(piece):
                if frame.type is FrameType.PROTECTED:
                    opened.append(prot.open(frame))
        return opened

    def sealed_around(rng: random.Random, data: bytes) -> bytes:
        # Reach what is checked behind the tag: a valid AEAD over a mutated inner plaintext.
        inner = mutate(rng, data[8:] or b"\x17", [], [])
        seq = 0
        header = HEADER.pack(FrameType.PROTECTED, WIRE_VERSION, len(inner) + 16)
        nonce = (int.from_bytes(iv, "big") ^ seq).to_bytes(12, "big")
        return data[:1] + header + AESGCM(key).encrypt(nonce, inner, header)

    prot = RecordProtection("AES-256-GCM", _record_key())
    stream = b"".join(prot.seal(t, c) for t, c in ((InnerType.DATA, b"weights" * 20),
                                                    (InnerType.KEY_UPDATE, b""),
                                                    (InnerType.CLOSE, b"")))
    seeds = [b"\x00" + stream, b"\x05" + stream,
             b"\x00" + encode_frame(FrameType.HANDSHAKE, b"\x01" * 40),
             b"\x00" + RecordProtection("AES-256-GCM", _record_key()).seal(InnerType.DATA, b"")]
    return Target("record-open", run, (RecordError,), seeds, [], weight=2.0,
                  structured=sealed_around)


def pem_target() -> Target:
    from pqfed.pqc.armor import unarmor
    from pqfed.pqc.errors import PqcError
    from pqfed.pqc.identity import Certificate

    sample = _pki()

    def run(data: bytes) -> object:
        text = data[1:].decode("utf-8", "surrogateescape")
        if data[:1] == b"\x01":
            return unarmor("PQFED PRIVATE KEY", text)
        return Certificate.from_pem(text)

    seeds = [b"\x00" + sample["cert_pem"].encode(), b"\x01" + sample["key_pem"].encode(),
             b"\x00" + sample["ca_pem"].encode()]
    tokens = [b"-----BEGIN PQFED CERTIFICATE-----", b"-----END PQFED CERTIFICATE-----", b"=",
              b"==", b"\n", b"\r\n", b" ", b"\t", b"\xc3\xa9", b"\xff", b"+/", b"-_", b"\x00"]
    # DecodeError for the armor and the encoding; CertificateError is a PqcError too.
    return Target("pem-armor", run, (PqcError,), seeds, tokens)


def _audit_lines() -> list[str]:
    """A 3-entry log written as AuditLog.append writes it, from fixed keys and times."""
    from pqfed.pqc.audit import AUDIT_CONTEXT, GENESIS, entry_hash

    sample = _pki()
    ident = sample["aggregator"]
    lines, prev = [], GENESIS
    for seq, (event, extra) in enumerate((("job-started", {"rounds": 3}),
                                          ("update-accepted", {"node": "client-1", "round": 1}),
                                          ("round-completed", {"round": 1}))):
        entry: dict[str, Any] = {"seq": seq, "time": 1767225600.5 + seq, "event": event,
                                 "prev": prev, "signer": ident.certificate.to_pem() if seq == 0
                                 else ident.certificate.fingerprint, **extra}
        entry["hash"] = entry_hash(entry)
        entry["sig"] = sample["sign"](bytes.fromhex(entry["hash"]), AUDIT_CONTEXT).hex()
        lines.append(json.dumps(entry, sort_keys=True))
        prev = entry["hash"]
    return lines


def audit_target(work: Path) -> Target:
    from pqfed.pqc.audit import entry_hash, verify_audit_log
    from pqfed.pqc.errors import AuditLogError

    trust = _pki()["trust"]
    path = work / "audit.jsonl"

    def run(data: bytes) -> object:
        path.write_bytes(data[1:])
        try:
            return verify_audit_log(path, trust if data[:1] != b"\x01" else None)
        except UnicodeDecodeError as exc:  # read_text: not UTF-8 is not a log line either
            raise AuditLogError(0, str(exc)) from None

    def edited_and_rehashed(rng: random.Random, data: bytes) -> bytes:
        # Reach the checks behind the hash: change one field's value or type, or drop it,
        # then recompute the entry's hash as an attacker without the key can.
        lines = data[1:].split(b"\n")
        i = rng.randrange(len(lines))
        try:
            entry = json.loads(lines[i])
        except ValueError:
            return data
        if not isinstance(entry, dict) or not entry:
            return data
        key = rng.choice(sorted(entry))
        choice = rng.randrange(5)
        if choice == 0:
            del entry[key]
        else:
            entry[key] = rng.choice((None, True, 1.5, -1, 2**70, "", "x" * 70, [], {}, "ab" * 32,
                                     entry.get(key)))
        if rng.random() < 0.8:
            with contextlib.suppress(TypeError, ValueError):
                entry["hash"] = entry_hash(entry)
        lines[i] = json.dumps(entry, sort_keys=rng.random() < 0.8).encode()
        return data[:1] + b"\n".join(lines)

    text = "\n".join(_audit_lines()) + "\n"
    seeds = [b"\x00" + text.encode(), b"\x01" + text.encode(),
             b"\x00" + text.splitlines()[0].encode() + b"\n"]
    tokens = [b'"seq": ', b'"time": ', b'"event": ', b'"prev": ', b'"hash": ', b'"sig": ', b", ",
              b": ", b"NaN", b"Infinity", b"-0", b"1e400", b'"\\u0000"', b"[", b"{", b"}", b"\n",
              b"\\ud800", b"\xe2\x80\xa8"]
    return Target("audit-log", run, (AuditLogError,), seeds, tokens, weight=0.5,
                  structured=edited_and_rehashed)


_MODEL = [np.arange(60, dtype=np.float32).reshape(6, 10) / 7, np.ones(10, dtype=np.float32),
          np.zeros((2, 1, 3), dtype=np.float32)]


def compression_target() -> Target:
    from pqfed.services.compression import CompressionError, Method, decode, encode

    def run(data: bytes) -> object:
        return decode(data[1:], _MODEL if data[:1] != b"\x01" else None)

    seeds = []
    for method in Method:
        blob, _ = encode(_MODEL, method, 0.3)
        seeds += [b"\x00" + blob, b"\x01" + blob]
    blob, _ = encode([np.arange(200, dtype=np.float32)], Method.TOPK, 0.5)  # bitmap positions
    seeds.append(b"\x01" + blob)
    tokens = [b"PQU1", b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x07", b"\x06", b"\x03"]
    return Target("compression", run, (CompressionError,), seeds, tokens, weight=2.0)


def broadcast_target() -> Target:
    from pqfed.services.compression import Method
    from pqfed.services.downlink import Broadcast, Broadcaster, DownlinkError, Held, apply

    b = Broadcaster(Method.TOPK_INT8, 0.3, epoch=b"E" * 8)
    b.advance(_MODEL)
    held = Held(b.epoch, 0, [w.copy() for w in b.public or []])
    b.ack(1)
    seeds = [b"\x00" + b.broadcast_for(1).to_bytes(), b"\x00" + b.broadcast_for(2).to_bytes()]
    b.advance([w + 0.5 for w in _MODEL])
    seeds += [b"\x01" + b.broadcast_for(1).to_bytes(), b"\x02" + b.broadcast_for(2).to_bytes()]

    def run(data: bytes) -> object:
        broadcast = Broadcast.from_bytes(data[1:])
        mode = data[:1]
        if mode == b"\x01":
            return apply(broadcast, Held(held.epoch, held.version, list(held.weights)), _MODEL)
        return apply(broadcast, None, _MODEL if mode != b"\x02" else None)

    tokens = [b"PQM1", b"PQU1", b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"E" * 8]
    return Target("broadcast", run, (DownlinkError,), seeds, tokens, weight=1.5)


def signed_update_target() -> Target:
    """The two update envelopes an aggregator parses from every client: the pqfed form
    (`SignedUpdate`) and the site-held X.509 form (`X509SignedUpdate`, its DER certificate
    included)."""
    from cryptography.hazmat.primitives.asymmetric import mldsa

    from pqfed.pqc.errors import PqcError
    from pqfed.pqc.identity import Role
    from pqfed.pqc.pki import NodeURI, X509CertificateAuthority
    from pqfed.pqc.signing import SignedUpdate, X509SignedUpdate, sign_update, sign_update_x509

    def run(data: bytes) -> object:
        if data[:1] == b"\x01":
            return X509SignedUpdate.from_bytes(data[1:])
        return SignedUpdate.from_bytes(data[1:])

    ca = X509CertificateAuthority.generate("fed-fuzz")
    key = mldsa.MLDSA65PrivateKey.from_seed_bytes(bytes(range(32)))
    cert = ca.issue(NodeURI("fed-fuzz", Role.CLIENT, "hospital-1"), key.public_key())
    x509_form = sign_update_x509(key, cert, "job", 3, b"update" * 10, num_examples=5)
    pqfed_form = sign_update(_pki()["aggregator"], "job", 3, b"update" * 10, num_examples=5)
    seeds = [b"\x00" + pqfed_form.to_bytes(), b"\x01" + x509_form.to_bytes()]
    tokens = [b"\x00\x00", b"\xff\xff", b"\x30\x82", b"\x06\x09", b"\x00" * 8]
    return Target("signed-update", run, (PqcError,), seeds, tokens)


_PKI: dict[str, Any] = {}


def _pki() -> dict[str, Any]:
    """CA and aggregator from fixed ML-DSA seeds and fixed certificate fields. Signatures are
    FIPS 204 deterministic (rnd = 0^32) when liboqs is present, hedged otherwise."""
    if _PKI:
        return _PKI
    from dataclasses import replace

    from pqfed.pqc.backends import get_backend
    from pqfed.pqc.identity import (
        CERT_CONTEXT,
        Certificate,
        Identity,
        Role,
        TrustAnchor,
        key_id,
    )

    backend = get_backend("pyca")
    ca_key = backend.sig_load_private("ML-DSA-65", bytes(range(32)))
    agg_key = backend.sig_load_private("ML-DSA-65", bytes(range(1, 33)))

    def sign_with(key: Any) -> Callable[[bytes, bytes], bytes]:
        def sign(message: bytes, context: bytes) -> bytes:
            try:
                from pqfed.pqc.backends.liboqs import load_library

                api = load_library()
                oqs = get_backend("liboqs").sig_load_private("ML-DSA-65", key.private_bytes())
                with api.fixed_randomness(bytes(32)):
                    return bytes(oqs.sign(message, context))
            except Exception:  # no liboqs here: pyca's hedged signature
                return bytes(key.sign(message, context))
        return sign

    ca_pk = ca_key.public_bytes()
    ca = Certificate("fed-fuzz", "ca", Role.CA, "ML-DSA-65", ca_pk, 1767225600, 4102444800, 1,
                     key_id(ca_pk))
    ca = replace(ca, signature=sign_with(ca_key)(ca.tbs_bytes(), CERT_CONTEXT))
    cert = Certificate("fed-fuzz", "aggregator", Role.AGGREGATOR, "ML-DSA-65",
                       agg_key.public_bytes(), 1767225600, 4102444800, 2, ca.key_id)
    cert = replace(cert, signature=sign_with(ca_key)(cert.tbs_bytes(), CERT_CONTEXT))
    ident = Identity(cert, agg_key)
    _PKI.update(trust=TrustAnchor(ca), aggregator=ident, sign=sign_with(agg_key),
                cert_pem=cert.to_pem(), ca_pem=ca.to_pem(), key_pem=ident.private_key_pem())
    return _PKI


def all_targets(work: Path) -> list[Target]:
    return [http_target(), record_target(), pem_target(), audit_target(work),
            compression_target(), broadcast_target(), signed_update_target()]


# --- the loop ----------------------------------------------------------------------------------

def _on_alarm(signum: int, frame: Any) -> None:
    raise Hang(f"input ran past {HANG_S} s")


def fuzz(target: Target, budget: int, seed: int, max_len: int = 1 << 16) -> Result:
    rng = random.Random(f"{seed}/{target.name}")
    result = Result(target.name)
    corpus = list(target.seeds)
    alarm = sys.platform != "win32" and hasattr(signal, "setitimer")
    if alarm:  # the caller's own alarm (e.g. pytest-timeout's) is re-armed afterwards
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        outer, _ = signal.setitimer(signal.ITIMER_REAL, 0)
    start = time.perf_counter()
    try:
        for i in range(budget):
            if i < len(target.seeds):
                data = target.seeds[i]  # every seed must pass as it is
            else:
                parent = rng.choice(corpus)
                if target.structured is not None and rng.random() < 0.3:
                    data = target.structured(rng, parent)
                    if rng.random() < 0.5:
                        data = mutate(rng, data, corpus, target.tokens)
                else:
                    data = mutate(rng, parent, corpus, target.tokens)
                data = data[:max_len]
            result.inputs += 1
            try:
                if alarm:
                    signal.setitimer(signal.ITIMER_REAL, HANG_S)
                try:
                    target.run(data)
                finally:
                    if alarm:
                        signal.setitimer(signal.ITIMER_REAL, 0)
            except target.errors:
                result.rejected += 1
            except Exception as exc:  # anything else breaks the contract
                result.crashes.append((data, f"{type(exc).__name__}: {exc}"[:300]))
            else:
                result.accepted += 1
                if i >= len(target.seeds) and len(corpus) < 512 and rng.random() < 0.05:
                    corpus.append(data)
    finally:
        if alarm:
            signal.signal(signal.SIGALRM, previous)
            if outer:
                signal.setitimer(signal.ITIMER_REAL,
                                 max(outer - (time.perf_counter() - start), 0.001))
    result.seconds = time.perf_counter() - start
    return result


def run_all(budget: int, seed: int, work: Path, only: set[str] | None = None,
            log: Callable[[str], None] = print) -> list[Result]:
    targets = [t for t in all_targets(work) if not only or t.name in only]
    total_weight = sum(t.weight for t in targets)
    results = []
    for t in targets:
        share = max(len(t.seeds), round(budget * t.weight / total_weight))
        r = fuzz(t, share, seed)
        results.append(r)
        log(f"{r.name:<14} inputs {r.inputs:>9,}  accepted {r.accepted:>8,}  "
            f"rejected {r.rejected:>9,}  crashes {len(r.crashes)}  {r.seconds:7.1f} s  "
            f"({r.inputs / max(r.seconds, 1e-9):,.0f}/s)")
    n = sum(r.inputs for r in results)
    log(f"{'total':<14} inputs {n:>9,}  crashes {sum(len(r.crashes) for r in results)}  "
        f"{sum(r.seconds for r in results):.1f} s  (seed {seed})")
    return results


@contextlib.contextmanager
def work_dir() -> Iterator[Path]:
    """Scratch space for targets that read files (the audit log): in memory where possible
    (opening a file on an overlay filesystem costs more than verifying the log)."""
    import shutil
    import tempfile

    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = Path(tempfile.mkdtemp(prefix="pqfed-fuzz-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tests/fuzz/harness.py")
    parser.add_argument("--budget", type=int, default=1_000_000, help="inputs over all targets")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", default="", help="comma list of target names")
    parser.add_argument("--crash-dir", type=Path, default=Path("results/fuzz-crashes"))
    parser.add_argument("--memory-gib", type=float, default=8.0,
                        help="address-space limit, so an unbounded allocation is a crash")
    args = parser.parse_args(argv)
    try:
        import resource

        limit = int(args.memory_gib * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass
    only = {s for s in args.only.split(",") if s} or None
    with work_dir() as work:
        results = run_all(args.budget, args.seed, work, only)
    crashes = [(r.name, data, why) for r in results for data, why in r.crashes]
    if crashes:
        args.crash_dir.mkdir(parents=True, exist_ok=True)
        for i, (name, data, why) in enumerate(crashes[:200]):
            (args.crash_dir / f"{name}-{i}.bin").write_bytes(data)
            print(f"CRASH {name}-{i}: {why}")
        print(f"{len(crashes)} crashing inputs in {args.crash_dir}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

