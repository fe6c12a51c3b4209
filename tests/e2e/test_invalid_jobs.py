"""Invalid FederationJobs against the real kube-apiserver with the chart's CRD installed: the
structural schema and its CEL rules refuse them before anything runs, naming the field; what
the schema cannot express, the operator reports in status.conditions."""

from __future__ import annotations

import json
from typing import Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

# (spec, field the API server's message must name). Each breaks exactly one rule.
INVALID: dict[str, tuple[dict[str, Any], str]] = {
    "clients-wrong-type": ({"clients": "three"}, "spec.clients"),
    "rounds-wrong-type": ({"rounds": 2.5}, "spec.rounds"),
    "rounds-negative": ({"rounds": -1}, "spec.rounds"),
    "rounds-zero": ({"rounds": 0}, "spec.rounds"),
    "min-clients-above-clients": ({"clients": 3, "minClients": 4}, "spec.minClients"),
    "per-round-above-clients": ({"clients": 3, "clientsPerRound": 4}, "spec.clientsPerRound"),
    "per-round-below-min": ({"clients": 5, "minClients": 3, "clientsPerRound": 2},
                            "spec.clientsPerRound"),
    "unknown-strategy": ({"strategy": {"name": "FedMedian"}}, "spec.strategy.name"),
    "unknown-task": ({"task": "mnist"}, "spec.task"),
    "epsilon-zero": ({"privacy": {"enabled": True, "targetEpsilon": 0}},
                     "spec.privacy.targetEpsilon"),
    "epsilon-negative": ({"privacy": {"enabled": True, "targetEpsilon": -2.0}},
                         "spec.privacy.targetEpsilon"),
    "privacy-mode": ({"privacy": {"mode": "global"}}, "spec.privacy.mode"),
    "node-selector-key": ({"placement": {"nodeSelector": {"bad key!": "x"}}},
                          "spec.placement.nodeSelector"),
    "node-selector-value": ({"placement": {"nodeSelector": {"pqfed.io/ward": "not valid!"}}},
                            "spec.placement.nodeSelector"),
    "aggregator-selector-key": ({"placement": {"aggregatorNodeSelector": {"-x": "y"}}},
                                "spec.placement.aggregatorNodeSelector"),
    "secagg-with-krum": ({"clients": 5, "secureAggregation": {"enabled": True},
                          "strategy": {"name": "Krum"}}, "spec.secureAggregation.enabled"),
    "secagg-threshold": ({"secureAggregation": {"enabled": True, "numShares": 3,
                                                "reconstructionThreshold": 4}},
                         "spec.secureAggregation.reconstructionThreshold"),
    "secagg-shares": ({"clients": 3, "secureAggregation": {"enabled": True, "numShares": 4}},
                      "spec.secureAggregation.numShares"),
    "krum-byzantine": ({"clients": 4, "strategy": {"name": "Krum", "byzantineClients": 1}},
                       "spec.strategy.byzantineClients"),
    "natural-partition-breast-cancer": ({"task": "breast-cancer",
                                         "dataset": {"partition": "natural"}},
                                        "spec.dataset.partition"),
    "dirichlet-zero": ({"dataset": {"partition": "dirichlet:0"}}, "spec.dataset.partition"),
    "hapt-31-clients": ({"task": "hapt", "clients": 31}, "spec.clients"),
    "hierarchy-edges": ({"clients": 3, "hierarchy": {"enabled": True, "edges": 4}},
                        "spec.hierarchy.edges"),
    "hierarchy-central-dp": ({"hierarchy": {"enabled": True},
                              "privacy": {"enabled": True, "mode": "central"}},
                             "spec.privacy.mode"),
    "hierarchy-krum": ({"clients": 10, "hierarchy": {"enabled": True, "edges": 3},
                        "strategy": {"name": "Krum", "byzantineClients": 1}},
                       "spec.strategy.byzantineClients"),
    "learning-rate-zero": ({"training": {"learningRate": 0}}, "spec.training.learningRate"),
    "batch-size-zero": ({"training": {"batchSize": 0}}, "spec.training.batchSize"),
    "kem-unknown": ({"crypto": {"kem": "ML-KEM-512"}}, "spec.crypto.kem"),
    "signature-unknown": ({"crypto": {"signature": "RSA-2048"}}, "spec.crypto.signature"),
    "compression-unknown": ({"compression": {"method": "zip"}}, "spec.compression.method"),
    "round-timeout-too-short": ({"timeouts": {"roundSeconds": 1}}, "spec.timeouts.roundSeconds"),
    "test-fraction-one": ({"dataset": {"testFraction": 1.0}}, "spec.dataset.testFraction"),
    "empty-image": ({"image": ""}, "spec.image"),
}
# Unknown fields: strict field validation (kubectl's default) makes them a decoding error,
# which the API server answers with 400 BadRequest, naming the field.
UNKNOWN_FIELDS: dict[str, tuple[dict[str, Any], str]] = {
    "unknown-top-level-field": ({"bogus": 1}, "spec.bogus"),
    "unknown-nested-field": ({"training": {"epochs": 3}}, "spec.training.epochs"),
}


