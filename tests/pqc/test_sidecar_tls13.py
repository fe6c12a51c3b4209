"""The sidecar's protocol choice: config and CLI, files of the wrong format refused with the
field and the fix, and the X.509 trust store's CRL rules (the sidecar-level behaviour of both
protocols is in test_sidecar.py and test_sidecar_revocation.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pqfed.cli import build_parser
from pqfed.pqc.cli import sidecar_config
from pqfed.pqc.errors import CertificateError
from pqfed.pqc.identity import Role
from pqfed.pqc.sidecar import Endpoint, Route, Sidecar, SidecarConfig
from pqfed.pqc.sidecar.config import ChannelProtocolName, ConfigError
from pqfed.pqc.truststore import X509TrustStore

from .sidecar_pki import Pki, Pqfed1Pki, X509Pki

ROUTE = (Route(Endpoint("127.0.0.1", 0), Endpoint("127.0.0.1", 1)),)


@pytest.fixture(scope="module")
def x509_pki() -> X509Pki:
    return X509Pki("fed-test")


@pytest.fixture(scope="module")
def pqfed_pki() -> Pqfed1Pki:
    return Pqfed1Pki("fed-test")


def _files(tmp: Path, pki: Pki, name: str = "node") -> tuple[Path, Path, Path]:
    pki.node("client-1", Role.CLIENT).save(tmp / f"{name}.crt", tmp / f"{name}.key")
    (tmp / f"{name}-ca.crt").write_bytes(pki.ca_pem())
    return tmp / f"{name}.crt", tmp / f"{name}.key", tmp / f"{name}-ca.crt"


def test_protocol_from_yaml_and_cli(tmp_path: Path) -> None:
    base = {"cert": "a", "key": "k", "ca": "c", "routes": ["127.0.0.1:1=h:2"]}
    assert SidecarConfig.from_mapping(base).protocol is ChannelProtocolName.PQFED1
    cfg = SidecarConfig.from_mapping({**base, "protocol": "tls13"})
    assert cfg.protocol is ChannelProtocolName.TLS13
    with pytest.raises(ConfigError) as err:
        SidecarConfig.from_mapping({**base, "protocol": "tls12"})
    assert err.value.field == "protocol" and "pqfed1, tls13" in str(err.value)
    with pytest.raises(ConfigError) as err:  # no TLS codepoint for X25519 + ML-KEM-1024
        SidecarConfig.from_mapping({**base, "protocol": "tls13",
                                    "groups": ["X25519_MLKEM1024"]})
    assert err.value.field == "groups" and "X25519_MLKEM768" in str(err.value)
    args = build_parser().parse_args(["sidecar", "--protocol", "tls13", "--route",
                                      "127.0.0.1:1=h:2", "--cert", "a"])
    assert sidecar_config(args).protocol is ChannelProtocolName.TLS13
    args = build_parser().parse_args(["sidecar", "--route", "127.0.0.1:1=h:2"])
    assert sidecar_config(args).protocol is ChannelProtocolName.PQFED1


@pytest.mark.parametrize("swap", ["cert", "key", "ca"])
def test_a_pqfed1_file_with_protocol_tls13_names_the_field_and_the_fix(
        tmp_path: Path, x509_pki: X509Pki, pqfed_pki: Pqfed1Pki, swap: str) -> None:
    files = dict(zip(("cert", "key", "ca"), _files(tmp_path, x509_pki), strict=True))
    files[swap] = dict(zip(("cert", "key", "ca"), _files(tmp_path, pqfed_pki, "old"),
                           strict=True))[swap]
    with pytest.raises(ConfigError) as err:
        Sidecar(SidecarConfig(**files, routes=ROUTE, admin=None,  # type: ignore[arg-type]
                              protocol=ChannelProtocolName.TLS13))
    assert err.value.field == swap
    assert "pqfed-format" in str(err.value) and "--protocol pqfed1" in str(err.value)
    assert "x509" in str(err.value)  # how to make the X.509 file instead


@pytest.mark.parametrize("swap", ["cert", "key", "ca"])
def test_an_x509_file_with_protocol_pqfed1_names_the_field_and_the_fix(
        tmp_path: Path, x509_pki: X509Pki, pqfed_pki: Pqfed1Pki, swap: str) -> None:
    files = dict(zip(("cert", "key", "ca"), _files(tmp_path, pqfed_pki), strict=True))
    files[swap] = dict(zip(("cert", "key", "ca"), _files(tmp_path, x509_pki, "new"),
                           strict=True))[swap]
    with pytest.raises(ConfigError) as err:
        Sidecar(SidecarConfig(**files, routes=ROUTE, admin=None))  # type: ignore[arg-type]
    assert err.value.field == swap and "--protocol tls13" in str(err.value)


@pytest.mark.parametrize("protocol", ["pqfed1", "tls13"])
def test_a_revocation_list_of_the_other_format_is_refused_at_start(
        tmp_path: Path, x509_pki: X509Pki, pqfed_pki: Pqfed1Pki, protocol: str) -> None:
    ours, theirs = ((x509_pki, pqfed_pki) if protocol == "tls13" else (pqfed_pki, x509_pki))
    cert, key, ca = _files(tmp_path, ours)
    (tmp_path / "crl.pem").write_bytes(theirs.crl(1))
    with pytest.raises(ConfigError) as err:
        Sidecar(SidecarConfig(cert, key, ca, routes=ROUTE, admin=None, crl=tmp_path / "crl.pem",
                              protocol=ours.protocol))
    assert err.value.field == "crl"


def test_x509_store_refuses_foreign_garbage_and_old_crls(tmp_path: Path,
                                                         x509_pki: X509Pki) -> None:
    (tmp_path / "ca.crt").write_bytes(x509_pki.ca_pem())
    crl = tmp_path / "crl.pem"
    store = X509TrustStore(tmp_path / "ca.crt", crl, min_interval_s=0)
    assert store.crl_number is None  # no file yet: nothing revoked, nothing refused
    crl.write_bytes(x509_pki.crl(3, (7,)))
    assert store.reload() and store.crl_number == 3 and store.current.anchor.revoked == {7}
    assert not store.reload()  # the same bytes: nothing to do
    refused = [
        (x509_pki.other().crl(9, ()), "crl.signature"),  # same name, other CA key
        (b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n", "crl"),
        (x509_pki.crl(2, ()), "crl.crl_number"),  # rollback
        (x509_pki.crl(3, ()), "crl.crl_number"),  # the same number, other content
        (x509_pki.crl(4, (), issued=int(time.time()) + 3600), "crl.last_update"),
    ]
    for data, field in refused:
        crl.write_bytes(data)
        assert not store.reload()
        assert isinstance(store.last_error, CertificateError)
        assert store.last_error.field == field, (field, store.last_error)
        assert store.crl_number == 3 and store.current.anchor.revoked == {7}
    assert store.rejected == len(refused)
    crl.unlink()  # deletion is no un-revocation
    assert not store.reload() and store.current.anchor.revoked == {7}
    # A stale list is taken (it is newer) and fails every live verification.
    crl.write_bytes(x509_pki.crl(5, (), issued=int(time.time()) - 100, validity_s=50))
    assert store.reload() and store.crl_number == 5
    node = x509_pki.node("client-1", Role.CLIENT)
    from pqfed.pqc.pki.profile import load_certificate_pem

    with pytest.raises(CertificateError) as err:
        store.verify(load_certificate_pem(node.cert_pem))
    assert err.value.field == "crl" and "stale" in str(err.value)


def test_records_are_read_together_and_close_notify_after_the_data(x509_pki: X509Pki) -> None:
    """The TLS channel's bulk path: several records that arrive together come back from one
    `recv`, and a close_notify behind them ends the channel only after their data."""
    import asyncio

    from pqfed.pqc.errors import ChannelClosed
    from pqfed.pqc.pki import Usage, X509TrustAnchor
    from pqfed.pqc.pki.profile import load_certificate_pem, load_private_key_pem
    from pqfed.pqc.tls13 import (
        RECORD_PLAINTEXT,
        TlsChannel,
        TlsConfig,
        TlsContext,
        tls_connect,
        tls_server_channel,
    )

    trust = X509TrustAnchor(load_certificate_pem(x509_pki.ca_pem()))

    def ctx(role: Role, usage: Usage, peer: Role) -> TlsContext:
        node = x509_pki.node(role.name.lower(), role)
        return TlsContext(TlsConfig(load_certificate_pem(node.cert_pem),
                                    load_private_key_pem(node.key_pem), trust,
                                    peer_roles=(peer,)), usage)

    server_ctx = ctx(Role.AGGREGATOR, Usage.SERVER, Role.CLIENT)
    client_ctx = ctx(Role.CLIENT, Usage.CLIENT, Role.AGGREGATOR)
    payload = bytes(range(250)) * (3 * RECORD_PLAINTEXT // 250 + 4)  # 4 records, < 64 KiB

    async def main() -> None:
        sent = asyncio.Event()

        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            channel = await tls_server_channel(r, w, server_ctx)
            await channel.send(payload)
            await channel.close()  # close_notify right behind the data
            sent.set()

        srv = await asyncio.start_server(serve, "127.0.0.1", 0)
        channel: TlsChannel = await tls_connect("127.0.0.1", srv.sockets[0].getsockname()[1],
                                                client_ctx)
        await sent.wait()
        await asyncio.sleep(0.1)  # every record is in the client's socket buffer now
        got = await channel.recv()
        assert got == payload  # all four records in one read
        with pytest.raises(ChannelClosed):
            await channel.recv()
        srv.close()

    asyncio.run(main())
