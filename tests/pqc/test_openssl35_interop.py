"""Our X.509 objects and TLS 1.3 channel through OpenSSL 3.5's `openssl` program: the tooling a
site's IT has, and a second OpenSSL built independently of the OpenSSL 4.0.3 that pqfed runs on
(pqc/native/build-openssl35.sh; `make openssl35` builds it into the cache).

The certificates, request and CRL are made the way a federation makes them, with the CLI
(`pqfed ca x509-init|csr|sign|x509-crl`), and read from the files it writes. The TLS tests run
the real sidecar (`pqfed sidecar --protocol tls13`) against `openssl s_client` and
`openssl s_server` over loopback, and parse what OpenSSL 3.5 reports."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from OpenSSL import SSL

from pqfed.cli import main as cli_main
from pqfed.pqc.sidecar import Endpoint, Route, Sidecar, SidecarConfig
from pqfed.pqc.sidecar.config import ChannelProtocolName

FED = "fed-ossl"
BUILD = Path(__file__).parents[2] / "pqc" / "native" / "build-openssl35.sh"
ROLES = ("aggregator", "client", "edge", "operator")
NODE_ID = {"aggregator": "agg-1", "client": "hosp-a", "edge": "edge-1", "operator": "op-1"}
# What `openssl x509 -text` prints for each role's ExtendedKeyUsage (docs/pki.md, profile).
EKU_TEXT = {"aggregator": "TLS Web Server Authentication",
            "client": "TLS Web Client Authentication",
            "edge": "TLS Web Server Authentication, TLS Web Client Authentication",
            "operator": "TLS Web Client Authentication"}
# `openssl verify -purpose` per role: the TLS side(s) its EKU allows.
PURPOSES = {"aggregator": ("sslserver",), "client": ("sslclient",),
            "edge": ("sslserver", "sslclient"), "operator": ("sslclient",)}
TIMEOUT_S = 60


@dataclass(frozen=True)
class OpenSSL35:
    program: Path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.program), *args], capture_output=True, text=True,
                              check=False, timeout=TIMEOUT_S, env=_env())

    def ok(self, *args: str) -> str:
        out = self.run(*args)
        assert out.returncode == 0, (args, out.stdout, out.stderr)
        return out.stdout + out.stderr

# Built in the background by `make test` (tests/run-all.sh): these run once it is done.
pytestmark = pytest.mark.openssl35


def _env() -> dict[str, str]:
    """The caller's environment without OpenSSL's own variables (a stray OPENSSL_CONF or
    SSL_CERT_FILE would change what the program trusts or loads)."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("OPENSSL", "SSL_CERT_"))}


@pytest.fixture(scope="module")
def openssl() -> OpenSSL35:
    # Never a skip: `make openssl35` builds it (`make test` does, in the background), so absence is
    # a broken setup, as with the Go peer and liboqs.
    check = subprocess.run([str(BUILD), "--check"], capture_output=True, text=True,
                           check=False, timeout=60)
    if check.returncode != 0:
        pytest.fail(f"OpenSSL 3.5's openssl program is not built: run `make openssl35`\n"
                    f"{check.stderr}")
    out = subprocess.run([str(BUILD), "--print-path"], capture_output=True, text=True,
                         check=True, timeout=60)
    return OpenSSL35(Path(out.stdout.strip()))


@dataclass(frozen=True)
class Federation:
    """Files as the CLI writes them: the CA, one enrolled node per role (key made on the
    site, request signed by the CA admin), a CRL, and a second CA of the same name."""

    dir: Path

    @property
    def ca(self) -> Path:
        return self.dir / "ca" / "ca.crt"

    @property
    def other_ca(self) -> Path:
        return self.dir / "other-ca" / "ca.crt"

    def cert(self, name: str) -> Path:
        return self.dir / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.dir / name / "tls.key"

    def csr(self, name: str) -> Path:
        return self.dir / name / "tls.csr"

    @property
    def crl(self) -> Path:
        return self.dir / "ca.crl"

    def serial(self, name: str) -> int:
        return x509.load_pem_x509_certificate(self.cert(name).read_bytes()).serial_number


