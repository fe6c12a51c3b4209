"""Pod spec helpers: downward API fields, env resolution, ``$(VAR)`` expansion."""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from pqfed.testbed.nodeagent.config import parse_quantity
from pqfed.testbed.nodeagent.kube import ApiError, Kube, Obj


class ConfigError(Exception):
    """The pod refers to something missing (kubelet: CreateContainerConfigError)."""


def pod_path(ns: str, name: str = "", sub: str = "") -> str:
    path = f"/api/v1/namespaces/{ns}/pods"
    if name:
        path += f"/{name}"
    if sub:
        path += f"/{sub}"
    return path


def _subscript(path: str, prefix: str) -> str | None:
    match = re.fullmatch(re.escape(prefix) + r"\[['\"](.+)['\"]\]", path)
    return match.group(1) if match else None


def field_value(pod: Obj, field_path: str) -> str:
    """Value of a downward-API ``fieldRef.fieldPath``."""
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    simple: dict[str, Callable[[], Any]] = {
        "metadata.name": lambda: meta.get("name"),
        "metadata.namespace": lambda: meta.get("namespace"),
        "metadata.uid": lambda: meta.get("uid"),
        "spec.nodeName": lambda: spec.get("nodeName"),
        "spec.serviceAccountName": lambda: spec.get("serviceAccountName"),
        "status.podIP": lambda: status.get("podIP"),
        "status.podIPs": lambda: ",".join(i["ip"] for i in status.get("podIPs") or []),
        "status.hostIP": lambda: status.get("hostIP"),
        "status.hostIPs": lambda: ",".join(i["ip"] for i in status.get("hostIPs") or []),
    }
    if field_path in simple:
        return str(simple[field_path]() or "")
    if field_path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(field_path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    for kind in ("labels", "annotations"):
        key = _subscript(field_path, f"metadata.{kind}")
        if key is not None:
            return str((meta.get(kind) or {}).get(key, ""))
    raise ConfigError(f"unsupported fieldRef.fieldPath {field_path!r}")


def resource_value(pod: Obj, container_name: str, ref: Obj, node_alloc: Mapping[str, str]) -> str:
    """Value of a ``resourceFieldRef`` (limits default to the node's allocatable)."""
    name = ref.get("containerName") or container_name
    containers = [*(pod["spec"].get("initContainers") or []), *pod["spec"]["containers"]]
    ctr = next((c for c in containers if c["name"] == name), None)
    if ctr is None:
        raise ConfigError(f"resourceFieldRef: no container {name!r}")
    kind, _, res = str(ref["resource"]).partition(".")
    resources = ctr.get("resources") or {}
    value = (resources.get(kind) or {}).get(res)
    if value is None and kind == "requests":
        value = (resources.get("limits") or {}).get(res)
    if value is None:
        value = node_alloc.get(res, "0")
    divisor = parse_quantity(str(ref.get("divisor") or "1"))
    return str(math.ceil(parse_quantity(str(value)) / divisor))


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: known vars substituted, ``$$`` -> ``$``, rest kept."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("$(", i):
            end = text.find(")", i + 2)
            name = text[i + 2:end] if end != -1 else ""
            if end != -1 and name in env:
                out.append(env[name])
                i = end + 1
            elif end != -1:
                out.append(text[i:end + 1])
                i = end + 1
            else:
                out.append(text[i:])
                break
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


class RefResolver:
    """Reads Secrets and ConfigMaps (node credentials: only those the pod uses)."""

    def __init__(self, kube: Kube, namespace: str) -> None:
        self.kube = kube
        self.namespace = namespace
        self._cache: dict[tuple[str, str], Obj | None] = {}

    def object(self, kind: str, name: str, optional: bool = False) -> Obj | None:
        key = (kind, name)
        if key not in self._cache:
            resource = "secrets" if kind == "Secret" else "configmaps"
            try:
                self._cache[key] = self.kube.get_or_none(
                    f"/api/v1/namespaces/{self.namespace}/{resource}/{name}")
            except ApiError as exc:
                raise ConfigError(f"cannot read {kind} {self.namespace}/{name}: {exc}") from exc
        obj = self._cache[key]
        if obj is None and not optional:
            raise ConfigError(f'{kind.lower()} "{name}" not found')
        return obj

    def data(self, kind: str, name: str, optional: bool = False) -> dict[str, bytes]:
        """All keys of a Secret or ConfigMap as bytes ({} when optional and missing)."""
        obj = self.object(kind, name, optional)
        if obj is None:
            return {}
        result: dict[str, bytes] = {}
        if kind == "Secret":
            for k, v in (obj.get("data") or {}).items():
                result[k] = base64.b64decode(v)
        else:
            for k, v in (obj.get("data") or {}).items():
                result[k] = str(v).encode()
            for k, v in (obj.get("binaryData") or {}).items():
                result[k] = base64.b64decode(v)
        return result

    def key(self, kind: str, ref: Obj) -> str | None:
        optional = bool(ref.get("optional"))
        data = self.data(kind, str(ref.get("name", "")), optional)
        if ref["key"] not in data:
            if optional:
                return None
            raise ConfigError(f"couldn't find key {ref['key']} in {kind} "
                              f"{self.namespace}/{ref.get('name')}")
        return data[ref["key"]].decode(errors="replace")


def container_env(
    pod: Obj,
    container: Obj,
    base: Mapping[str, str],
    refs: RefResolver,
    node_alloc: Mapping[str, str],
) -> dict[str, str]:
    """The process environment: ``base``, then envFrom, then env (with ``$(VAR)`` expansion)."""
    env = dict(base)
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix") or ""
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if key in source:
                ref = source[key]
                for k, v in refs.data(kind, ref["name"], bool(ref.get("optional"))).items():
                    env[prefix + k] = v.decode(errors="replace")
    for var in container.get("env") or []:
        name = var["name"]
        if "valueFrom" not in var:
            env[name] = expand(str(var.get("value") or ""), env)
            continue
        src = var["valueFrom"]
        value: str | None
        if "fieldRef" in src:
            value = field_value(pod, src["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in src:
            value = resource_value(pod, container["name"], src["resourceFieldRef"], node_alloc)
        elif "secretKeyRef" in src:
            value = refs.key("Secret", src["secretKeyRef"])
        elif "configMapKeyRef" in src:
            value = refs.key("ConfigMap", src["configMapKeyRef"])
        else:
            raise ConfigError(f"env {name}: unsupported valueFrom {sorted(src)}")
        if value is not None:
            env[name] = value
    return env


def container_argv(container: Obj, env: Mapping[str, str]) -> list[str]:
    """command + args with ``$(VAR)`` expanded; args alone when command is empty."""
    argv = [*(container.get("command") or []), *(container.get("args") or [])]
    return [expand(str(a), env) for a in argv]


def all_containers(pod: Obj) -> list[Obj]:
    return [*(pod["spec"].get("initContainers") or []), *pod["spec"]["containers"]]
