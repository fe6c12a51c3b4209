"""The FederationJob CustomResourceDefinition, generated from the one spec model.

`FederationJobSpec` (pqfed.services.spec) is the single source of truth: its JSON schema is
turned into a *structural* OpenAPI v3.0 schema (every node typed, no $ref/anyOf, `nullable`
for optional fields, OpenAPI 3.0 boolean `exclusiveMinimum`), its defaults become API-server
defaults, every `SpecRule` of `pqfed.services.spec.RULES` becomes a CEL
`x-kubernetes-validations` rule on `spec` (with its `fieldPath`), and CEL rules a field carries
in its JSON schema (the label-key check) stay on that field. So the API server refuses the
same jobs `pqfed run` refuses, with the same messages.

    python -m pqfed.operator.crd --out charts/pqfed/crds/federationjobs.pqfed.io.yaml
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import yaml
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from pqfed.operator.reconcile import MAX_STATUS_ROUNDS
from pqfed.services import (
    API_GROUP,
    API_VERSION,
    KIND,
    NAME_MAX,
    NAME_PATTERN,
    PLURAL,
    RULES,
    FederationJobSpec,
    SpecRule,
)

SINGULAR: Final = "federationjob"
SHORT_NAMES: Final = ("fj",)
CRD_NAME: Final = f"{PLURAL}.{API_GROUP}"
PHASES: Final = ("Pending", "Running", "Succeeded", "Failed", "Cancelled")

def rule_validation(rule: SpecRule) -> dict[str, Any]:
    """A `SpecRule` as the CRD's `x-kubernetes-validations` entry on `spec`."""
    return {"rule": rule.cel, "message": rule.message, "fieldPath": f".{rule.field}",
            "reason": "FieldValueInvalid"}


# metadata.name as `load_job` accepts it (pod names are derived from it). The API server lets
# a CRD restrict metadata.name (and generateName), nothing else in metadata.
_METADATA: Final = {
    "type": "object",
    "properties": {"name": {
        "type": "string", "maxLength": NAME_MAX, "pattern": NAME_PATTERN,
        "description": f"Lowercase letters, digits and '-', at most {NAME_MAX} characters "
                       "(pod names are derived from it)"}},
}

# JSON-schema keys the converter understands; anything else is a spec change it must learn.
_KNOWN_KEYS: Final = frozenset({
    "type", "description", "default", "enum", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "minLength", "maxLength", "pattern", "properties", "required", "items",
    "minItems", "maxItems", "format", "additionalProperties", "anyOf",
    "title", "$ref", "$defs", "maxProperties", "minProperties", "x-kubernetes-validations",
    "nullable",
})


