"""The sidecar's admin API is loopback-only; the kubelet's probes get a data-free listener
(the pod-network check: tests/operator/test_pod_admin_network.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pqfed.pqc.identity import CertificateAuthority, Identity
from pqfed.pqc.sidecar import Endpoint, Route, Sidecar, SidecarConfig
from pqfed.pqc.sidecar.admin import build_probe_app
from pqfed.pqc.sidecar.config import ConfigError


def _config(tmp: Path, ident: Identity, ca: CertificateAuthority, **extra: object
            ) -> SidecarConfig:
    ident.save(tmp / "node.crt", tmp / "node.key")
    (tmp / "ca.crt").write_text(ca.root.to_pem())
    return SidecarConfig(cert=tmp / "node.crt", key=tmp / "node.key", ca=tmp / "ca.crt",
                         routes=(Route(Endpoint("127.0.0.1", 0), Endpoint("127.0.0.1", 1)),),
                         **extra)  # type: ignore[arg-type]


@pytest.mark.parametrize("host", ["0.0.0.0", "10.244.0.7", "::"])
def test_admin_api_must_be_loopback(tmp_path: Path, ca: CertificateAuthority, client: Identity,
                                    host: str) -> None:
    with pytest.raises(ConfigError, match="loopback") as err:
        _config(tmp_path, client, ca, admin=Endpoint(host, 9901))
    assert err.value.field == "admin"
    assert "--probes" in str(err.value)  # says how to serve the kubelet instead


def test_probe_and_admin_ports_differ(tmp_path: Path, ca: CertificateAuthority,
                                      client: Identity) -> None:
    with pytest.raises(ConfigError) as err:
        _config(tmp_path, client, ca, admin=Endpoint("127.0.0.1", 9901),
                probes=Endpoint("0.0.0.0", 9901))
    assert err.value.field == "probes"


def test_yaml_config_takes_probes(tmp_path: Path, ca: CertificateAuthority,
                                  client: Identity) -> None:
    base = _config(tmp_path, client, ca)
    cfg = SidecarConfig.from_mapping({
        "cert": str(base.cert), "key": str(base.key), "ca": str(base.ca),
        "routes": ["127.0.0.1:0=127.0.0.1:1"], "probes": "0.0.0.0:9902"})
    assert cfg.probes == Endpoint("0.0.0.0", 9902)
    with pytest.raises(ConfigError, match="loopback"):
        SidecarConfig.from_mapping({"cert": str(base.cert), "key": str(base.key),
                                    "ca": str(base.ca), "routes": ["127.0.0.1:0=127.0.0.1:1"],
                                    "admin": "0.0.0.0:9901"})


def test_probe_listener_returns_no_data(tmp_path: Path, ca: CertificateAuthority,
                                        client: Identity) -> None:
    sidecar = Sidecar(_config(tmp_path, client, ca, admin=None))
    api = TestClient(build_probe_app(sidecar))
    assert (api.get("/healthz").status_code, api.get("/healthz").text) == (200, "ok\n")
    not_ready = api.get("/readyz")
    assert (not_ready.status_code, not_ready.text) == (503, "not ready\n")  # no reasons
    sidecar.ready = True
    assert (api.get("/readyz").status_code, api.get("/readyz").text) == (200, "ready\n")
    for path in ("/identity", "/metrics", "/openapi.json", "/docs"):
        assert api.get(path).status_code == 404, path


def test_a_listener_that_cannot_start_fails_the_sidecar(tmp_path: Path,
                                                        ca: CertificateAuthority,
                                                        client: Identity,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """An image without the pinned HTTP parser made both listeners fail at start, and the
    sidecar then exited 0 with nothing logged: the kubelet restarted it as "Completed" in a
    loop. Now the listener's error ends `serve` (and the process) with that error."""
    import asyncio

    from uvicorn.importer import ImportFromStringError

    from pqfed.pqc.sidecar import admin

    # What a missing httptools looks like to uvicorn: a protocol module it cannot import.
    monkeypatch.setattr(admin, "UPSTREAM_HTTP_IMPLEMENTATION", "no_such_parser:Protocol")
    sidecar = Sidecar(_config(tmp_path, client, ca, admin=Endpoint("127.0.0.1", 0),
                              probes=Endpoint("127.0.0.1", 0)))
    with pytest.raises(ImportFromStringError, match="no_such_parser"):
        asyncio.run(admin.serve(sidecar))
