"""Context variables: cdk.json defaults, `-c` strings, and clear errors for values the stack cannot use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.infra.support import CA_ID, CDK_MISSING, INFRA_DIR, make_app

pytest.importorskip("aws_cdk", reason=CDK_MISSING)

from certrotator_infra.application import CDK_JSON, build, cdk_json_context
from certrotator_infra.config import PCA_SIGNING_ALGORITHMS, ContextError, PrivateCa, RotatorConfig

from certrotator.crypto import CaSigningAlgorithm

CA_ARN = f"arn:aws:acm-pca:eu-west-1:123456789012:certificate-authority/{CA_ID}"


def config_of(overrides: dict[str, Any]) -> RotatorConfig:
    context = cdk_json_context() | overrides
    return RotatorConfig.from_context(context.get)


def test_cdk_json_defaults() -> None:
    document = json.loads(CDK_JSON.read_text())
    assert document["app"] == "python3 app.py"
    context = document["context"]
    assert context["PcaCaId"] == ""
    assert context["PcaValidityInDays"] == 7
    assert context["PcaSigningAlgorithm"] == "SHA256WITHRSA"
    assert context["StackName"] == "AWSLabsCertificateRotator"
    assert context["ReconcileSchedule"] == ""  # the scheduled reconcile is off unless asked for
    assert context["@aws-cdk/core:validateAgainstDefaultRules"] is True
    assert config_of({}) == RotatorConfig(
        stack_name="AWSLabsCertificateRotator",
        private_ca=None,
        pca_validity_days=7,
        pca_signing_algorithm="SHA256WITHRSA",
        powertools_layer_arn=None,
        lambda_dependencies_dir="build/lambda-deps",
        reconcile_schedule=None,
    )


def test_the_six_signing_algorithms_are_the_backends() -> None:
    assert set(PCA_SIGNING_ALGORITHMS) == {a.value for a in CaSigningAlgorithm}
    for algorithm in PCA_SIGNING_ALGORITHMS:
        assert config_of({"PcaSigningAlgorithm": algorithm}).pca_signing_algorithm == algorithm


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"PcaValidityInDays": "30"}, {"pca_validity_days": 30}),  # -c PcaValidityInDays=30
        ({"PcaValidityInDays": 3650}, {"pca_validity_days": 3650}),
        ({"PcaValidityInDays": " 1 "}, {"pca_validity_days": 1}),
        ({"PcaCaId": CA_ID}, {"private_ca": PrivateCa(CA_ID)}),
        ({"PcaCaId": f"  {CA_ID}\n"}, {"private_ca": PrivateCa(CA_ID)}),
        ({"PcaCaId": CA_ARN}, {"private_ca": PrivateCa(CA_ID, CA_ARN)}),
        (
            {"PcaCaId": CA_ARN.replace("arn:aws:", "arn:aws-cn:").replace("eu-west-1", "cn-north-1")},
            {
                "private_ca": PrivateCa(
                    CA_ID, CA_ARN.replace("arn:aws:", "arn:aws-cn:").replace("eu-west-1", "cn-north-1")
                )
            },
        ),
        ({"StackName": "Rotator-Prod-2"}, {"stack_name": "Rotator-Prod-2"}),
        ({"StackName": ""}, {"stack_name": "AWSLabsCertificateRotator"}),
        ({"PowertoolsLayerArn": ""}, {"powertools_layer_arn": None}),
        ({"ReconcileSchedule": ""}, {"reconcile_schedule": None}),  # off, as cdk.json ships
        ({"ReconcileSchedule": "rate(6 hours)"}, {"reconcile_schedule": "rate(6 hours)"}),
        ({"ReconcileSchedule": " rate(1 hour) "}, {"reconcile_schedule": "rate(1 hour)"}),
        ({"ReconcileSchedule": "rate(1 day)"}, {"reconcile_schedule": "rate(1 day)"}),
        ({"ReconcileSchedule": "rate(90 minutes)"}, {"reconcile_schedule": "rate(90 minutes)"}),
        ({"ReconcileSchedule": "cron(0 3 * * ? *)"}, {"reconcile_schedule": "cron(0 3 * * ? *)"}),
        (
            {"ReconcileSchedule": "cron(15 */6 ? * MON-FRI *)"},
            {"reconcile_schedule": "cron(15 */6 ? * MON-FRI *)"},
        ),
    ],
)
def test_accepted_values(overrides: dict[str, Any], expected: dict[str, Any]) -> None:
    config = config_of(overrides)
    for field, value in expected.items():
        assert getattr(config, field) == value


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("PcaSigningAlgorithm", "SHA1WITHRSA"),
        ("PcaSigningAlgorithm", "sha256withrsa"),
        ("PcaSigningAlgorithm", "DSA_WITH_SHA256"),
        ("PcaSigningAlgorithm", 256),
        ("PcaValidityInDays", 0),
        ("PcaValidityInDays", -7),
        ("PcaValidityInDays", "0"),
        ("PcaValidityInDays", "7.5"),
        ("PcaValidityInDays", 7.5),
        ("PcaValidityInDays", "seven"),
        ("PcaValidityInDays", True),
        ("PcaValidityInDays", 36501),
        ("PcaValidityInDays", "٣"),  # a digit, but not an ASCII one
        ("PcaCaId", "my-ca"),
        ("PcaCaId", CA_ID.upper()),
        ("PcaCaId", CA_ID[:-1]),
        ("PcaCaId", CA_ARN.replace("acm-pca", "acm")),
        ("PcaCaId", CA_ARN + "/certificate/abc"),
        ("PcaCaId", 12345),
        ("StackName", "1Rotator"),
        ("StackName", "Rotator_Prod"),
        ("StackName", "R" * 45),
        ("PowertoolsLayerArn", "arn:aws:lambda:eu-west-1:017000801446:function:x"),
        ("PowertoolsLayerArn", "arn:aws:lambda:eu-west-1:017000801446:layer:AWSLambdaPowertoolsPythonV3"),
        ("ReconcileSchedule", "every 6 hours"),
        ("ReconcileSchedule", "rate(6 hour)"),  # EventBridge: plural unit above 1
        ("ReconcileSchedule", "rate(1 hours)"),  # and singular for 1
        ("ReconcileSchedule", "rate(0 hours)"),
        ("ReconcileSchedule", "rate(30 minutes)"),  # more often than hourly
        ("ReconcileSchedule", "rate(6 Hours)"),
        ("ReconcileSchedule", "rate(٦ hours)"),  # a digit, but not an ASCII one
        ("ReconcileSchedule", "cron(0 3 * * * *)"),  # day-of-month and day-of-week both set
        ("ReconcileSchedule", "cron(0 3 ? * ? *)"),
        ("ReconcileSchedule", "cron(*/5 * * * ? *)"),  # every five minutes
        ("ReconcileSchedule", "cron(0,30 * * * ? *)"),
        ("ReconcileSchedule", "cron(0 3 * * ?)"),  # five fields
        ("ReconcileSchedule", "rate(6 hours); rm -rf /"),
        ("ReconcileSchedule", 6),
    ],
)
def test_invalid_context_is_rejected_at_synthesis_with_a_clear_message(
    tmp_path: Path, code_dir: Path, key: str, value: Any
) -> None:
    app = make_app(tmp_path, {key: value})
    with pytest.raises(ContextError) as caught:
        build(app, code_dir=code_dir)
    message = str(caught.value)
    assert f"context variable {key} " in message
    assert repr(value) in message or repr(str(value).strip()) in message
    if key == "PcaSigningAlgorithm" and isinstance(value, str):
        assert ", ".join(PCA_SIGNING_ALGORITHMS) in message  # says what it accepts
    if key == "ReconcileSchedule" and isinstance(value, str):
        assert "rate(6 hours)" in message and "cron(0 3 * * ? *)" in message  # says what it accepts
    assert not list(tmp_path.iterdir()), "nothing synthesised"


def run_app(tmp_path: Path, context: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """infra/app.py as the CDK CLI runs it: context in CDK_CONTEXT_JSON, output dir in CDK_OUTDIR."""
    env = os.environ | {
        "CDK_CONTEXT_JSON": json.dumps(cdk_json_context() | context),
        "CDK_OUTDIR": str(tmp_path / "cdk.out"),
        "JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": "20",
    }
    return subprocess.run(
        [sys.executable, "app.py"],
        check=False,
        cwd=INFRA_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_app_reports_bad_context_as_one_line_error(tmp_path: Path) -> None:
    result = run_app(tmp_path, {"PcaSigningAlgorithm": "MD5WITHRSA"})
    assert result.returncode == 1
    assert result.stderr.startswith(
        "error: context variable PcaSigningAlgorithm must be one of SHA256WITHECDSA"
    )
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "cdk.out").glob("*.template.json"))


def test_app_refuses_to_synthesise_without_the_lambda_dependencies(tmp_path: Path) -> None:
    result = run_app(tmp_path, {"LambdaDependenciesDir": str(tmp_path / "missing")})
    assert result.returncode == 1
    assert "error: the Lambda dependencies are missing" in result.stderr
    assert "build_lambda_deps.py" in result.stderr
    assert "Traceback" not in result.stderr


def test_app_reports_a_bad_schedule_as_one_line_error(tmp_path: Path) -> None:
    result = run_app(tmp_path, {"ReconcileSchedule": "rate(5 minutes)"})
    assert result.returncode == 1
    assert result.stderr.startswith("error: context variable ReconcileSchedule must be empty")
    assert "(every 5 minutes is more often than hourly)" in result.stderr
    assert "Traceback" not in result.stderr
