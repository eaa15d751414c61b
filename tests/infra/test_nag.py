"""cdk-nag (AwsSolutions) at synthesis: a finding nobody acknowledged fails it, and every
acknowledgement in the stack answers a real finding with a specific reason."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.infra.support import (
    CDK_MISSING,
    PCA_CONTEXT,
    PCA_RECONCILE_CONTEXT,
    PCA_RENEWAL_AUDIT_CONTEXT,
    RECONCILE_CONTEXT,
    RENEWAL_CONTEXT,
    synthesise,
)

pytest.importorskip("aws_cdk", reason=CDK_MISSING)

import certrotator_infra.stack as stack_module
from aws_cdk import ArnFormat
from aws_cdk import aws_iam as iam
from aws_cdk import aws_sns as sns
from certrotator_infra.permissions import Function
from certrotator_infra.stack import CertificateRotatorStack
from constructs import IConstruct


def violations(outdir: Path) -> set[tuple[str, str, str]]:
    """(severity, rule, construct path) of every finding in the validation report."""
    report: dict[str, Any] = json.loads((outdir / "validation-report.json").read_text())
    return {
        (violation["severity"], violation["ruleName"], construct["constructPath"])
        for plugin in report["pluginReports"]
        for violation in plugin["violations"]
        for construct in violation["violatingConstructs"]
    }


def test_an_unacknowledged_finding_fails_synthesis(
    tmp_path_factory: pytest.TempPathFactory, code_dir: Path
) -> None:
    """A deliberately non-compliant topic, and one more wildcard on a role whose other wildcards are
    acknowledged: synthesis raises, and the report names exactly these findings (acknowledgements are
    per finding, never per rule or per resource)."""

    def add_non_compliant(stack: CertificateRotatorStack) -> None:
        sns.Topic(stack, "DeliberatelyNonCompliant")  # publishers may use plain HTTP (SNS3)
        stack.functions[Function.CREATE].role.add_to_policy(
            iam.PolicyStatement(
                actions=["iot:DescribeThingGroup"],
                resources=[
                    stack.format_arn(
                        service="iot",
                        resource="thinggroup",
                        resource_name="*",
                        arn_format=ArnFormat.SLASH_RESOURCE_NAME,
                    )
                ],
            )
        )

    app, stack, outdir = synthesise(tmp_path_factory, code_dir, customise=add_non_compliant)
    with pytest.raises(RuntimeError, match="ValidationFailed"):
        app.synth()
    name = stack.stack_name
    assert violations(outdir) == {
        ("error", "AwsSolutions-SNS3", f"{name}/DeliberatelyNonCompliant/Resource"),
        (
            "error",
            "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:iot:<AWS::Region>:<AWS::AccountId>:thinggroup/*]",
            f"{name}/CreateCertificateRole/DefaultPolicy/Resource",
        ),
    }


@pytest.mark.parametrize(
    "overrides",
    [{}, PCA_CONTEXT, RECONCILE_CONTEXT, PCA_RECONCILE_CONTEXT, RENEWAL_CONTEXT, PCA_RENEWAL_AUDIT_CONTEXT],
    ids=["iot", "pca", "iot-reconcile", "pca-reconcile", "iot-renewal", "pca-renewal-audit"],
)
def test_every_acknowledgement_answers_a_finding_with_a_specific_reason(
    tmp_path_factory: pytest.TempPathFactory, code_dir: Path, overrides: dict[str, Any]
) -> None:
    """With the acknowledgements withheld, the findings are exactly the acknowledged ones: none is
    stale, none is missing, and no rule is acknowledged for a whole stack."""
    acknowledged: list[tuple[str, str, str]] = []

    def record(scope: IConstruct, rule: str, reason: str) -> None:
        acknowledged.append((scope.node.path, rule, reason))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stack_module, "ack", record)
        app, stack, outdir = synthesise(tmp_path_factory, code_dir, overrides)
        with pytest.raises(RuntimeError, match="ValidationFailed"):
            app.synth()
    found = violations(outdir)
    assert {severity for severity, _, _ in found} == {"error"}
    for path, rule, reason in acknowledged:
        assert path != stack.stack_name, f"{rule} acknowledged for the whole stack"
        assert any(r == rule and p.startswith(path + "/") for _, r, p in found), f"stale: {rule} at {path}"
        assert len(reason) >= 80, f"reason too thin for {rule} at {path}: {reason!r}"
    for _, rule, path in found:
        assert any(r == rule and path.startswith(p + "/") for p, r, _ in acknowledged), (
            f"missing: {rule} at {path}"
        )
    # One acknowledgement per finding and scope; a wildcard's reason names the actions it excuses.
    assert len({(p, r) for p, r, _ in acknowledged}) == len(acknowledged)
    for _, rule, reason in acknowledged:
        if rule.startswith("AwsSolutions-IAM5"):
            assert re.search(r"\b(iot|iotjobsdata):[A-Z][A-Za-z0-9]+\b", reason), reason
