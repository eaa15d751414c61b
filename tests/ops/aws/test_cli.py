"""`certrotator aws ...` through typer's CliRunner: every command's success path and its main failures,
with one-line errors (exit 2) for missing credentials, region, permissions and resources."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from typer.testing import CliRunner, Result

from certrotator.ops.aws import cli as aws_cli
from certrotator.ops.aws.cli import aws_app
from certrotator.ops.aws.clients import AwsClients
from certrotator.ops.component.build import build_component
from certrotator.protocol import FAILURE_REASON_KEY

from .conftest import REGION, create_template, create_things, make_clients, set_execution
from .test_jobs import (
    COMPONENT,
    PROJECT,
    CheckStubs,
    deployment,
    stub_component_exists,
    stub_create_version,
    stub_latest,
)

runner = CliRunner()
UseClients = Callable[[AwsClients], None]


def cli(*args: str) -> Result:
    return runner.invoke(aws_app, list(args))


def assert_one_line_error(result: Result, text: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: ") and text in result.stderr, result.stderr
    assert "Traceback" not in result.output


@pytest.fixture
def fleet(clients: AwsClients, iot: Any, use_clients: UseClients) -> AwsClients:
    """moto IoT with the rotation template, things t1-t3 and a group `cores` holding c1."""
    create_template(iot)
    create_things(iot, "t1", "t2", "t3")
    create_things(iot, "c1", group="cores")
    use_clients(clients)
    return clients


# ------------------------------------------------------------------------------------------------ jobs


def test_create_job(fleet: AwsClients, iot: Any) -> None:
    result = cli(
        "create-job",
        "--thing",
        "t1",
        "--thing",
        "t2",
        "--group",
        "cores",
        "--job-id",
        "rot-1",
        "--max-per-minute",
        "200",
        "--base-rate",
        "10",
        "--increment-factor",
        "1.5",
        "--succeeded-per-increase",
        "25",
        "--in-progress-timeout-minutes",
        "15",
        "--retry-timed-out",
        "2",
        "--abort-failure-percent",
        "20",
        "--abort-min-executed",
        "10",
    )
    assert result.exit_code == 0, result.output
    assert "created job rot-1" in result.output and "3 target(s)" in result.output
    job = iot.describe_job(jobId="rot-1")["job"]
    assert job["jobExecutionsRolloutConfig"] == {
        "maximumPerMinute": 200,
        "exponentialRate": {
            "baseRatePerMinute": 10,
            "incrementFactor": 1.5,
            "rateIncreaseCriteria": {"numberOfSucceededThings": 25},
        },
    }
    assert job["timeoutConfig"] == {"inProgressTimeoutInMinutes": 15}
    assert job["abortConfig"]["criteriaList"][0]["thresholdPercentage"] == 20
    assert job["jobExecutionsRetryConfig"]["criteriaList"] == [
        {"failureType": "TIMED_OUT", "numberOfRetries": 2}
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-per-minute", "1001"], "--max-per-minute must be 1-1000, not 1001"),
        (["--increment-factor", "6", "--base-rate", "1", "--succeeded-per-increase", "1"], "1.1-5"),
        (["--in-progress-timeout-minutes", "20000"], "--in-progress-timeout-minutes must be 1-10080"),
        (["--retry-failed", "11"], "--retry-failed must be 0-10"),
        (["--abort-failure-percent", "5"], "needs both --abort-failure-percent and --abort-min-executed"),
    ],
)
def test_create_job_checks_ranges_before_calling_aws(
    monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    def no_aws(region: str | None, profile: str | None) -> AwsClients:
        raise AssertionError("AWS reached before the options were validated")

    monkeypatch.setattr(aws_cli, "connect", no_aws)
    assert_one_line_error(cli("create-job", "--thing", "t1", *args), message)


def test_create_job_names_what_is_missing(fleet: AwsClients, iot: Any) -> None:
    assert_one_line_error(cli("create-job", "--thing", "ghost"), "thing 'ghost' does not exist in us-east-1")
    assert_one_line_error(cli("create-job", "--group", "nope"), "thing group 'nope' does not exist")
    assert_one_line_error(
        cli("create-job", "--thing", "t1", "--template", "Missing"), "job template 'Missing' does not exist"
    )
    assert_one_line_error(cli("create-job"), "give at least one --thing or --group")
    assert iot.list_jobs()["jobs"] == []


def test_describe_job_table_and_json(fleet: AwsClients) -> None:
    assert cli("create-job", "--thing", "t1", "--thing", "t2", "--job-id", "rot-2").exit_code == 0
    set_execution("rot-2", "t1", "SUCCEEDED")
    set_execution(
        "rot-2", "t2", "FAILED", {FAILURE_REASON_KEY: "HSM refused the key"}, job_status="COMPLETED"
    )
    result = cli("describe-job", "rot-2")
    assert result.exit_code == 0, result.output
    assert 'job rot-2: COMPLETED  {"SUCCEEDED": 1, "FAILED": 1}' in result.output
    assert "Failures" in result.output and "HSM refused the key" in result.output
    result = cli("describe-job", "rot-2", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["executions"]["FAILED"] == 1
    assert info["failures"] == [{"thing": "t2", "status": "FAILED", "reason": "HSM refused the key"}]


def test_describe_job_missing(fleet: AwsClients) -> None:
    assert_one_line_error(cli("describe-job", "nope"), "job 'nope' does not exist in us-east-1")


def test_describe_job_watch_shows_progress_until_done(
    fleet: AwsClients, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli("create-job", "--thing", "t1", "--thing", "t2", "--job-id", "rot-3").exit_code == 0
    set_execution("rot-3", "t1", "IN_PROGRESS", job_status="IN_PROGRESS")
    steps: Iterator[Callable[[], None]] = iter(
        [
            lambda: set_execution("rot-3", "t1", "SUCCEEDED"),
            lambda: set_execution("rot-3", "t2", "TIMED_OUT", job_status="COMPLETED"),
        ]
    )
    monkeypatch.setattr(aws_cli, "poll_sleep", lambda seconds: next(steps)())
    result = cli("describe-job", "rot-3", "--watch")
    assert result.exit_code == 0, result.output
    assert "2/2" in result.output and "COMPLETED" in result.output
    assert "Failures" in result.output and "TIMED_OUT" in result.output


def test_describe_job_watch_json_keeps_stdout_for_the_json(fleet: AwsClients) -> None:
    assert cli("create-job", "--thing", "t1", "--job-id", "rot-6").exit_code == 0
    set_execution("rot-6", "t1", "SUCCEEDED", job_status="COMPLETED")
    result = cli("describe-job", "rot-6", "--watch", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"] == "COMPLETED"
    assert "1/1" in result.stderr


def test_describe_job_watch_times_out(fleet: AwsClients, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli("create-job", "--thing", "t1", "--job-id", "rot-4").exit_code == 0
    set_execution("rot-4", "t1", "IN_PROGRESS", job_status="IN_PROGRESS")
    now = [0.0]
    monkeypatch.setattr(aws_cli, "poll_clock", lambda: now[0])
    monkeypatch.setattr(aws_cli, "poll_sleep", lambda seconds: now.__setitem__(0, now[0] + seconds))
    result = cli("describe-job", "rot-4", "--watch", "--interval", "5", "--timeout", "12")
    assert result.exit_code == 1, result.output
    assert "still IN_PROGRESS after 12 s" in result.output
    assert now[0] == 12


def test_cancel_job(fleet: AwsClients, iot: Any) -> None:
    assert cli("create-job", "--thing", "t1", "--job-id", "rot-5").exit_code == 0
    result = cli("cancel-job", "rot-5", "--force", "--comment", "wrong group")
    assert result.exit_code == 0, result.output
    assert "job rot-5 is CANCELED" in result.output
    assert iot.describe_job(jobId="rot-5")["job"]["comment"] == "wrong group"
    assert_one_line_error(cli("cancel-job", "rot-5"), "job 'rot-5' is already CANCELED")
    assert_one_line_error(cli("cancel-job", "ghost"), "job 'ghost' does not exist")


# ---------------------------------------------------------------------------------------- greengrass


def test_deploy_component(fleet: AwsClients, greengrass_stub: Stubber, use_clients: UseClients) -> None:
    stub_component_exists(greengrass_stub, "1.1.0")
    stub_latest(greengrass_stub, deployment())
    greengrass_stub.add_response("create_deployment", {"deploymentId": "d-123"})
    use_clients(make_clients(greengrassv2=greengrass_stub.client))
    result = cli("deploy-component", "1.1.0", "cores")
    assert result.exit_code == 0, result.output
    assert "deployment d-123" in result.output
    assert f"{COMPONENT} 1.0.0 → 1.1.0" in result.output
    assert "kept: aws.greengrass.Nucleus, com.example.App" in result.output


def test_deploy_component_refusals(
    fleet: AwsClients, greengrass_stub: Stubber, use_clients: UseClients
) -> None:
    use_clients(make_clients(greengrassv2=greengrass_stub.client))
    assert_one_line_error(cli("deploy-component", "1.1.0", "nogroup"), "thing group 'nogroup' does not exist")
    stub_component_exists(greengrass_stub, "1.1.0")
    stub_latest(greengrass_stub, None)
    assert_one_line_error(cli("deploy-component", "1.1.0", "cores"), "has no deployment to merge into")


def test_component_publish(
    aws: None, tmp_path: Path, greengrass_stub: Stubber, use_clients: UseClients
) -> None:
    out = tmp_path / "greengrass-build"
    build_component(PROJECT, out, name=COMPONENT, version="1.2.0")
    boto3.client("s3", region_name=REGION).create_bucket(Bucket="rotator-artifacts")
    use_clients(make_clients(greengrassv2=greengrass_stub.client))
    stub_component_exists(greengrass_stub, "1.2.0", exists=False)
    result = cli("component", "publish", "--build-dir", str(out), "--bucket", "no-such-bucket")
    assert_one_line_error(result, "S3 bucket 'no-such-bucket' does not exist")
    stub_component_exists(greengrass_stub, "1.2.0", exists=False)
    stub_create_version(greengrass_stub, "rotator-artifacts")
    result = cli("component", "publish", "--build-dir", str(out), "--bucket", "rotator-artifacts")
    assert result.exit_code == 0, result.output
    assert f"uploaded s3://rotator-artifacts/{COMPONENT}/1.2.0/certrotator.zip" in result.output
    assert f"component {COMPONENT} 1.2.0: DEPLOYABLE" in result.output


# ------------------------------------------------------------------------------------------------ check


@pytest.fixture
def stubs(aws: None, use_clients: UseClients) -> Any:
    stubs = CheckStubs()
    use_clients(stubs.clients())
    yield stubs
    stubs.done()


def test_check_passes(stubs: CheckStubs) -> None:
    stubs.events()
    stubs.stack(issuer="AWS IoT")
    stubs.template()
    stubs.rules()
    stubs.group(deployment(), {"core1": "2.12.0"})
    result = cli("check", "--thing-group", "cores")
    assert result.exit_code == 0, result.output
    assert result.output.count("✓") == 7 and "✗" not in result.output


def test_check_fails_and_says_what_to_fix(stubs: CheckStubs) -> None:
    stubs.events(enabled=False)
    stubs.stack()
    stubs.template()
    stubs.rules()
    result = cli("check")
    assert result.exit_code == 1, result.output
    assert "✗" in result.output and "update-event-configurations" in result.output


def test_check_json(stubs: CheckStubs) -> None:
    stubs.events()
    stubs.cfn.add_client_error(
        "describe_stacks", "ValidationError", "Stack with id Other does not exist", 400
    )
    stubs.template("Other")
    stubs.rules()
    result = cli("check", "--stack", "Other", "--json")
    assert result.exit_code == 1
    checks = json.loads(result.stdout)
    assert [(c["check"], c["status"]) for c in checks] == [
        ("job execution events", "pass"),
        ("stack Other", "fail"),
        ("job template Other", "pass"),
        ("rotation rules", "fail"),  # the rules are AWSLabsCertificateRotator's, not Other's
    ]


# ----------------------------------------------------------------------------------- credentials, region


def test_missing_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert_one_line_error(cli("describe-job", "rot-1"), "no AWS credentials found")
    assert_one_line_error(cli("check"), "no AWS credentials found")


def test_missing_region(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.delenv("AWS_REGION")
    assert_one_line_error(cli("create-job", "--thing", "t1"), "no AWS region: pass --region")
    assert_one_line_error(cli("cancel-job", "rot-1"), "no AWS region")


def test_unknown_profile() -> None:
    assert_one_line_error(cli("describe-job", "rot-1", "--profile", "nope"), "could not be found")


def test_region_option_is_used(aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.delenv("AWS_REGION")
    result = cli("describe-job", "rot-1", "--region", "eu-west-1")
    assert_one_line_error(result, "job 'rot-1' does not exist in eu-west-1")


def test_access_denied(aws: None, use_clients: UseClients) -> None:
    iot = boto3.client("iot", region_name=REGION)
    with Stubber(iot) as stub:
        stub.add_client_error(
            "describe_thing",
            "AccessDeniedException",
            "User is not authorized to perform: iot:DescribeThing",
            403,
        )
        use_clients(make_clients(iot=iot))
        assert_one_line_error(cli("create-job", "--thing", "t1"), "access denied to DescribeThing")


def test_importing_the_cli_does_not_load_boto3() -> None:
    code = (
        "import sys, certrotator.cli, certrotator.ops.aws.cli; "
        "loaded = [m for m in ('boto3', 'botocore', 'certrotator.ops.aws.jobs') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_help_lists_every_command() -> None:
    result = cli("--help")
    assert result.exit_code == 0
    for command in ("create-job", "describe-job", "cancel-job", "deploy-component", "component", "check"):
        assert command in result.output
