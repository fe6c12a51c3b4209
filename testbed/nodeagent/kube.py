"""A small Kubernetes API client on the standard library (``http.client`` + ``ssl``).

The node agent needs a handful of verbs on raw JSON objects (get, list, watch,
create, patch, delete) with full control over content types and timeouts, so it
does not go through the generated ``kubernetes`` client. Kubeconfigs with
client certificates (what ``testbed/cluster/up.sh`` writes), bearer tokens and
in-cluster service-account credentials are supported.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import ssl
import threading
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"


class ApiError(Exception):
    """A non-2xx answer from the API server."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        self.status = status
        self.body = body
        reason = body
        with contextlib.suppress(ValueError, AttributeError):
            reason = str(json.loads(body).get("message", body))
        super().__init__(f"{method} {path}: HTTP {status}: {reason[:500]}")


def _materialise(data_b64: str, directory: Path, suffix: str) -> str:
    raw = base64.b64decode(data_b64)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / f"{hashlib.sha256(raw).hexdigest()[:16]}{suffix}"
    if not path.exists():
        tmp = path.with_suffix(path.suffix + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
        tmp.replace(path)
    return str(path)


@dataclass(frozen=True)
class KubeConfig:
    """Where the API server is and how to authenticate to it."""

    server: str
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    token: str | None = None
    insecure: bool = False

    @property
    def host(self) -> str:
        return urllib.parse.urlsplit(self.server).hostname or ""

    @property
    def port(self) -> int:
        parts = urllib.parse.urlsplit(self.server)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @classmethod
    def load(cls, path: str | Path, secrets_dir: Path) -> KubeConfig:
        """Read the current context of a kubeconfig file.

        Inline ``*-data`` fields are written (0600) under ``secrets_dir``, since
        ``ssl`` loads client certificates from files only.
        """
        path = Path(path)
        doc = yaml.safe_load(path.read_text())
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: not a kubeconfig")

        def named(kind: str, name: str) -> Obj:
            for item in doc.get(kind) or []:
                if item.get("name") == name:
                    return dict(item.get(kind[:-1]) or {})
            raise ValueError(f"{path}: no {kind[:-1]} named {name!r}")

        ctx_name = doc.get("current-context")
        contexts = doc.get("contexts") or []
        if not ctx_name and contexts:
            ctx_name = contexts[0].get("name")
        ctx = named("contexts", str(ctx_name))
        cluster = named("clusters", str(ctx.get("cluster")))
        user = named("users", str(ctx.get("user"))) if ctx.get("user") else {}
        base = path.parent

        def file_or_data(section: Obj, key: str, suffix: str) -> str | None:
            if section.get(f"{key}-data"):
                return _materialise(str(section[f"{key}-data"]), secrets_dir, suffix)
            if section.get(key):
                return str((base / str(section[key])).resolve())
            return None

        token = user.get("token")
        if not token and user.get("tokenFile"):
            token = (base / str(user["tokenFile"])).read_text().strip()
        return cls(
            server=str(cluster["server"]).rstrip("/"),
            ca_file=file_or_data(cluster, "certificate-authority", ".crt"),
            cert_file=file_or_data(user, "client-certificate", ".crt"),
            key_file=file_or_data(user, "client-key", ".key"),
            token=str(token) if token else None,
            insecure=bool(cluster.get("insecure-skip-tls-verify", False)),
        )


class Kube:
    """Thread-safe API client: one keep-alive connection per calling thread."""

    def __init__(self, config: KubeConfig, timeout: float = 15.0, user_agent: str = "") -> None:
        self.config = config
        self.timeout = timeout
        self.user_agent = user_agent or "pqfed-node-agent"
        parts = urllib.parse.urlsplit(config.server)
        self._https = parts.scheme == "https"
        self._prefix = parts.path.rstrip("/")
        self._ctx: ssl.SSLContext | None = None
        if self._https:
            ctx = ssl.create_default_context(cafile=config.ca_file)
            if config.insecure:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            if config.cert_file and config.key_file:
                ctx.load_cert_chain(config.cert_file, config.key_file)
            self._ctx = ctx
        self._local = threading.local()

    # -- plumbing ---------------------------------------------------------
    def _connect(self, timeout: float | None) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(
                self.config.host, self.config.port, timeout=timeout, context=self._ctx
            )
        return http.client.HTTPConnection(self.config.host, self.config.port, timeout=timeout)

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": self.user_agent}
        if content_type:
            headers["Content-Type"] = content_type
        if self.config.token:
            headers["Authorization"] = f"Bearer {self.config.token}"
        return headers

    def _url(self, path: str, query: Mapping[str, Any] | None) -> str:
        url = self._prefix + path
        if query:
            q = {k: ("true" if v is True else "false" if v is False else v)
                 for k, v in query.items() if v is not None}
            url += "?" + urllib.parse.urlencode(q)
        return url

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str | None = None,
        timeout: float | None = None,
    ) -> Obj:
        """Send one request; return the decoded JSON answer or raise ``ApiError``."""
        url = self._url(path, query)
        data = None if body is None else json.dumps(body).encode()
        if data is not None and content_type is None:
            content_type = "application/json"
        for attempt in (1, 2):
            conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
            fresh = conn is None
            if conn is None:
                conn = self._connect(timeout or self.timeout)
                self._local.conn = conn
            else:
                conn.timeout = timeout or self.timeout
                if conn.sock is not None:
                    conn.sock.settimeout(conn.timeout)
            try:
                conn.request(method, url, body=data, headers=self._headers(content_type))
                resp = conn.getresponse()
                raw = resp.read()
            except (http.client.HTTPException, OSError):
                conn.close()
                self._local.conn = None
                # A kept-alive connection may have been closed by the server: retry once.
                if fresh or attempt == 2:
                    raise
                continue
            if resp.status >= 300:
                raise ApiError(method, path, resp.status, raw.decode(errors="replace"))
            if not raw:
                return {}
            result: Obj = json.loads(raw)
            return result
        raise AssertionError("unreachable")

    # -- verbs ------------------------------------------------------------
    def get(self, path: str, **query: Any) -> Obj:
        return self.request("GET", path, query=query)

    def get_or_none(self, path: str, **query: Any) -> Obj | None:
        try:
            return self.get(path, **query)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def create(self, path: str, body: Obj) -> Obj:
        return self.request("POST", path, body=body)

    def patch(self, path: str, body: Obj, *, strategic: bool = False) -> Obj:
        kind = STRATEGIC_MERGE_PATCH if strategic else MERGE_PATCH
        return self.request("PATCH", path, body=body, content_type=kind)

    def delete(self, path: str, body: Obj | None = None) -> Obj:
        return self.request("DELETE", path, body=body)

    def watch(
        self, path: str, resource_version: str, timeout_seconds: int = 300, **query: Any
    ) -> Iterator[tuple[str, Obj]]:
        """Yield ``(type, object)`` events of a watch from ``resource_version``.

        Ends when the server closes the stream (after ``timeout_seconds``);
        an ``ERROR`` event (e.g. 410 Gone) raises ``ApiError``.
        """
        q = {
            **query,
            "watch": True,
            "resourceVersion": resource_version,
            "allowWatchBookmarks": True,
            "timeoutSeconds": timeout_seconds,
        }
        url = self._url(path, q)
        conn = self._connect(timeout_seconds + 30)
        try:
            conn.request("GET", url, headers=self._headers(None))
            resp = conn.getresponse()
            if resp.status >= 300:
                raise ApiError("WATCH", path, resp.status, resp.read().decode(errors="replace"))
            while True:
                try:
                    line = resp.readline()
                except TimeoutError:
                    return
                if not line:
                    return
                if not line.strip():
                    continue
                event = json.loads(line)
                kind = str(event.get("type"))
                obj: Obj = event.get("object") or {}
                if kind == "ERROR":
                    raise ApiError("WATCH", path, int(obj.get("code") or 500), json.dumps(obj))
                yield kind, obj
        finally:
            conn.close()