def _enrol(d: Path, ca_dir: Path, name: str, role: str, node_id: str) -> None:
    assert cli_main(["ca", "csr", "--federation", FED, "--role", role, "--node-id", node_id,
                     "--out", str(d / name)]) == 0
    assert cli_main(["ca", "sign", "--ca", str(ca_dir), "--csr", str(d / name / "tls.csr"),
                     "--role", role, "--node-id", node_id, "--out", str(d / f"{name}.crt")]) == 0


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    d = tmp_path_factory.mktemp("openssl35")
    assert cli_main(["ca", "x509-init", "--federation", FED, "--out", str(d / "ca")]) == 0
    assert cli_main(["ca", "x509-init", "--federation", FED, "--out", str(d / "other-ca")]) == 0
    for role in ROLES:
        _enrol(d, d / "ca", role, role, NODE_ID[role])
    _enrol(d, d / "ca", "revoked", "client", "hosp-r")
    _enrol(d, d / "other-ca", "foreign-client", "client", "hosp-a")
    _enrol(d, d / "other-ca", "foreign-aggregator", "aggregator", "agg-1")
    f = Federation(d)
    assert cli_main(["ca", "x509-crl", "--ca", str(d / "ca"), "--number", "2", "--revoke",
                     hex(f.serial("revoked")), "--out", str(f.crl)]) == 0
    return f


# --- reading the objects: x509, req, crl -----------------------------------------------------

def _extensions(text: str) -> dict[str, tuple[bool, str]]:
    """`openssl x509|req|crl -text`'s X509v3 extensions: name -> (critical, value lines)."""
    found: dict[str, tuple[bool, str]] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.fullmatch(r"\s*X509v3 ([A-Za-z ]+):( critical)?", line.rstrip())
        if m is None:
            continue
        indent = len(line) - len(line.lstrip())
        body = []
        for nxt in lines[i + 1:]:
            if len(nxt) - len(nxt.lstrip()) <= indent:
                break
            body.append(nxt.strip())
        found[m.group(1)] = (m.group(2) is not None, " ".join(body))
    return found


def _hex_colon(value: bytes) -> str:
    return ":".join(f"{b:02X}" for b in value)


def _ski(cert: Path) -> bytes:
    c = x509.load_pem_x509_certificate(cert.read_bytes())
    return c.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


def test_it_is_openssl_3_5_not_the_openssl_we_run_on(openssl: OpenSSL35) -> None:
    version = openssl.ok("version")
    assert version.startswith("OpenSSL 3.5."), version
    ours = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
    assert not ours.startswith("OpenSSL 3.5."), ours  # pyca's bundled OpenSSL (4.0.x)


def test_x509_text_reads_our_ca_certificate(openssl: OpenSSL35, fed: Federation) -> None:
    text = openssl.ok("x509", "-in", str(fed.ca), "-text", "-noout")
    assert text.count("Signature Algorithm: ML-DSA-65") == 2, text  # TBS and outer
    assert "Public Key Algorithm: ML-DSA-65" in text and "ML-DSA-65 Public-Key:" in text
    assert f"Issuer: O={FED}, OU=ca, CN={FED} federation CA" in text
    assert f"Subject: O={FED}, OU=ca, CN={FED} federation CA" in text
    assert "Version: 3 (0x2)" in text
    ext = _extensions(text)
    assert ext["Basic Constraints"] == (True, "CA:TRUE, pathlen:0"), ext
    assert ext["Key Usage"] == (True, "Certificate Sign, CRL Sign"), ext
    assert ext["Subject Alternative Name"] == (False, f"URI:pqfed://{FED}/ca/ca"), ext
    assert ext["Subject Key Identifier"] == (False, _hex_colon(_ski(fed.ca))), ext
    assert "Extended Key Usage" not in ext and "Authority Key Identifier" not in ext


