"""pqfed's TLS 1.3 channel (pqc/tls13.py, OpenSSL 4) against an independent TLS stack: Go 1.27's
crypto/tls, crypto/x509 and crypto/mldsa (tests/pqc/interop, built by `make interop` into the
cache; pqc/native/build-interop.sh says what it builds and why one overlay is applied).

Both directions over loopback with ML-DSA-65 certificates from our CA on both sides, and the
refusals that must hold whoever the peer is. The Go peer prints a JSON report of what it
negotiated and verified; our side is read from the TlsChannel."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import mldsa

from pqfed.pqc.errors import CertificateError, HandshakeError, PqcError
from pqfed.pqc.identity import Role
from pqfed.pqc.pki import (
    IssuancePolicy,
    NodeURI,
    Usage,
    X509CertificateAuthority,
    make_request,
    sign_request,
)
from pqfed.pqc.pki.csr import request_pem
from pqfed.pqc.pki.profile import certificate_pem, private_key_pem
from pqfed.pqc.tls13 import (
    TlsChannel,
    TlsConfig,
    TlsContext,
    tls_connect,
    tls_server_channel,
)

FED = "fed-interop"
BUILD = Path(__file__).parents[2] / "pqc" / "native" / "build-interop.sh"
MLDSA65 = 0x0905  # draft-ietf-tls-mldsa code point (OpenSSL's name: mldsa65)
MESSAGE = "interop over X25519MLKEM768"
Node = tuple[x509.Certificate, mldsa.MLDSA65PrivateKey]


@dataclass(frozen=True)
class Peer:
    """The built interop programs."""

    patched: Path  # Go 1.27.4 + ML-DSA in signature_algorithms_cert
    stock: Path  # Go 1.27.4 as released


@pytest.fixture(scope="module")
def peer() -> Peer:
    # Never a skip: `make interop` builds it (a prerequisite of `make test`), so absence is
    # a broken setup, as with liboqs.
    check = subprocess.run([str(BUILD), "--check"], capture_output=True, text=True,
                           check=False, timeout=60)
    if check.returncode != 0:
        pytest.fail(f"the Go interop peer is not built: run `make interop`\n{check.stderr}")
    out = subprocess.run([str(BUILD), "--print-dir"], capture_output=True, text=True,
                         check=True, timeout=60)
    bin_dir = Path(out.stdout.strip())
    return Peer(bin_dir / "pqfed-interop", bin_dir / "pqfed-interop-stock")


@dataclass(frozen=True)
class Files:
    """PEM files the Go peer reads: what a site running another stack would be handed."""

    dir: Path

    def ca(self) -> str:
        return str(self.dir / "ca.pem")

    def node(self, name: str) -> list[str]:
        return ["--cert", str(self.dir / f"{name}.pem"), "--key", str(self.dir / f"{name}.key")]

    def write(self, name: str, node: Node) -> None:
        (self.dir / f"{name}.pem").write_bytes(certificate_pem(node[0]))
        (self.dir / f"{name}.key").write_bytes(private_key_pem(node[1]))
        os.chmod(self.dir / f"{name}.key", 0o600)


@dataclass(frozen=True)
class Pki:
    ca: X509CertificateAuthority
    agg: Node
    cli: Node
    files: Files


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = X509CertificateAuthority.generate(FED)
    other = X509CertificateAuthority.generate(FED)  # same federation name, another key
    nodes = {
        "agg": ca.new_node(NodeURI(FED, Role.AGGREGATOR, "agg-1")),
        "agg2": ca.new_node(NodeURI(FED, Role.AGGREGATOR, "agg-2")),
        "edge": ca.new_node(NodeURI(FED, Role.EDGE, "edge-1")),
        "cli": ca.new_node(NodeURI(FED, Role.CLIENT, "hosp-a")),
        "foreign-cli": other.new_node(NodeURI(FED, Role.CLIENT, "hosp-a")),
        "foreign-agg": other.new_node(NodeURI(FED, Role.AGGREGATOR, "agg-1")),
    }
    files = Files(tmp_path_factory.mktemp("interop"))
    (files.dir / "ca.pem").write_bytes(certificate_pem(ca.certificate))
    for name, node in nodes.items():
        files.write(name, node)
    return Pki(ca, nodes["agg"], nodes["cli"], files)


def server_ctx(pki: Pki, node: Node | None = None) -> TlsContext:
    node = node or pki.agg
    return TlsContext(TlsConfig(node[0], node[1], pki.ca.trust,
                                peer_roles=(Role.CLIENT, Role.EDGE)), Usage.SERVER)


def client_ctx(pki: Pki, node: Node | None = None, **kw: object) -> TlsContext:
    node = node or pki.cli
    cfg = TlsConfig(node[0], node[1], pki.ca.trust, peer_roles=(Role.AGGREGATOR,),
                    **kw)  # type: ignore[arg-type]
    return TlsContext(cfg, Usage.CLIENT)


@dataclass
class Ours:
    """Our side of one connection."""

    channel: TlsChannel | None = None
    error: Exception | None = None
    received: bytes = b""
    go: dict[str, object] = field(default_factory=dict)  # the Go peer's report
    go_stderr: str = ""


def _report(stdout: bytes, stderr: bytes) -> dict[str, object]:
    lines = stdout.decode().strip().splitlines()
    assert lines, f"the Go peer printed no report; stderr:\n{stderr.decode()}"
    report: dict[str, object] = json.loads(lines[-1])
    assert report.get("event") == "done", report
    return report


async def _go_client(peer: Path, sctx: TlsContext, args: list[str]) -> Ours:
    """The Go client dials our server, which answers one line reversed."""
    ours = Ours()
    done = asyncio.Event()

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ours.channel = await tls_server_channel(r, w, sctx)
            while not ours.received.endswith(b"\n"):
                ours.received += await ours.channel.recv()
            await ours.channel.send(ours.received[:-1][::-1] + b"\n")
            await ours.channel.close()
        except PqcError as exc:
            ours.error = exc
        finally:
            done.set()

    srv = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        proc = await asyncio.create_subprocess_exec(
            str(peer), "client", "--addr", f"127.0.0.1:{port}", "--message", MESSAGE, *args,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        ours.go, ours.go_stderr = _report(out, err), err.decode()
        assert (proc.returncode == 0) == bool(ours.go["ok"]), ours.go
        await asyncio.wait_for(done.wait(), 30)
    finally:
        srv.close()
        await srv.wait_closed()
    return ours


async def _go_server(peer: Path, cctx: TlsContext, args: list[str],
                     pin: str | None = None) -> Ours:
    """Our client dials the Go server and sends one line; the server answers it reversed."""
    ours = Ours()
    proc = await asyncio.create_subprocess_exec(
        str(peer), "server", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        first = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60) or b"{}")
        assert first.get("event") == "listening", first
        host, port = str(first["addr"]).rsplit(":", 1)
        try:
            ours.channel = await tls_connect(host, int(port), cctx, pin)
            await ours.channel.send(MESSAGE.encode() + b"\n")
            while not ours.received.endswith(b"\n"):
                ours.received += await ours.channel.recv()
            await ours.channel.close()
        except (PqcError, ConnectionError) as exc:
            # A refused client certificate: the Go server sends its alert and closes, and our
            # send may meet the reset before a recv reads the alert (tls13.py's send does not
            # map ConnectionError to ChannelClosed).
            ours.error = exc
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    ours.go, ours.go_stderr = _report(out, err), err.decode()
    assert (proc.returncode == 0) == bool(ours.go["ok"]), ours.go
    return ours


def go_client(peer: Path, sctx: TlsContext, *args: str) -> Ours:
    return asyncio.run(_go_client(peer, sctx, list(args)))


def go_server(peer: Path, cctx: TlsContext, *args: str, pin: str | None = None) -> Ours:
    return asyncio.run(_go_server(peer, cctx, list(args), pin))


def _scheme_codes(value: object) -> list[int]:
    assert isinstance(value, list), value
    return [int(s["code"]) for s in value]


def assert_pq_mutual(report: dict[str, object], peer_uri: str) -> None:
    """What the Go side saw: TLS 1.3, X25519MLKEM768, ML-DSA-65 both ways, our CA."""
    assert report["ok"] is True, report
    assert report["version"] == "TLS 1.3"
    assert report["group"] == "X25519MLKEM768"
    assert report["cipher"] in ("TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256")
    assert report["signature_scheme"] == {"name": "MLDSA65", "code": MLDSA65}
    assert report["peer_signature_scheme"] == {"name": "MLDSA65", "code": MLDSA65}
    # Our side's signature_algorithms (ClientHello or CertificateRequest): mldsa65 alone.
    assert _scheme_codes(report["peer_offered_schemes"]) == [MLDSA65]
    assert report["peer_key"] == "ML-DSA-65"
    assert report["peer_certificate_signature"] == "ML-DSA-65"
    assert report["peer_uris"] == [peer_uri]
    chain = report["verified_chain"]
    assert isinstance(chain, list) and len(chain) == 2 and chain[1] == f"CN={FED} federation " \
        f"CA,OU=ca,O={FED}", chain


# --- both directions ------------------------------------------------------------------------

def test_go_client_completes_a_mutual_handshake_with_our_server(peer: Peer, pki: Pki) -> None:
    f = pki.files
    ours = go_client(peer.patched, server_ctx(pki), "--ca", f.ca(), *f.node("cli"),
                     "--peer-uri", f"pqfed://{FED}/aggregator/agg-1")
    assert ours.error is None, (ours.error, ours.go)
    assert_pq_mutual(ours.go, f"pqfed://{FED}/aggregator/agg-1")
    assert ours.go["received"] == MESSAGE[::-1] and ours.received == MESSAGE.encode() + b"\n"
    assert ours.channel is not None
    assert ours.channel.group == "X25519MLKEM768" and ours.channel.version == "TLSv1.3"
    assert ours.channel.cipher == ours.go["cipher"]  # AES-256-GCM, or ChaCha20 without AES-NI
    assert (ours.channel.peer.role, ours.channel.peer.node_id) == (Role.CLIENT, "hosp-a")


def test_our_client_completes_a_mutual_handshake_with_go_server(peer: Peer, pki: Pki) -> None:
    f = pki.files
    ours = go_server(peer.patched, client_ctx(pki), "--ca", f.ca(), *f.node("agg"),
                     "--peer-uri", f"pqfed://{FED}/client/hosp-a", pin="agg-1")
    assert ours.error is None, (ours.error, ours.go)
    assert_pq_mutual(ours.go, f"pqfed://{FED}/client/hosp-a")
    assert ours.go["received"] == MESSAGE
    assert ours.received == MESSAGE[::-1].encode() + b"\n"
    assert ours.channel is not None
    assert ours.channel.group == "X25519MLKEM768" and ours.channel.version == "TLSv1.3"
    assert (ours.channel.peer.role, ours.channel.peer.node_id) == (Role.AGGREGATOR, "agg-1")


def test_mlkem1024_hybrid_when_both_sides_choose_it(peer: Peer, pki: Pki) -> None:
    f = pki.files
    node = pki.agg
    sctx = TlsContext(TlsConfig(node[0], node[1], pki.ca.trust, peer_roles=(Role.CLIENT,),
                                groups=("SecP384r1MLKEM1024",)), Usage.SERVER)
    ours = go_client(peer.patched, sctx, "--ca", f.ca(), *f.node("cli"),
                     "--groups", "SecP384r1MLKEM1024")
    assert ours.error is None and ours.go["ok"] is True, (ours.error, ours.go)
    assert ours.go["group"] == "SecP384r1MLKEM1024"
    assert ours.channel is not None and ours.channel.group == "SecP384r1MLKEM1024"


# --- what our side refuses from the independent peer --------------------------------------

def test_our_server_refuses_a_go_client_offering_only_x25519(peer: Peer, pki: Pki) -> None:
    f = pki.files
    ours = go_client(peer.patched, server_ctx(pki), "--ca", f.ca(), *f.node("cli"),
                     "--groups", "X25519")
    assert isinstance(ours.error, HandshakeError) and ours.error.field == "groups", ours.error
    assert ours.go["ok"] is False and "handshake" in str(ours.go["error"]), ours.go
    assert ours.channel is None


def test_our_server_refuses_a_go_client_certificate_from_another_ca(peer: Peer,
                                                                     pki: Pki) -> None:
    f = pki.files
    ours = go_client(peer.patched, server_ctx(pki), "--ca", f.ca(), *f.node("foreign-cli"))
    assert isinstance(ours.error, CertificateError) and ours.error.field == "issuer", ours.error
    # TLS 1.3: the client's handshake ends before the server judges its certificate; the
    # refusal reaches the Go client as an alert on its first read (or as a reset, when our
    # abort overtakes the alert).
    assert ours.go["ok"] is False and "received" not in ours.go, ours.go
    assert any(w in str(ours.go["error"]) for w in ("certificate", "reset")), ours.go
    assert ours.channel is None and ours.received == b""


@pytest.mark.parametrize(("node", "pin", "fld"), [
    ("edge", None, "role"),  # serverAuth is in an edge certificate; the role is not ours
    ("agg2", "agg-1", "node_id"),  # an aggregator, but not the pinned one
])
def test_our_client_refuses_a_go_server_with_the_wrong_identity(peer: Peer, pki: Pki, node: str,
                                                                pin: str | None,
                                                                fld: str) -> None:
    f = pki.files
    ours = go_server(peer.patched, client_ctx(pki), "--ca", f.ca(), *f.node(node), pin=pin)
    assert isinstance(ours.error, CertificateError) and ours.error.field == fld, ours.error
    assert ours.channel is None
    assert ours.go["ok"] is False, ours.go


# --- what the independent peer refuses from us (its verification is real) ------------------

def test_go_client_refuses_our_server_certificate_from_another_ca(peer: Peer, pki: Pki) -> None:
    f = pki.files
    ours = go_client(peer.patched, server_ctx(pki, _load(f, "foreign-agg")), "--ca", f.ca(),
                     *f.node("cli"))
    assert ours.go["ok"] is False and "unknown authority" in str(ours.go["error"]), ours.go
    assert ours.error is not None and ours.channel is None


def test_go_server_refuses_our_client_certificate_from_another_ca(peer: Peer, pki: Pki) -> None:
    f = pki.files
    ours = go_server(peer.patched, client_ctx(pki, _load(f, "foreign-cli")), "--ca", f.ca(),
                     *f.node("agg"), pin="agg-1")
    assert ours.go["ok"] is False and "unknown authority" in str(ours.go["error"]), ours.go
    assert ours.error is not None and ours.received == b""


def test_go_server_pins_our_client_uri(peer: Peer, pki: Pki) -> None:
    f = pki.files
    ours = go_server(peer.patched, client_ctx(pki), "--ca", f.ca(), *f.node("agg"),
                     "--peer-uri", f"pqfed://{FED}/client/hosp-b")
    assert ours.go["ok"] is False and "pinned" in str(ours.go["error"]), ours.go
    assert ours.error is not None


def _load(f: Files, name: str) -> Node:
    cert = x509.load_pem_x509_certificate((f.dir / f"{name}.pem").read_bytes())
    key = serialization.load_pem_private_key((f.dir / f"{name}.key").read_bytes(), None)
    assert isinstance(key, mldsa.MLDSA65PrivateKey)
    return cert, key


# --- Go 1.27.4 as released --------------------------------------------------------------------

def test_stock_go_leaves_mldsa_out_of_signature_algorithms_cert(peer: Peer, pki: Pki) -> None:
    """Go 1.27 omits ML-DSA from signature_algorithms_cert (go.dev/issue/82536) and OpenSSL
    then finds no certificate the peer accepts (RFC 8446 §4.2.3), in both directions: the
    reason for the overlay in build-interop.sh. When this fails, Go advertises ML-DSA for
    certificates: drop the overlay."""
    f = pki.files
    ours = go_client(peer.stock, server_ctx(pki), "--ca", f.ca(), *f.node("cli"))
    assert isinstance(ours.error, HandshakeError), (ours.error, ours.go)
    assert "no suitable signature algorithm" in ours.error.reason
    assert ours.go["ok"] is False
    ours = go_server(peer.stock, client_ctx(pki), "--ca", f.ca(), *f.node("agg"))
    # Our client has no certificate the Go server's CertificateRequest allows: it sends none.
    assert ours.go["ok"] is False and "certificate" in str(ours.go["error"]), ours.go
    assert ours.error is not None


# --- our X.509 objects through an independent parser ----------------------------------------

def _x509(peer: Path, ca: Path, *files: Path) -> list[dict[str, object]]:
    out = subprocess.run([str(peer), "x509", "--ca", str(ca), *map(str, files)],
                         capture_output=True, text=True, check=False, timeout=60)
    assert out.returncode in (0, 1), out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_go_x509_reads_and_verifies_our_certificates_requests_and_crl(peer: Peer, pki: Pki,
                                                                      tmp_path: Path) -> None:
    ca = pki.ca
    _, csr = make_request(NodeURI(FED, Role.CLIENT, "hosp-b"))
    issued = sign_request(ca, csr, IssuancePolicy())
    (tmp_path / "req.pem").write_bytes(request_pem(csr))
    (tmp_path / "issued.pem").write_bytes(certificate_pem(issued))
    crl = ca.revocation_list([issued.serial_number], number=1)
    (tmp_path / "crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    d = pki.files.dir
    got = _x509(peer.patched, d / "ca.pem", d / "ca.pem", d / "agg.pem", d / "edge.pem",
                d / "cli.pem", tmp_path / "req.pem", tmp_path / "issued.pem",
                tmp_path / "crl.pem")
    assert [r["type"] for r in got] == ["CERTIFICATE"] * 4 + ["CERTIFICATE REQUEST",
                                                                "CERTIFICATE", "X509 CRL"]
    assert all(r["ok"] is True and r["signature_valid"] is True for r in got), got
    assert all(r["signature"] == "ML-DSA-65" for r in got)
    root, agg, edge, cli, req, iss, crl_r = got
    assert root["is_ca"] is True and root["max_path_len"] == 0
    assert root["key_usage"] == 0x20 | 0x40  # x509.KeyUsageCertSign | KeyUsageCRLSign
    assert root["uris"] == [f"pqfed://{FED}/ca/ca"]
    for r, uri, eku in ((agg, "aggregator/agg-1", ["serverAuth"]),
                        (edge, "edge/edge-1", ["serverAuth", "clientAuth"]),
                        (cli, "client/hosp-a", ["clientAuth"]),
                        (iss, "client/hosp-b", ["clientAuth"])):
        assert r["uris"] == [f"pqfed://{FED}/{uri}"] and r["key"] == "ML-DSA-65"
        assert r.get("is_ca") is None and r["key_usage"] == 0x1  # digitalSignature only
        assert r["ext_key_usage"] == eku, r
    assert req["uris"] == [f"pqfed://{FED}/client/hosp-b"] and req["key"] == "ML-DSA-65"
    assert crl_r["revoked"] == [str(issued.serial_number)]


def test_go_x509_refuses_a_foreign_signature_and_a_tampered_request(peer: Peer, pki: Pki,
                                                                     tmp_path: Path) -> None:
    _, csr = make_request(NodeURI(FED, Role.CLIENT, "hosp-c"))
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-10] ^= 0x01  # inside the signature
    b64 = base64.encodebytes(bytes(der)).decode()
    (tmp_path / "bad-req.pem").write_text(
        f"-----BEGIN CERTIFICATE REQUEST-----\n{b64}-----END CERTIFICATE REQUEST-----\n")
    d = pki.files.dir
    got = _x509(peer.patched, d / "ca.pem", d / "foreign-cli.pem", tmp_path / "bad-req.pem")
    assert [(r["type"], r["ok"], r["signature_valid"]) for r in got] == [
        ("CERTIFICATE", False, False), ("CERTIFICATE REQUEST", False, False)], got


# --- the build script ---------------------------------------------------------------------------

def _build(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BUILD), *args], capture_output=True, text=True, check=False,
                          timeout=60, env=dict(os.environ, PQFED_CACHE=str(cache)))


def test_build_check_names_the_make_target_and_sees_a_stale_stamp(tmp_path: Path) -> None:
    out = _build("--print-dir", cache=tmp_path)
    assert out.returncode == 0 and Path(out.stdout.strip()) == tmp_path / "interop" / "bin"
    out = _build("--check", cache=tmp_path)
    assert out.returncode == 1 and "run `make interop`" in out.stderr
    bin_dir = tmp_path / "interop" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("pqfed-interop", "pqfed-interop-stock"):
        (bin_dir / name).write_bytes(b"")
        (bin_dir / name).chmod(0o755)
    (bin_dir / ".stamp").write_text("go=1.0 arch=amd64 src=old\n")
    assert _build("--check", cache=tmp_path).returncode == 1


def test_build_names_a_bad_argument(tmp_path: Path) -> None:
    out = _build("--frobnicate", cache=tmp_path)
    assert out.returncode == 1 and "unknown argument: --frobnicate" in out.stderr