class SchemaConversionError(ValueError):
    """The spec's JSON schema uses something a structural CRD schema cannot express."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path or '(root)'}: {problem}")
        self.path = path


def _inline_refs(node: Any, defs: dict[str, Any], path: str = "") -> Any:
    if isinstance(node, list):
        return [_inline_refs(item, defs, path) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        ref = node["$ref"]
        name = ref.removeprefix("#/$defs/")
        if name == ref or name not in defs:
            raise SchemaConversionError(path, f"unresolvable $ref {ref!r}")
        merged = {**copy.deepcopy(defs[name]), **{k: v for k, v in node.items() if k != "$ref"}}
        return _inline_refs(merged, defs, path)
    return {k: _inline_refs(v, defs, f"{path}.{k}") for k, v in node.items() if k != "$defs"}


def _apply_factory_defaults(node: dict[str, Any], model: type[BaseModel]) -> None:
    """pydantic leaves `default_factory` defaults out of the JSON schema. A nested model gets
    `default: {}` so the API server creates it and then fills in its own field defaults."""
    for name, field in model.model_fields.items():
        prop = node["properties"][field.alias or name]
        annotation = field.annotation
        nested = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if field.default_factory is not None and "default" not in prop:
            value = field.default_factory()  # type: ignore[call-arg]
            prop["default"] = {} if isinstance(value, BaseModel) else to_jsonable_python(value)
        if nested:
            _apply_factory_defaults(prop, annotation)  # type: ignore[arg-type]


def _structural(node: dict[str, Any], path: str) -> dict[str, Any]:
    """One JSON-schema node (refs already inlined) -> one structural OpenAPI v3.0 node."""
    unknown = set(node) - _KNOWN_KEYS
    if unknown:
        raise SchemaConversionError(path, f"unsupported JSON-schema keys {sorted(unknown)}")
    node = dict(node)
    nullable = bool(node.get("nullable"))
    if "anyOf" in node:
        options = node.pop("anyOf")
        variants = [v for v in options if v.get("type") != "null"]
        if len(variants) != 1 or len(options) != 2:
            raise SchemaConversionError(path, "anyOf is only supported as Optional[X]")
        nullable = True
        node = {**variants[0], **node}
    if "type" not in node:
        raise SchemaConversionError(path, "node has no type")

    out: dict[str, Any] = {"type": node["type"]}
    if "description" in node:
        out["description"] = " ".join(node["description"].split())  # docstrings: one line
    if "format" in node:
        out["format"] = node["format"]
    if "enum" in node:
        out["enum"] = list(node["enum"])
    if node.get("default") is not None:
        # An absent field is the API server's null; `default: null` is not allowed.
        out["default"] = copy.deepcopy(node["default"])
    # JSON Schema 2020-12 numbers -> OpenAPI 3.0 (what Kubernetes speaks): boolean flags.
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if exclusive in node:
            out[bound] = node[exclusive]
            out[exclusive] = True
        elif bound in node:
            out[bound] = node[bound]
    for key in ("minLength", "maxLength", "pattern", "minItems", "maxItems", "minProperties",
                "maxProperties", "required", "x-kubernetes-validations"):
        if key in node:
            out[key] = copy.deepcopy(node[key])
    if nullable:
        out["nullable"] = True

    if node["type"] == "object":
        if "properties" in node:
            out["properties"] = {
                name: _structural(child, f"{path}.{name}")
                for name, child in node["properties"].items()
            }
        elif isinstance(node.get("additionalProperties"), dict):
            # A map. Key checks are CEL rules the field carries (x-kubernetes-validations);
            # a key `pattern` would come as patternProperties, which Kubernetes lacks.
            out["additionalProperties"] = _structural(node["additionalProperties"],
                                                      f"{path}[*]")
        else:
            out["additionalProperties"] = {"type": "string"}
        # `additionalProperties: false` (extra="forbid") is implicit: the API server prunes
        # unknown fields and `kubectl --validate=strict` reports them.
    elif node["type"] == "array":
        if "items" not in node:
            raise SchemaConversionError(path, "array without items")
        out["items"] = _structural(node["items"], f"{path}[]")
    return out


def spec_schema() -> dict[str, Any]:
    """The structural schema of `.spec`, with defaults and the cross-field CEL rules."""
    raw = FederationJobSpec.model_json_schema(by_alias=True)
    defs = raw.get("$defs", {})
    inlined = _inline_refs(raw, defs)
    _apply_factory_defaults(inlined, FederationJobSpec)
    schema = _structural(inlined, "spec")
    schema["description"] = (
        "What to train, on how many clients, with which aggregation, privacy and "
        "post-quantum crypto settings. Same shape as a `pqfed run` job file.")
    # A job without `spec` is the all-defaults job, as for `pqfed run`. The full default
    # (not `{}`) because the API server checks the CEL rules against the default as written.
    schema["default"] = FederationJobSpec().model_dump(mode="json", by_alias=True,
                                                       exclude_none=True)
    schema["x-kubernetes-validations"] = [rule_validation(r) for r in RULES]
    return schema


def _condition_schema() -> dict[str, Any]:
    """metav1.Condition, as controller-gen emits it."""
    return {
        "type": "object",
        "description": "Standard Kubernetes condition (metav1.Condition).",
        "required": ["type", "status", "lastTransitionTime", "reason", "message"],
        "properties": {
            "type": {"type": "string", "maxLength": 316,
                     "description": "Condition type in CamelCase (Valid, AggregatorReady, "
                                    "ClientsReady, RoundProgress, Complete, ...)",
                     "pattern": r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*"
                                r"[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"],
                       "description": "True, False or Unknown"},
            "reason": {"type": "string", "minLength": 1, "maxLength": 1024,
                       "description": "Why the condition last changed, in CamelCase",
                       "pattern": r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"},
            "message": {"type": "string", "maxLength": 32768,
                        "description": "Human-readable details of the change"},
            "lastTransitionTime": {"type": "string", "format": "date-time",
                                   "description": "When the status last changed"},
            "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0,
                                   "description": "metadata.generation the condition was "
                                                  "set for"},
        },
    }


def _round_schema() -> dict[str, Any]:
    def num(description: str) -> dict[str, Any]:
        return {"type": "number", "description": description}

    return {
        "type": "object",
        "description": "One finished round (a RoundRecord).",
        "required": ["round"],
        "properties": {
            "round": {"type": "integer", "minimum": 1,
                      "description": "Round number, from 1"},
            "accuracy": num("Global model accuracy on the held-out data after the round"),
            "loss": num("Global model loss after the round"),
            "bytesSent": {"type": "integer", "minimum": 0,
                          "description": "Bytes the aggregator sent this round"},
            "bytesReceived": {"type": "integer", "minimum": 0,
                              "description": "Bytes the aggregator received this round"},
            "cryptoSeconds": num("Time spent in PQC handshakes, signing and AEAD"),
            "durationSeconds": num("Wall time of the round"),
            "participants": {"type": "array", "items": {"type": "string"},
                             "description": "Clients whose updates were aggregated"},
            "rejectedUpdates": {"type": "integer", "minimum": 0,
                                "description": "Updates refused (bad signature, late, "
                                               "filtered by a robust strategy)"},
            "completedAt": {"type": "string", "format": "date-time",
                            "description": "When the aggregator finished the round"},
        },
    }


def status_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "Observed state, written by the operator only.",
        "properties": {
            "phase": {"type": "string", "enum": list(PHASES),
                      "description": "Pending, Running, then Succeeded, Failed or Cancelled "
                                     "(final)"},
            "currentRound": {"type": "integer", "minimum": 0,
                             "description": "Latest round the aggregator reported (0 before "
                                            "the first)"},
            "totalRounds": {"type": "integer", "minimum": 0,
                            "description": "Rounds the job runs (spec.rounds)"},
            "accuracy": {"type": "number", "description": "Accuracy after the latest round"},
            "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0,
                                   "description": "metadata.generation the status was "
                                                  "written for"},
            "startTime": {"type": "string", "format": "date-time",
                          "description": "When the operator started the job"},
            "completionTime": {"type": "string", "format": "date-time",
                               "description": "When the job reached a final phase"},
            "message": {"type": "string", "description": "Human-readable state or error"},
            "channelProtocol": {"type": "string", "enum": ["pqfed1", "tls13"],
                                "description": "The channel protocol the job started with "
                                               "(spec.channel.protocol after the operator's "
                                               "defaults); kept for the job's whole life"},
            "auditHead": {"type": "string",
                          "description": "Hash at the head of the signed audit log"},
            "rounds": {"type": "array", "x-kubernetes-list-type": "atomic",
                       "description": "Finished rounds, oldest first (at most the latest "
                                      f"{MAX_STATUS_ROUNDS})",
                       "items": _round_schema()},
            "conditions": {"type": "array", "x-kubernetes-list-type": "map",
                           "x-kubernetes-list-map-keys": ["type"],
                           "description": "The job's conditions, one per type",
                           "items": _condition_schema()},
        },
    }


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition `federationjobs.pqfed.io`, as a plain dict."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "pqfed", "app.kubernetes.io/part-of": "pqfed"},
        },
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL,
                      "singular": SINGULAR, "shortNames": list(SHORT_NAMES)},
            "versions": [{
                "name": API_VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                    {"name": "Round", "type": "integer", "jsonPath": ".status.currentRound"},
                    {"name": "Rounds", "type": "integer", "jsonPath": ".spec.rounds"},
                    {"name": "Accuracy", "type": "number", "jsonPath": ".status.accuracy"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "A federated-learning job run by the pqfed operator.",
                    "properties": {
                        "apiVersion": {"type": "string",
                                       "description": f"{API_GROUP}/{API_VERSION}"},
                        "kind": {"type": "string", "description": KIND},
                        "metadata": copy.deepcopy(_METADATA),
                        "spec": spec_schema(),
                        "status": status_schema(),
                    },
                }},
            }],
        },
    }


_HEADER: Final = ("# Generated by `python -m pqfed.operator.crd` from "
                  "pqfed.services.spec.FederationJobSpec.\n# Do not edit: change the spec "
                  "model and regenerate (tests/operator/test_crd.py checks it).\n")


def render_crd() -> str:
    return _HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=100)


def write_crd(path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_crd())
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pqfed.operator.crd",
                                     description="Write the FederationJob CRD as YAML.")
    parser.add_argument("--out", metavar="FILE", help="write here instead of stdout")
    args = parser.parse_args(argv)
    if args.out:
        print(f"wrote {write_crd(args.out)}", file=sys.stderr)
    else:
        sys.stdout.write(render_crd())
    return 0


if __name__ == "__main__":
    sys.exit(main())