def _refusal(testbed: Any, name: str, spec: dict[str, Any]) -> tuple[int, str]:
    from kubernetes.client.exceptions import ApiException

    try:
        testbed.create_job(name, spec)
    except ApiException as exc:
        return int(exc.status), str(json.loads(exc.body).get("message", ""))
    testbed.delete_job(name)
    pytest.fail(f"the API server accepted invalid job {name}: {spec}")


def test_api_server_refuses_invalid_jobs_naming_the_field(testbed: Any) -> None:
    assert len(INVALID) + len(UNKNOWN_FIELDS) >= 20
    wrong = []
    for case, (spec, field) in INVALID.items():
        status, message = _refusal(testbed, f"bad-{case}", spec)
        if status != 422 or field not in message:
            wrong.append(f"{case}: {status} {message}")
    for case, (spec, field) in UNKNOWN_FIELDS.items():
        status, message = _refusal(testbed, f"bad-{case}", spec)
        if status not in (400, 422) or field not in message:
            wrong.append(f"{case}: {status} {message}")
    assert not wrong, "\n".join(wrong)


def test_api_server_refuses_an_invalid_job_name(testbed: Any) -> None:
    status, message = _refusal(testbed, "Bad_Name", {})
    assert status == 422 and "metadata.name" in message
    # 53 characters would make "<name>-aggregator" longer than a 63-character Service name.
    status, message = _refusal(testbed, "x" * 53, {})
    assert status == 422 and "metadata.name" in message


def _condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), None)


def test_operator_reports_what_the_schema_cannot_express(testbed: Any) -> None:
    # A node selector no emulated Pi matches: the pods can never be scheduled.
    nowhere = testbed.unique_name("nowhere")
    testbed.create_job(nowhere, {"clients": 2, "placement": {
        "nodeSelector": {"pqfed.io/ward": "no-such-ward"}}})
    # An image reference the CRD accepts (non-empty) but a Pod may not have.
    spaced = testbed.unique_name("spaced")
    testbed.create_job(spaced, {"clients": 2, "image": " pqfed:0.1.0"})
    try:
        def unschedulable() -> dict[str, Any] | None:
            cond = _condition(testbed.status(nowhere), "ClientsReady")
            return cond if cond and cond["reason"] == "Unschedulable" else None

        cond = testbed.wait_for(unschedulable, 90, "ClientsReady=Unschedulable", 1.0,
                                lambda: testbed.diagnose(nowhere))
        assert cond["status"] == "False"
        assert "spec.placement.nodeSelector" in cond["message"]

        st = testbed.wait_phase(spaced, ("Failed",), 60)
        assert "image" in st["message"] and "whitespace" in st["message"]
        complete = _condition(st, "Complete")
        assert complete and complete["reason"] == "ChildRefused"
    finally:
        for name in (nowhere, spaced):
            testbed.delete_job(name)
