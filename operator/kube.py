"""Kubernetes client set-up shared by the operator and the CLI."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from pqfed.services import API_GROUP, API_VERSION, PLURAL


@dataclass(frozen=True)
class Clients:
    core: Any
    custom: Any
    api: Any


def load_configuration(kubeconfig: str | None = None, configuration: Any = None) -> None:
    """The one kubeconfig precedence of the operator and the CLI: the --kubeconfig flag >
    $KUBECONFIG > the in-cluster service account > ~/.kube/config. Loads into `configuration`
    (a kubernetes.client.Configuration), or the client's default one when None."""
    from kubernetes import config

    path = kubeconfig or os.environ.get("KUBECONFIG")
    if path:
        config.load_kube_config(config_file=path, client_configuration=configuration)
    else:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)


def load_clients(kubeconfig: str | None = None) -> Clients:
    """The API clients for the kubeconfig `load_configuration` picks."""
    from kubernetes import client

    load_configuration(kubeconfig)
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
