"""Helpers for the CDK app tests: building and synthesising the app, reading a synthesised template
(intrinsic functions rendered as text, statements per role). aws_cdk is imported lazily."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pytest
    from aws_cdk import App
    from aws_cdk.assertions import Template
    from certrotator_infra.stack import CertificateRotatorStack

INFRA_DIR = Path(__file__).resolve().parents[2] / "infra"
CDK_MISSING = "the CDK app tests need the infra extra: pip install -e '.[infra]'"

ACCOUNT = "123456789012"
REGION = "eu-west-1"
CA_ID = "0123abcd-4567-89ef-0123-456789abcdef"
LAYER_ARN = "arn:aws:lambda:eu-west-1:017000801446:layer:AWSLambdaPowertoolsPythonV3-python314-arm64:30"
# Private CA mode, with the values as `cdk deploy -c NAME=VALUE` passes them (strings), a stack name
# with a hyphen (IoT rule names cannot have one) and an explicit Powertools layer.
PCA_CONTEXT: dict[str, Any] = {
    "StackName": "Rotator-Test",
    "PcaCaId": CA_ID,
    "PcaValidityInDays": "30",
    "PcaSigningAlgorithm": "SHA384WITHECDSA",
    "PowertoolsLayerArn": LAYER_ARN,
}
# The scheduled reconcile, off unless the context sets a schedule: once with each issuer mode.
RECONCILE_SCHEDULE = "rate(6 hours)"
RECONCILE_CONTEXT: dict[str, Any] = {"ReconcileSchedule": RECONCILE_SCHEDULE}
PCA_RECONCILE_CONTEXT: dict[str, Any] = PCA_CONTEXT | {"ReconcileSchedule": "cron(0 3 * * ? *)"}
# The renewal function, off unless a schedule or the audit trigger is set: the schedule alone (values as
# cdk.json gives them), and both with a group-scoped policy in Private CA mode (values as -c gives them).
RENEWAL_SCHEDULE = "rate(1 day)"
RENEWAL_CONTEXT: dict[str, Any] = {"RenewalSchedule": RENEWAL_SCHEDULE, "MetricsNamespace": "Fleet/Rotator"}
PCA_RENEWAL_AUDIT_CONTEXT: dict[str, Any] = PCA_CONTEXT | {
    "RenewalSchedule": "cron(15 4 * * ? *)",
    "RenewalPolicy": "renew-at-fraction=0.66,group=line-1,max-per-job=50",
    "RenewalAuditFindings": "true",
}


@dataclass
class Synth:
    """One synthesised configuration."""

    stack: CertificateRotatorStack
    template: Template
    json: dict[str, Any]
    outdir: Path

    def resources(self, kind: str) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self.json["Resources"].items() if v["Type"] == kind}


def make_app(outdir: Path, overrides: Mapping[str, Any] | None = None) -> App:
    """An in-process App with cdk.json's context (which only the CDK CLI would pass) plus overrides."""
    from aws_cdk import App
    from certrotator_infra.application import cdk_json_context

    return App(context=cdk_json_context() | dict(overrides or {}), outdir=str(outdir))


def synthesise(
    tmp_path_factory: pytest.TempPathFactory,
    code_dir: Path,
    overrides: Mapping[str, Any] | None = None,
    customise: Callable[[CertificateRotatorStack], None] | None = None,
) -> tuple[App, CertificateRotatorStack, Path]:
    """The app with the stack and the nag checks, ready for app.synth()."""
    from certrotator_infra.application import build

    outdir = tmp_path_factory.mktemp("cdk.out")
    app = make_app(outdir, overrides)
    stack = build(app, code_dir=code_dir)
    if customise is not None:
        customise(stack)
    return app, stack, outdir


def synthesise_and_read(
    tmp_path_factory: pytest.TempPathFactory, code_dir: Path, overrides: Mapping[str, Any]
) -> Synth:
    from aws_cdk.assertions import Template

    app, stack, outdir = synthesise(tmp_path_factory, code_dir, overrides)
    app.synth()  # runs the AwsSolutions checks: raises on any unacknowledged error
    template_json = json.loads((outdir / f"{stack.stack_name}.template.json").read_text())
    return Synth(stack, Template.from_json(template_json), template_json, outdir)


def render(value: Any) -> str:
    """A CloudFormation value as text: Ref X -> ${X}, GetAtt X.Arn -> ${X.Arn}, joins concatenated."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and len(value) == 1:
        ((function, argument),) = value.items()
        if function == "Ref":
            return "${" + str(argument) + "}"
        if function == "Fn::GetAtt":
            return "${" + ".".join(argument) + "}"
        if function == "Fn::Join":
            separator, parts = argument
            return str(separator).join(render(p) for p in parts)
    raise AssertionError(f"cannot render {value!r}")


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def only(resources: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    assert len(resources) == 1, sorted(resources)
    ((logical_id, resource),) = resources.items()
    return logical_id, resource


def function_by_name(template: dict[str, Any], name: str) -> tuple[str, dict[str, Any]]:
    return only(
        {
            k: v
            for k, v in template["Resources"].items()
            if v["Type"] == "AWS::Lambda::Function" and v["Properties"].get("FunctionName") == name
        }
    )


def role_statements(template: dict[str, Any], role_id: str) -> list[dict[str, Any]]:
    """Every statement of every AWS::IAM::Policy attached to the role (inline policies included)."""
    statements: list[dict[str, Any]] = []
    role = template["Resources"][role_id]
    assert role["Type"] == "AWS::IAM::Role"
    assert "ManagedPolicyArns" not in role["Properties"], "no AWS managed policies"
    for inline in role["Properties"].get("Policies", []):
        statements.extend(inline["PolicyDocument"]["Statement"])
    for resource in template["Resources"].values():
        if resource["Type"] == "AWS::IAM::Policy" and {"Ref": role_id} in resource["Properties"]["Roles"]:
            statements.extend(resource["Properties"]["PolicyDocument"]["Statement"])
    return statements


def grants(statements: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """(action, resource) pairs of Allow statements, resources rendered."""
    pairs: set[tuple[str, str]] = set()
    for statement in statements:
        assert statement["Effect"] == "Allow", statement
        assert "NotAction" not in statement and "NotResource" not in statement, statement
        for action in as_list(statement["Action"]):
            for resource in as_list(statement["Resource"]):
                pairs.add((action, render(resource)))
    return pairs


def substitute(text: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        text = text.replace("${" + name + "}", value)
    assert "${" not in text, f"unresolved reference in {text!r}"
    return text
