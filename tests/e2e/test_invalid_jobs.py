"""What the CRD cannot refuse, against the whole testbed: the operator checks the rules listed in
`pqfed.services.spec.OPERATOR_ONLY` and reports them in status.conditions with the field and
the reason the API server could not check them.

The invalid jobs the API server does refuse are one table, tests/data/invalid_jobs.yaml, run
against a private kube-apiserver and `pqfed run` alike (tests/services/test_invalid_jobs.py).
"""

from __future__ import annotations

from typing import Any

import pytest

from pqfed.services.spec import OPERATOR_ONLY

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def _condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), None)


def test_operator_reports_what_the_schema_cannot_express(testbed: Any) -> None:
    # A node selector no emulated Pi matches: the pods can never be scheduled.
    nowhere = testbed.unique_name("nowhere")
    testbed.create_job(nowhere, {"clients": 2, "placement": {
        "nodeSelector": {"pqfed.io/ward": "no-such-ward"}}})
    rule = next(r for r in OPERATOR_ONLY if r.name == "client-nodes-exist")
    try:
        def unschedulable() -> dict[str, Any] | None:
            cond = _condition(testbed.status(nowhere), rule.condition)
            return cond if cond and cond["reason"] == rule.reason else None

        cond = testbed.wait_for(unschedulable, 90, f"{rule.condition}={rule.reason}", 1.0,
                                lambda: testbed.diagnose(nowhere))
        assert cond["status"] == "False"
        assert f"spec.{rule.field}" in cond["message"]
        assert rule.why_not_cel in cond["message"]
    finally:
        testbed.delete_job(nowhere)
