"""Kubernetes client set-up shared by the operator and the CLI."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from pqfed.services.spec import API_GROUP, API_VERSION

PLURAL = "federationjobs"


@dataclass(frozen=True)
class Clients:
    core: Any
    custom: Any
    api: Any


def load_clients(kubeconfig: str | None = None) -> Clients:
    """kubeconfig flag > $KUBECONFIG > in-cluster service account."""
    from kubernetes import client, config

    path = kubeconfig or os.environ.get("KUBECONFIG")
    if path:
        config.load_kube_config(config_file=path)
    else:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
    api = client.ApiClient()
    return Clients(client.CoreV1Api(api), client.CustomObjectsApi(api), api)


def get_job(c: Clients, namespace: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = c.custom.get_namespaced_custom_object(
        API_GROUP, API_VERSION, namespace, PLURAL, name)
    return obj


def list_jobs(c: Clients, namespace: str | None) -> list[dict[str, Any]]:
    if namespace:
        res = c.custom.list_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL)
    else:
        res = c.custom.list_cluster_custom_object(API_GROUP, API_VERSION, PLURAL)
    items: list[dict[str, Any]] = res.get("items", [])
    return items
