"""Materialise pod volumes as host directories that the shim bind-mounts.

secret, configMap, downwardAPI and projected volumes are written like the
kubelet's atomic writer: ``..<timestamp>/`` holds the payload, ``..data`` links
to it and each top-level name links into ``..data``, so updates (resync every
``RESYNC_S``, or token renewal) swap atomically under a running program.
emptyDir is a plain directory, hostPath the host's path itself.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pqfed.testbed.nodeagent.kube import ApiError, Kube, Obj
from pqfed.testbed.nodeagent.podspec import (
    ConfigError,
    RefResolver,
    expand,
    field_value,
    resource_value,
)

DATA = "..data"


def write_atomic(directory: Path, payload: dict[str, tuple[bytes, int]]) -> bool:
    """Make ``directory`` hold exactly ``payload`` (relative path -> (content, mode)).

    Returns False (and touches nothing) when it already does.
    """
    directory.mkdir(parents=True, exist_ok=True)
    current = directory / DATA
    if current.is_dir():
        try:
            same = all(
                (current / rel).read_bytes() == data
                and (os.stat(current / rel).st_mode & 0o7777) == mode
                for rel, (data, mode) in payload.items()
            )
            existing = {
                str(p.relative_to(current)) for p in current.rglob("*") if p.is_file()
            }
            if same and existing == set(payload):
                return False
        except OSError:
            pass
    stamp = directory / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns() % 10**9}"
    stamp.mkdir(mode=0o755)
    for rel, (data, mode) in payload.items():
        if rel.startswith("/") or ".." in Path(rel).parts:
            raise ConfigError(f"invalid volume item path {rel!r}")
        target = stamp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        os.chmod(target, mode)
    old = os.readlink(current) if current.is_symlink() else None
    tmp_link = directory / "..data_tmp"
    if tmp_link.is_symlink():
        tmp_link.unlink()
    tmp_link.symlink_to(stamp.name)
    tmp_link.replace(current)
    tops = {Path(rel).parts[0] for rel in payload}
    for top in tops:
        link = directory / top
        if not link.is_symlink():
            if link.exists():
                shutil.rmtree(link) if link.is_dir() else link.unlink()
            link.symlink_to(f"{DATA}/{top}")
    for entry in directory.iterdir():
        if entry.name.startswith(".."):
            if entry.name not in (DATA, stamp.name) and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
        elif entry.is_symlink() and entry.name not in tops:
            entry.unlink()
    if old and old != stamp.name:
        shutil.rmtree(directory / old, ignore_errors=True)
    return True


@dataclass
class _Token:
    token: str
    expires: float  # time.time()
    renew_at: float


class TokenCache:
    """Service-account tokens bound to the pod, renewed at 80% of their lifetime."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self._tokens: dict[tuple[str, str, str, str, int], _Token] = {}
        self._lock = threading.Lock()

    def get(self, pod: Obj, audience: str, expiration: int) -> str:
        meta = pod["metadata"]
        sa = pod["spec"].get("serviceAccountName") or "default"
        # Tokens are bound to the pod (boundObjectRef): a new pod of the same service account
        # must get its own, or the API server answers 401 once the old pod is gone.
        key = (meta["namespace"], meta["uid"], sa, audience, expiration)
        with self._lock:
            cached = self._tokens.get(key)
            if cached and time.time() < cached.renew_at:
                return cached.token
        spec: dict[str, Any] = {
            "expirationSeconds": expiration,
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": meta["name"],
                               "uid": meta["uid"]},
        }
        if audience:
            spec["audiences"] = [audience]
        try:
            answer = self.kube.create(
                f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{sa}/token",
                {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
            )
        except ApiError as exc:
            raise ConfigError(f"TokenRequest for serviceaccount {sa}: {exc}") from exc
        token = str(answer["status"]["token"])
        now = time.time()
        with self._lock:
            self._tokens[key] = _Token(token, now + expiration, now + 0.8 * expiration)
        return token


class VolumeManager:
    """Materialises the volumes of one pod under ``<pod dir>/volumes``."""

    RESYNC_S = 30.0

    def __init__(
        self, pod_dir: Path, kube: Kube, tokens: TokenCache, node_alloc: dict[str, str]
    ) -> None:
        self.root = pod_dir / "volumes"
        self.kube = kube
        self.tokens = tokens
        self.node_alloc = node_alloc
        self.paths: dict[str, Path] = {}
        self.readonly: set[str] = set()
        self.last_sync = 0.0

    def due(self) -> bool:
        return not self.paths or time.monotonic() - self.last_sync >= self.RESYNC_S

    def sync(self, pod: Obj) -> None:
        """(Re)materialise every volume; raise ConfigError when one cannot be."""
        refs = RefResolver(self.kube, pod["metadata"]["namespace"])
        paths: dict[str, Path] = {}
        for vol in pod["spec"].get("volumes") or []:
            paths[vol["name"]] = self._one(pod, vol, refs)
        self.paths = paths
        self.last_sync = time.monotonic()

    def _items(
        self, data: dict[str, bytes], items: list[Obj] | None, default_mode: int, what: str
    ) -> dict[str, tuple[bytes, int]]:
        if not items:
            return {k: (v, default_mode) for k, v in data.items()}
        out: dict[str, tuple[bytes, int]] = {}
        for item in items:
            if item["key"] not in data:
                raise ConfigError(f"{what}: no key {item['key']!r}")
            out[item["path"]] = (data[item["key"]], int(item.get("mode", default_mode)))
        return out

    def _downward(
        self, pod: Obj, items: list[Obj], default_mode: int
    ) -> dict[str, tuple[bytes, int]]:
        out: dict[str, tuple[bytes, int]] = {}
        for item in items:
            if "fieldRef" in item:
                value = field_value(pod, item["fieldRef"]["fieldPath"])
            else:
                ref = item["resourceFieldRef"]
                value = resource_value(pod, ref.get("containerName", ""), ref, self.node_alloc)
            out[item["path"]] = (value.encode(), int(item.get("mode", default_mode)))
        return out

    def _one(self, pod: Obj, vol: Obj, refs: RefResolver) -> Path:
        name = str(vol["name"])
        target = self.root / name
        if "emptyDir" in vol:
            target.mkdir(parents=True, exist_ok=True)
            return target
        if "hostPath" in vol:
            return self._host_path(vol["hostPath"])
        self.readonly.add(name)
        if "secret" in vol:
            src = vol["secret"]
            data = refs.data("Secret", src["secretName"], bool(src.get("optional")))
            payload = self._items(data, src.get("items"), int(src.get("defaultMode", 0o644)),
                                  f"secret {src['secretName']}")
        elif "configMap" in vol:
            src = vol["configMap"]
            data = refs.data("ConfigMap", src["name"], bool(src.get("optional")))
            payload = self._items(data, src.get("items"), int(src.get("defaultMode", 0o644)),
                                  f"configMap {src['name']}")
        elif "downwardAPI" in vol:
            src = vol["downwardAPI"]
            payload = self._downward(pod, src.get("items") or [],
                                     int(src.get("defaultMode", 0o644)))
        elif "projected" in vol:
            payload = self._projected(pod, vol["projected"], refs)
        else:
            kinds = sorted(k for k in vol if k != "name")
            raise ConfigError(f"volume {name!r}: type {kinds} is not supported by the node agent")
        write_atomic(target, payload)
        return target

    def _projected(self, pod: Obj, src: Obj, refs: RefResolver) -> dict[str, tuple[bytes, int]]:
        mode = int(src.get("defaultMode", 0o644))
        payload: dict[str, tuple[bytes, int]] = {}
        for source in src.get("sources") or []:
            if "secret" in source:
                s = source["secret"]
                data = refs.data("Secret", s["name"], bool(s.get("optional")))
                payload.update(self._items(data, s.get("items"), mode, f"secret {s['name']}"))
            elif "configMap" in source:
                c = source["configMap"]
                data = refs.data("ConfigMap", c["name"], bool(c.get("optional")))
                payload.update(self._items(data, c.get("items"), mode, f"configMap {c['name']}"))
            elif "downwardAPI" in source:
                payload.update(self._downward(pod, source["downwardAPI"].get("items") or [], mode))
            elif "serviceAccountToken" in source:
                t = source["serviceAccountToken"]
                token = self.tokens.get(
                    pod, str(t.get("audience") or ""), int(t.get("expirationSeconds") or 3600))
                payload[t["path"]] = (token.encode(), mode)
            else:
                raise ConfigError(f"projected source {sorted(source)} is not supported")
        return payload

    @staticmethod
    def _host_path(src: Obj) -> Path:
        path = Path(src["path"])
        kind = src.get("type") or ""
        if kind == "DirectoryOrCreate":
            path.mkdir(parents=True, exist_ok=True)
        elif kind == "FileOrCreate" and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        elif kind in ("Directory", "File", "Socket", "CharDevice", "BlockDevice") and \
                not path.exists():
            raise ConfigError(f"hostPath {path} ({kind}) does not exist")
        return path

    def mounts(self, container: Obj, env: dict[str, str]) -> list[dict[str, Any]]:
        """Bind mounts (source, target, readonly) for the container's volumeMounts."""
        result: list[dict[str, Any]] = []
        for vm in container.get("volumeMounts") or []:
            name = vm["name"]
            if name not in self.paths:
                raise ConfigError(f"volumeMount {name!r}: no such volume")
            source = self.paths[name]
            sub = vm.get("subPath") or expand(str(vm.get("subPathExpr") or ""), env)
            if sub:
                if sub.startswith("/") or ".." in Path(sub).parts:
                    raise ConfigError(f"volumeMount {name!r}: invalid subPath {sub!r}")
                source = source / sub
                if not source.exists() and not source.is_symlink():
                    source.mkdir(parents=True, exist_ok=True)
                source = source.resolve()
            result.append({
                "source": str(source),
                "target": str(vm["mountPath"]),
                "readonly": bool(vm.get("readOnly")) or name in self.readonly,
            })
        # Parents before children, as the kubelet orders them.
        result.sort(key=lambda m: len(Path(m["target"]).parts))
        return result

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