@pytest.mark.parametrize("role", ROLES)
def test_x509_text_reads_our_node_certificate(openssl: OpenSSL35, fed: Federation,
                                              role: str) -> None:
    text = openssl.ok("x509", "-in", str(fed.cert(role)), "-text", "-noout")
    assert text.count("Signature Algorithm: ML-DSA-65") == 2, text
    assert "Public Key Algorithm: ML-DSA-65" in text and "ML-DSA-65 Public-Key:" in text
    assert f"Issuer: O={FED}, OU=ca, CN={FED} federation CA" in text
    assert f"Subject: O={FED}, OU={role}, CN={NODE_ID[role]}" in text
    ext = _extensions(text)
    assert ext["Basic Constraints"] == (True, "CA:FALSE"), ext
    assert ext["Key Usage"] == (True, "Digital Signature"), ext
    assert ext["Extended Key Usage"] == (False, EKU_TEXT[role]), ext
    assert ext["Subject Alternative Name"] == (
        False, f"URI:pqfed://{FED}/{role}/{NODE_ID[role]}"), ext
    assert ext["Authority Key Identifier"] == (False, _hex_colon(_ski(fed.ca))), ext
    # The public key OpenSSL 3.5 decodes is the one the site made (the request's key).
    pub = openssl.ok("x509", "-in", str(fed.cert(role)), "-noout", "-pubkey")
    req_pub = openssl.ok("req", "-in", str(fed.csr(role)), "-noout", "-pubkey")
    assert "BEGIN PUBLIC KEY" in pub and pub == req_pub


@pytest.mark.parametrize("role", ROLES)
def test_verify_accepts_our_node_certificate_for_its_tls_side(openssl: OpenSSL35,
                                                              fed: Federation,
                                                              role: str) -> None:
    for purpose in PURPOSES[role]:
        out = openssl.ok("verify", "-x509_strict", "-purpose", purpose, "-CAfile", str(fed.ca),
                         str(fed.cert(role)))
        assert out.strip() == f"{fed.cert(role)}: OK", out


def test_verify_refuses_the_tls_side_the_eku_does_not_allow(openssl: OpenSSL35,
                                                            fed: Federation) -> None:
    out = openssl.run("verify", "-purpose", "sslserver", "-CAfile", str(fed.ca),
                      str(fed.cert("client")))
    assert out.returncode != 0 and "unsuitable certificate purpose" in out.stdout + out.stderr


def test_verify_refuses_a_certificate_from_another_ca(openssl: OpenSSL35,
                                                      fed: Federation) -> None:
    # Same federation name, so the same issuer name; the AuthorityKeyIdentifier names the other
    # CA's key, so OpenSSL finds no issuer in ca.crt.
    for ca, cert in ((fed.ca, fed.cert("foreign-client")), (fed.other_ca, fed.cert("client"))):
        out = openssl.run("verify", "-CAfile", str(ca), str(cert))
        assert out.returncode != 0, out
        assert "unable to get local issuer certificate" in out.stdout + out.stderr, out


def _der(pem: Path) -> bytearray:
    lines = [ln for ln in pem.read_text().splitlines() if ln and not ln.startswith("-----")]
    return bytearray(base64.b64decode("".join(lines)))


def _pem(label: str, der: bytes, path: Path) -> Path:
    b64 = base64.encodebytes(der).decode()
    path.write_text(f"-----BEGIN {label}-----\n{b64}-----END {label}-----\n")
    return path


@pytest.mark.parametrize("where", ["signature", "subject_alt_name"])
def test_verify_refuses_a_tampered_certificate(openssl: OpenSSL35, fed: Federation,
                                               tmp_path: Path, where: str) -> None:
    der = _der(fed.cert("client"))
    if where == "signature":
        der[-10] ^= 0x01  # inside the ML-DSA-65 signature, the last field
    else:  # another node's name, same length: the DER stays well-formed
        uri = f"pqfed://{FED}/client/hosp-a".encode()
        at = der.index(uri)
        der[at:at + len(uri)] = f"pqfed://{FED}/client/hosp-z".encode()
    bad = _pem("CERTIFICATE", bytes(der), tmp_path / "bad.crt")
    assert "URI:pqfed://" in openssl.ok("x509", "-in", str(bad), "-text", "-noout")  # parses
    out = openssl.run("verify", "-CAfile", str(fed.ca), str(bad))
    assert out.returncode != 0 and "certificate signature failure" in out.stdout + out.stderr, out


