"""The FederationJob CRD generated from FederationJobSpec: structural, defaulted, every Literal
an enum, every validator of the model mirrored by a CEL rule or listed as operator-only, and
the committed chart copy up to date.

Whether a real kube-apiserver accepts the CRD and rejects invalid jobs is an e2e test against
the testbed control plane; here everything is offline and fast.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    PlainValidator,
    WrapValidator,
    model_validator,
)

from pqfed.operator import crd
from pqfed.services import spec as spec_module
from pqfed.services.spec import FederationJobSpec, JobSpecError, parse_spec

REPO = Path(__file__).resolve().parents[2]
CHART_CRD = REPO / "charts" / "pqfed" / "crds" / "federationjobs.pqfed.io.yaml"

# The one table of invalid jobs (also run against the API server and `pqfed run`); the cases
# that name a rule break exactly that rule.
TABLE: list[dict[str, Any]] = yaml.safe_load(
    (REPO / "tests" / "data" / "invalid_jobs.yaml").read_text())
RULE_CASES: dict[str, dict[str, Any]] = {}
for _case in TABLE:
    if "rule" in _case:
        RULE_CASES.setdefault(_case["rule"], yaml.safe_load("{" + _case["spec"] + "}"))


@pytest.fixture(scope="module")
def built() -> dict[str, Any]:
    return crd.build_crd()


@pytest.fixture(scope="module")
def version(built: dict[str, Any]) -> dict[str, Any]:
    (only,) = built["spec"]["versions"]
    return typing.cast(dict[str, Any], only)


@pytest.fixture(scope="module")
def spec_schema(version: dict[str, Any]) -> dict[str, Any]:
    return typing.cast(dict[str, Any], version["schema"]["openAPIV3Schema"]["properties"]["spec"])


def _nodes(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its path."""
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from _nodes(child, f"{path}.{name}")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _nodes(schema["additionalProperties"], f"{path}[*]")
    if "items" in schema:
        yield from _nodes(schema["items"], f"{path}[]")