def test_req_verify_reads_a_pqfed_ca_csr_request(openssl: OpenSSL35, fed: Federation) -> None:
    text = openssl.ok("req", "-in", str(fed.csr("client")), "-verify", "-text", "-noout")
    assert "Certificate request self-signature verify OK" in text, text
    assert "Signature Algorithm: ML-DSA-65" in text
    assert "Public Key Algorithm: ML-DSA-65" in text
    assert f"Subject: O={FED}, OU=client, CN=hosp-a" in text
    assert "Requested Extensions:" in text
    ext = _extensions(text)
    assert ext["Subject Alternative Name"] == (False, f"URI:pqfed://{FED}/client/hosp-a"), ext


def test_req_verify_refuses_a_request_with_a_flipped_signature_bit(
        openssl: OpenSSL35, fed: Federation, tmp_path: Path) -> None:
    der = _der(fed.csr("client"))
    der[-10] ^= 0x01
    bad = _pem("CERTIFICATE REQUEST", bytes(der), tmp_path / "bad.csr")
    out = openssl.run("req", "-in", str(bad), "-verify", "-noout")
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert "self-signature verify failure" in text or "did not match" in text, text
    assert "verify OK" not in text


def test_crl_text_reads_and_verifies_our_crl(openssl: OpenSSL35, fed: Federation) -> None:
    text = openssl.ok("crl", "-in", str(fed.crl), "-text", "-noout", "-CAfile", str(fed.ca))
    assert "verify OK" in text, text
    assert "Certificate Revocation List (CRL):" in text and "Version 2 (0x1)" in text
    assert "Signature Algorithm: ML-DSA-65" in text
    assert f"Issuer: O={FED}, OU=ca, CN={FED} federation CA" in text
    assert re.search(r"Next Update: \w", text), text
    ext = _extensions(text)
    assert ext["CRL Number"] == (False, "2"), ext
    assert ext["Authority Key Identifier"] == (False, _hex_colon(_ski(fed.ca))), ext
    serials = re.findall(r"Serial Number: ([0-9A-F]+)", text)
    assert [int(s, 16) for s in serials] == [fed.serial("revoked")], text


def test_verify_crl_check_refuses_a_revoked_certificate(openssl: OpenSSL35,
                                                        fed: Federation) -> None:
    args = ("verify", "-crl_check", "-CAfile", str(fed.ca), "-CRLfile", str(fed.crl))
    out = openssl.run(*args, str(fed.cert("revoked")))
    assert out.returncode != 0 and "certificate revoked" in out.stdout + out.stderr, out
    assert openssl.ok(*args, str(fed.cert("client"))).strip() == f"{fed.cert('client')}: OK"


def test_verify_crl_check_refuses_a_tampered_crl(openssl: OpenSSL35, fed: Federation,
                                                 tmp_path: Path) -> None:
    der = _der(fed.crl)
    der[-10] ^= 0x01
    bad = _pem("X509 CRL", bytes(der), tmp_path / "bad.crl")
    out = openssl.run("verify", "-crl_check", "-CAfile", str(fed.ca), "-CRLfile", str(bad),
                      str(fed.cert("client")))
    assert out.returncode != 0 and "CRL signature failure" in out.stdout + out.stderr, out


# --- TLS 1.3: openssl s_client -> our sidecar ------------------------------------------------

def _sidecar(fed: Federation, name: str, **where: object) -> Sidecar:
    """A tls13 sidecar on the files `pqfed ca sign` wrote for `name` (no admin port)."""
    return Sidecar(SidecarConfig(cert=fed.cert(name), key=fed.key(name), ca=fed.ca, admin=None,
                                 protocol=ChannelProtocolName.TLS13,
                                 **where))  # type: ignore[arg-type]