def _walk_keys(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from _walk_keys(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk_keys(item)


def _models(model: type[BaseModel], path: str = "") -> Iterator[tuple[str, type[BaseModel]]]:
    yield path, model
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _models(ann, f"{path}.{field.alias or name}")


def _at(schema: dict[str, Any], path: str) -> dict[str, Any]:
    for part in filter(None, path.split(".")):
        schema = schema["properties"][part]
    return schema


# --- identity -------------------------------------------------------------------------------

def test_names_group_version_scope(built: dict[str, Any], version: dict[str, Any]) -> None:
    assert built["apiVersion"] == "apiextensions.k8s.io/v1"
    assert built["metadata"]["name"] == "federationjobs.pqfed.io"
    spec = built["spec"]
    assert spec["group"] == "pqfed.io"
    assert spec["scope"] == "Namespaced"
    names = spec["names"]
    assert (names["kind"], names["plural"], names["singular"], names["shortNames"]) == (
        "FederationJob", "federationjobs", "federationjob", ["fj"])
    assert version["name"] == "v1alpha1"
    assert version["served"] is True and version["storage"] is True
    assert version["subresources"] == {"status": {}}


def test_printer_columns(version: dict[str, Any]) -> None:
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert list(columns) == ["Phase", "Round", "Rounds", "Accuracy", "Age"]
    assert columns["Round"]["jsonPath"] == ".status.currentRound"
    assert columns["Age"]["type"] == "date"


# --- structural schema ----------------------------------------------------------------------

def test_schema_is_structural(version: dict[str, Any]) -> None:
    root = version["schema"]["openAPIV3Schema"]
    banned = {"$ref", "$defs", "anyOf", "allOf", "oneOf", "not", "title", "patternProperties",
              "const", "definitions"}
    assert not banned & set(_walk_keys(root))
    for path, node in _nodes(root):
        assert "type" in node, f"{path or '(root)'} has no type"
        assert node["type"] in {"object", "array", "string", "integer", "number", "boolean"}
        if node["type"] == "object":
            assert not ("properties" in node and "additionalProperties" in node), path
            assert node.get("additionalProperties") is not False, path
        if node["type"] == "array":
            assert "items" in node, path
        for flag in ("exclusiveMinimum", "exclusiveMaximum"):
            if flag in node:  # OpenAPI 3.0: a boolean next to minimum/maximum
                assert node[flag] is True
                assert flag.replace("exclusiveM", "m") in node, path


def test_optional_fields_are_nullable_without_default(spec_schema: dict[str, Any]) -> None:
    per_round = FederationJobSpec.model_fields["clients_per_round"].description
    assert spec_schema["properties"]["clientsPerRound"] == {
        "type": "integer", "description": per_round, "minimum": 1, "maximum": 1000,
        "nullable": True}
    epsilon = spec_schema["properties"]["privacy"]["properties"]["targetEpsilon"]
    assert epsilon["nullable"] is True and "default" not in epsilon
    assert epsilon["exclusiveMinimum"] is True and epsilon["minimum"] == 0


def test_maps_are_string_maps_with_key_rule(spec_schema: dict[str, Any]) -> None:
    for name in ("nodeSelector", "aggregatorNodeSelector"):
        node = spec_schema["properties"]["placement"]["properties"][name]
        assert node["type"] == "object"
        assert node["additionalProperties"]["type"] == "string"
        assert node["default"] == {}
        assert node["maxProperties"] == spec_module.MAX_SELECTOR_LABELS
        assert node["additionalProperties"]["pattern"] == spec_module.LABEL_VALUE_PATTERN
        assert node["additionalProperties"]["maxLength"] == 63
        keys, nulls = node["x-kubernetes-validations"]
        assert keys["rule"] == spec_module.LABEL_KEY_CEL
        # null values are kept (not pruned, which would drop the constraint) and refused
        assert node["additionalProperties"]["nullable"] is True
        assert nulls["rule"] == spec_module.LABEL_VALUE_NOT_NULL_CEL


def test_exclusive_bounds_follow_pydantic(spec_schema: dict[str, Any]) -> None:
    fraction = spec_schema["properties"]["dataset"]["properties"]["testFraction"]
    assert fraction == {
        "type": "number", "description": fraction["description"], "default": 0.2,
        "minimum": 0, "exclusiveMinimum": True, "maximum": 1, "exclusiveMaximum": True}


# --- defaults and enums ---------------------------------------------------------------------

def test_every_pydantic_default_is_an_api_server_default(spec_schema: dict[str, Any]) -> None:
    checked = 0
    for path, model in _models(FederationJobSpec):
        node = _at(spec_schema, path)
        for name, field in model.model_fields.items():
            prop = node["properties"][field.alias or name]
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                assert prop["default"] == {}, f"{path}.{name}: nested model defaults to {{}}"
            elif field.default_factory is not None:
                assert prop["default"] == field.default_factory()  # type: ignore[call-arg]
            elif field.default is None:
                assert "default" not in prop and prop.get("nullable") is True
            else:
                assert prop["default"] == field.default, f"{path}.{field.alias}"
            checked += 1
    assert checked > 40


def test_spec_default_is_the_default_job(spec_schema: dict[str, Any]) -> None:
    assert parse_spec(spec_schema["default"]) == FederationJobSpec()


def test_every_literal_is_an_enum(spec_schema: dict[str, Any]) -> None:
    seen = 0
    for path, model in _models(FederationJobSpec):
        node = _at(spec_schema, path)
        for name, field in model.model_fields.items():
            if typing.get_origin(field.annotation) is typing.Literal:
                prop = node["properties"][field.alias or name]
                assert prop["enum"] == list(typing.get_args(field.annotation)), name
                seen += 1
    assert seen >= 9  # task, strategy.name, privacy.mode, compression.method, 5 in crypto


# --- every validator mirrored: CEL rule or operator-only ------------------------------------

_VALIDATOR_TYPES = (AfterValidator, BeforeValidator, PlainValidator, WrapValidator)


def _annotated_validators(annotation: Any) -> Iterator[Any]:
    """Validator functions hidden in Annotated[...] metadata, also inside dict[K, V] etc."""
    if typing.get_origin(annotation) is typing.Annotated:
        for meta in annotation.__metadata__:
            if isinstance(meta, _VALIDATOR_TYPES):
                yield meta.func
    for arg in typing.get_args(annotation):
        if not isinstance(arg, str | int | float | bool | type(None)):
            yield from _annotated_validators(arg)


def unmirrored_validators(root: type[BaseModel]) -> list[str]:
    """Every validator of `root` and its nested models that neither spec.VALIDATOR_MIRRORS nor
    spec.OPERATOR_ONLY accounts for."""
    accounted = set(spec_module.VALIDATOR_MIRRORS) | {r.name for r in spec_module.OPERATOR_ONLY}
    found: set[str] = set()
    for _, model in _models(root):
        decorators = model.__pydantic_decorators__
        for group in (decorators.model_validators, decorators.field_validators,
                      decorators.root_validators, decorators.validators):
            found |= {f"{model.__name__}.{name}" for name in group}
        for field in model.model_fields.values():
            found |= {f.__name__ for f in _annotated_validators(field.annotation)}
            found |= {f.__name__ for m in field.metadata if isinstance(m, _VALIDATOR_TYPES)
                      for f in [m.func]}
    return sorted(found - accounted)


def test_every_validator_has_a_cel_rule_or_an_operator_only_entry(
        spec_schema: dict[str, Any]) -> None:
    assert unmirrored_validators(FederationJobSpec) == [], (
        "add a CEL rule (spec.RULES, or x-kubernetes-validations on the field) and list it in "
        "spec.VALIDATOR_MIRRORS, or list the rule in spec.OPERATOR_ONLY with why_not_cel")
    rule_names = {r.name for r in spec_module.RULES}
    for validator, mirrors in spec_module.VALIDATOR_MIRRORS.items():
        assert mirrors, validator
        for mirror in mirrors:
            if mirror.startswith("cel:"):
                node = _at(spec_schema, mirror.removeprefix("cel:"))
                assert node.get("x-kubernetes-validations"), f"{validator}: {mirror}"
            else:
                assert mirror in rule_names, f"{validator}: unknown rule {mirror}"
    # The model validator evaluates every rule, so every rule must be its mirror.
    assert set(spec_module.VALIDATOR_MIRRORS["FederationJobSpec._cross_field"]) == rule_names


def test_the_walk_finds_an_unmirrored_validator() -> None:
    class Sneaky(BaseModel):
        x: typing.Annotated[int, AfterValidator(lambda v: v)] = 0

        @model_validator(mode="after")
        def _secret_rule(self) -> Sneaky:
            return self

    class Outer(BaseModel):
        inner: Sneaky = Sneaky()
        labels: dict[typing.Annotated[str, AfterValidator(str.strip)], str] = {}

    assert unmirrored_validators(Outer) == ["<lambda>", "Sneaky._secret_rule", "strip"]


def test_operator_only_rules_say_why_and_where() -> None:
    for rule in spec_module.OPERATOR_ONLY:
        assert _at(crd.spec_schema(), rule.field) is not None, rule.name
        assert "CEL" in rule.why_not_cel or "admission" in rule.why_not_cel, rule.name
        assert rule.condition in {"ClientsReady", "AggregatorReady", "Valid", "Complete"}
        assert re.fullmatch(r"[A-Z][A-Za-z]+", rule.reason)


# --- CEL rules mirror the spec's RULES -----------------------------------------------------

def test_one_cel_rule_per_spec_rule(spec_schema: dict[str, Any]) -> None:
    assert spec_schema["x-kubernetes-validations"] == [
        crd.rule_validation(r) for r in spec_module.RULES]
    names = [r.name for r in spec_module.RULES]
    assert len(names) == len(set(names))
    assert set(RULE_CASES) == set(names), "every rule needs a case in tests/data/invalid_jobs.yaml"


@pytest.mark.parametrize("rule", spec_module.RULES, ids=lambda r: r.name)
def test_rule_matches_pydantic_field(rule: spec_module.SpecRule,
                                     spec_schema: dict[str, Any]) -> None:
    _at(spec_schema, rule.field)  # fieldPath must exist in the schema (the API server checks it)
    assert rule.holds(FederationJobSpec())
    # The pydantic rule on the same input reports the same field as the CEL fieldPath.
    with pytest.raises(JobSpecError) as exc:
        parse_spec(RULE_CASES[rule.name])
    assert exc.value.problems.get(f"spec.{rule.field}") == rule.message
    # Messages name the field and say how to fix it.
    assert rule.field.split(".")[-1] in rule.message
    assert re.search(r"\b(use|lower|raise|add|disable|remove|set)\b", rule.message)
    # Static text: the API server refuses messageExpressions that print numbers.
    assert "{" not in rule.message


def test_cel_arithmetic_cannot_overflow_or_divide_by_zero() -> None:
    for rule in spec_module.RULES:
        # Products and sums of unbounded fields could overflow int64 before the bound that
        # refuses them is reported; divisions must be guarded against a zero divisor.
        assert "2 *" not in rule.cel and "* 2" not in rule.cel, rule.name
        if " / self.hierarchy.edges" in rule.cel:
            assert "self.hierarchy.edges < 1 ||" in rule.cel, rule.name


def test_status_schema(version: dict[str, Any]) -> None:
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert status["phase"]["enum"] == ["Pending", "Running", "Succeeded", "Failed", "Cancelled"]
    for name in ("currentRound", "totalRounds", "accuracy", "observedGeneration", "startTime",
                 "completionTime", "message", "auditHead"):
        assert name in status
    round_ = status["rounds"]["items"]["properties"]
    assert set(round_) == {"round", "accuracy", "loss", "bytesSent", "bytesReceived",
                           "cryptoSeconds", "durationSeconds", "participants",
                           "rejectedUpdates", "completedAt"}
    assert round_["participants"] == {"type": "array", "items": {"type": "string"},
                                      "description": round_["participants"]["description"]}
    conditions = status["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    item = conditions["items"]
    assert "type" in item["required"]
    assert set(item["properties"]) == {"type", "status", "reason", "message",
                                       "lastTransitionTime", "observedGeneration"}


# The API server refuses anything on `metadata` but its type and name/generateName (a
# description too); `kubectl explain` documents ObjectMeta itself.
_UNDESCRIBABLE: Final = frozenset({".metadata"})


def _undescribed(schema: dict[str, Any]) -> list[str]:
    """Paths of the properties (at any depth, inside arrays and maps too) with no description."""
    return [path for path, node in _nodes(schema)
            if path and not path.endswith(("[]", "[*]")) and path not in _UNDESCRIBABLE
            and not str(node.get("description") or "").strip()]


def test_every_property_is_described(version: dict[str, Any]) -> None:
    """As cert-manager's CRDs: `kubectl explain federationjob.spec...` documents every field."""
    root = version["schema"]["openAPIV3Schema"]
    assert root["description"]
    missing = _undescribed(root)
    assert not missing, f"add a description (the pydantic Field's, or crd.py's): {missing}"


def test_the_description_check_finds_a_missing_one() -> None:
    schema = {"type": "object", "description": "x", "properties": {
        "a": {"type": "object", "description": "a", "properties": {
            "b": {"type": "array", "description": "b", "items": {
                "type": "object", "properties": {"c": {"type": "string"}}}}}},
        "d": {"type": "object", "description": " ", "additionalProperties": {
            "type": "object", "properties": {"e": {"type": "integer", "description": "e"}}}}}}
    assert _undescribed(schema) == [".a.b[].c", ".d"]


# --- generated file -------------------------------------------------------------------------

def test_committed_chart_crd_is_current(built: dict[str, Any]) -> None:
    hint = "regenerate: python -m pqfed.operator.crd --out " + str(CHART_CRD.relative_to(REPO))
    assert CHART_CRD.is_file(), hint
    text = CHART_CRD.read_text()
    assert yaml.safe_load(text) == built, hint
    assert text == crd.render_crd(), hint


def test_cli_writes_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "crd.yaml"
    assert crd.main(["--out", str(out)]) == 0
    assert yaml.safe_load(out.read_text()) == crd.build_crd()
    assert crd.main([]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == crd.build_crd()


def test_unsupported_schema_is_refused() -> None:
    with pytest.raises(crd.SchemaConversionError, match="anyOf"):
        crd._structural({"anyOf": [{"type": "integer"}, {"type": "string"}]}, "spec.x")
    with pytest.raises(crd.SchemaConversionError, match="oneOf"):
        crd._structural({"type": "object", "oneOf": []}, "spec.y")