async def _line_app(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """The app behind the sidecar: answers one line upper-cased, then closes."""
    line = await r.readline()
    w.write(line.upper())
    await w.drain()
    w.close()


@dataclass
class Exchange:
    """One s_client or s_server run and what the sidecar saw."""

    rc: int
    stdout: str
    stderr: str
    sidecar: Sidecar
    app_reached: bool = False  # s_client: the app behind our sidecar got the connection
    reply: bytes = b""  # s_server: what the app before our sidecar got back

    def failures(self, field: str) -> float:
        return self.sidecar.metrics.registry.get_sample_value(
            "pqfed_channel_failures_total", {"stage": "handshake", "field": field}) or 0.0

    def negotiated(self) -> float:
        return self.sidecar.metrics.registry.get_sample_value(
            "pqfed_channels_negotiated_total",
            {"version": "TLSv1.3", "group": "X25519MLKEM768"}) or 0.0


async def _verdict(sidecar: Sidecar) -> None:
    """Until the sidecar has counted the handshake: a channel negotiated or a failure."""
    names = ("pqfed_channels_negotiated_total", "pqfed_channel_failures_total")
    while not any(sample.value for metric in sidecar.metrics.registry.collect()
                  for sample in metric.samples if sample.name in names):
        await asyncio.sleep(0.02)


def _summary(text: str) -> dict[str, str]:
    """The `-brief` summary OpenSSL's apps print (print_ssl_summary): 'Key: value' lines."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep and key in ("Protocol version", "Ciphersuite", "Peer certificate",
                           "Signature type", "Verification", "Negotiated TLS1.3 group",
                           "Verification error", "Peer Temp Key", "Supported groups",
                           "Shared groups"):
            out[key] = value.strip()
    return out


async def _s_client(openssl: OpenSSL35, fed: Federation, *args: str,
                    client: str = "client") -> Exchange:
    reached: list[bool] = []

    async def app(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        reached.append(True)
        await _line_app(r, w)

    upstream = await asyncio.start_server(app, "127.0.0.1", 0)
    sidecar = _sidecar(fed, "aggregator", listen=Endpoint("127.0.0.1", 0),
                       upstream=Endpoint("127.0.0.1", upstream.sockets[0].getsockname()[1]))
    await sidecar.start()
    try:
        proc = await asyncio.create_subprocess_exec(
            str(openssl.program), "s_client", "-connect",
            f"127.0.0.1:{sidecar.bound['listen']}", "-brief", "-ign_eof", "-verify_return_error",
            "-x509_strict", "-cert", str(fed.cert(client)), "-key", str(fed.key(client)),
            *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=_env())
        try:
            out, err = await asyncio.wait_for(proc.communicate(b"hello from openssl 3.5\n"),
                                              TIMEOUT_S)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode is not None
        # s_client may exit on our alert before the sidecar has counted its verdict.
        await asyncio.wait_for(_verdict(sidecar), TIMEOUT_S)
        return Exchange(proc.returncode, out.decode(), err.decode(), sidecar, bool(reached))
    finally:
        await sidecar.stop()
        upstream.close()
        await upstream.wait_closed()


def s_client(openssl: OpenSSL35, fed: Federation, *args: str,
             client: str = "client") -> Exchange:
    return asyncio.run(_s_client(openssl, fed, *args, client=client))


def test_s_client_completes_tls13_x25519mlkem768_with_our_sidecar(openssl: OpenSSL35,
                                                                  fed: Federation) -> None:
    # s_client's defaults (its group list starts with X25519MLKEM768, its signature
    # algorithms include mldsa65); it verifies our aggregator against our CA.
    ex = s_client(openssl, fed, "-CAfile", str(fed.ca))
    s = _summary(ex.stderr)
    assert ex.rc == 0, (ex.stdout, ex.stderr)
    assert s["Protocol version"] == "TLSv1.3", ex.stderr
    assert s["Negotiated TLS1.3 group"] == "X25519MLKEM768", ex.stderr
    assert s["Ciphersuite"] in ("TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256")
    assert s["Signature type"] == "mldsa65", ex.stderr
    assert s["Verification"] == "OK", ex.stderr
    assert s["Peer certificate"] == f"O={FED}, OU=aggregator, CN=agg-1", ex.stderr
    assert ex.stdout == "HELLO FROM OPENSSL 3.5\n"  # through the sidecar to the app and back
    assert ex.app_reached and ex.negotiated() == 1


def test_our_sidecar_refuses_s_client_offering_only_x25519(openssl: OpenSSL35,
                                                           fed: Federation) -> None:
    ex = s_client(openssl, fed, "-CAfile", str(fed.ca), "-groups", "X25519")
    assert ex.rc != 0, (ex.stdout, ex.stderr)
    # Our handshake_failure alert (no hybrid group in common), as s_client reports it.
    assert "alert handshake failure" in ex.stderr and "alert number 40" in ex.stderr, ex.stderr
    assert "Protocol version" not in ex.stderr
    assert ex.failures("groups") == 1 and ex.negotiated() == 0
    assert not ex.app_reached and ex.stdout == ""


def test_our_sidecar_refuses_s_client_certificate_from_another_ca(openssl: OpenSSL35,
                                                                  fed: Federation) -> None:
    ex = s_client(openssl, fed, "-CAfile", str(fed.ca), client="foreign-client")
    # TLS 1.3: the client's handshake ends before the server judges its certificate; the
    # refusal reaches s_client as an alert (or a reset) when it reads.
    assert ex.failures("certificate.issuer") == 1 and ex.negotiated() == 0, ex.stderr
    assert not ex.app_reached and ex.stdout == ""
    assert ex.rc != 0, ex.stderr
    assert "alert unknown ca" in ex.stderr or "errno=104" in ex.stderr, ex.stderr


def test_s_client_refuses_our_sidecar_from_another_ca(openssl: OpenSSL35,
                                                      fed: Federation) -> None:
    ex = s_client(openssl, fed, "-CAfile", str(fed.other_ca))
    assert ex.rc != 0, (ex.stdout, ex.stderr)
    assert "verify error:num=20:unable to get local issuer certificate" in ex.stderr, ex.stderr
    assert "certificate verify failed" in ex.stderr, ex.stderr
    assert not ex.app_reached and ex.negotiated() == 0


# --- TLS 1.3: our sidecar -> openssl s_server ------------------------------------------------

async def _s_server(openssl: OpenSSL35, fed: Federation, *args: str,
                    server: str = "aggregator", client: str = "client") -> Exchange:
    """Our client sidecar (route pinned to agg-1) dials `s_server -rev`, which verifies the
    client certificate (-Verify) and answers each line reversed."""
    proc = await asyncio.create_subprocess_exec(
        str(openssl.program), "s_server", "-accept", "127.0.0.1:0", "-naccept", "1", "-rev",
        "-cert", str(fed.cert(server)), "-key", str(fed.key(server)), "-Verify", "1",
        "-verify_return_error", "-x509_strict", *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    sidecar: Sidecar | None = None
    try:
        assert proc.stdout is not None
        first = await asyncio.wait_for(_accept_line(proc.stdout), TIMEOUT_S)
        m = re.fullmatch(r"ACCEPT 127\.0\.0\.1:(\d+)\n", first)
        assert m, first
        sidecar = _sidecar(fed, client, routes=(
            Route(Endpoint("127.0.0.1", 0), Endpoint("127.0.0.1", int(m.group(1))), "agg-1"),))
        await sidecar.start()
        reply = await _app_line(sidecar.bound["route0"], b"hello from pqfed\n")
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT_S)
        assert proc.returncode is not None
        return Exchange(proc.returncode, out.decode(), err.decode(), sidecar, reply=reply)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if sidecar is not None:
            await sidecar.stop()


async def _accept_line(stdout: asyncio.StreamReader) -> str:
    """s_server's stdout up to its "ACCEPT <address>" line (after "Using default temp DH
    parameters" and the like)."""
    seen = ""
    while line := (await stdout.readline()).decode():
        seen += line
        if line.startswith("ACCEPT"):
            return line
    raise AssertionError(f"s_server exited before accepting: {seen!r}")


async def _app_line(port: int, line: bytes) -> bytes:
    """The app on the client side: one line through the sidecar, the answer (b'' if the
    sidecar resets or closes the connection)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(line)
        await w.drain()
        return await asyncio.wait_for(r.readline(), TIMEOUT_S)
    except ConnectionError:
        return b""
    finally:
        w.close()


def s_server(openssl: OpenSSL35, fed: Federation, *args: str, server: str = "aggregator",
             client: str = "client") -> Exchange:
    return asyncio.run(_s_server(openssl, fed, *args, server=server, client=client))


def test_our_sidecar_completes_tls13_x25519mlkem768_with_s_server(openssl: OpenSSL35,
                                                                  fed: Federation) -> None:
    ex = s_server(openssl, fed, "-CAfile", str(fed.ca))
    s = _summary(ex.stderr)
    assert "CONNECTION ESTABLISHED" in ex.stderr and ex.rc == 0, ex.stderr
    assert ex.reply == b"defqp morf olleh\n", (ex.reply, ex.stderr)  # reversed by s_server
    assert s["Protocol version"] == "TLSv1.3", ex.stderr
    # A TLS 1.3 server reports the group of the client's key share as its "temp key".
    assert s["Peer Temp Key"] == "X25519MLKEM768", ex.stderr
    assert s["Supported groups"] == "X25519MLKEM768", ex.stderr  # all our client offers
    assert s["Signature type"] == "mldsa65", ex.stderr  # our client's CertificateVerify
    assert s["Verification"] == "OK", ex.stderr  # s_server verified our client certificate
    assert s["Peer certificate"] == f"O={FED}, OU=client, CN=hosp-a", ex.stderr
    assert ex.negotiated() == 1


def test_our_sidecar_refuses_s_server_certificate_from_another_ca(openssl: OpenSSL35,
                                                                  fed: Federation) -> None:
    ex = s_server(openssl, fed, "-CAfile", str(fed.ca), server="foreign-aggregator")
    assert ex.failures("certificate.issuer") == 1 and ex.negotiated() == 0, ex.stderr
    assert ex.reply == b""
    # Our client's alert for a chain it cannot verify, as s_server reports it.
    assert "CONNECTION FAILURE" in ex.stderr and "alert unknown ca" in ex.stderr, ex.stderr


def test_s_server_refuses_our_client_from_another_ca(openssl: OpenSSL35,
                                                     fed: Federation) -> None:
    ex = s_server(openssl, fed, "-CAfile", str(fed.other_ca))
    assert "CONNECTION FAILURE" in ex.stderr, ex.stderr
    assert "verify error:num=20:unable to get local issuer certificate" in ex.stderr, ex.stderr
    assert "certificate verify failed" in ex.stderr, ex.stderr
    assert ex.reply == b""


# --- the build script ------------------------------------------------------------------------

def _build(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BUILD), *args], capture_output=True, text=True, check=False,
                          timeout=60, env=dict(os.environ, PQFED_CACHE=str(cache)))


def test_build_check_names_the_make_target_and_sees_a_stale_stamp(tmp_path: Path) -> None:
    out = _build("--print-path", cache=tmp_path)
    program = tmp_path / "openssl35" / "dist" / "bin" / "openssl"
    assert out.returncode == 0 and Path(out.stdout.strip()) == program
    out = _build("--check", cache=tmp_path)
    assert out.returncode == 1 and "run `make openssl35`" in out.stderr
    program.parent.mkdir(parents=True)
    program.write_bytes(b"")
    program.chmod(0o755)
    (program.parents[1] / ".stamp").write_text("openssl-src=300.0.0 arch=amd64 options=old\n")
    assert _build("--check", cache=tmp_path).returncode == 1


def test_build_names_a_bad_argument(tmp_path: Path) -> None:
    out = _build("--frobnicate", cache=tmp_path)
    assert out.returncode == 1 and "unknown argument: --frobnicate" in out.stderr

