"""The `certrotator aws` logic over boto3 clients: jobs on moto's IoT, the Greengrass component on moto's
S3/STS with a stubbed greengrassv2, and the readiness checks on stubbed clients."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError, NoCredentialsError, NoRegionError, ProfileNotFound
from botocore.stub import Stubber

from certrotator.compat import UTC
from certrotator.ops.aws import checks as aws_checks
from certrotator.ops.aws import greengrass as aws_greengrass
from certrotator.ops.aws.checks import run_checks
from certrotator.ops.aws.checks_model import Check, Status, failed
from certrotator.ops.aws.clients import AwsClients, OperationError, error_message
from certrotator.ops.aws.job_overrides import JobOverrides
from certrotator.ops.aws.jobs import cancel_job, create_job, describe_job, watch_job
from certrotator.ops.component.build import build_component
from certrotator.protocol import FAILURE_REASON_KEY, JOB_DOCUMENT, STATUS_DETAILS_KEY

from .conftest import (
    ACCOUNT,
    REGION,
    TEMPLATE,
    create_template,
    create_things,
    make_clients,
    moto_iot,
    set_execution,
)

PROJECT = Path(__file__).resolve().parents[3]
COMPONENT = "aws.greengrass.labs.CertificateRotator"
GROUP_ARN = f"arn:aws:iot:{REGION}:{ACCOUNT}:thinggroup/cores"
TEMPLATE_ARN = f"arn:aws:iot:{REGION}:{ACCOUNT}:jobtemplate/{TEMPLATE}"
NUCLEUS_MERGE = json.dumps({"interpolateComponentConfiguration": True})


OUR_RULES: list[dict[str, Any]] = [
    {"ruleName": f"{TEMPLATE}CreateCertificate", "topicPattern": "awslabs/things/+/certificate/create"},
    {"ruleName": f"{TEMPLATE}CommitCertificate", "topicPattern": "awslabs/things/+/certificate/commit"},
    {"ruleName": f"{TEMPLATE}JobExecutionTerminal", "topicPattern": "$aws/events/jobExecution/+/+"},
    {"ruleName": f"{TEMPLATE}CertificateAnnounce", "topicPattern": "awslabs/things/+/certificate/announce"},
]
# What `certrotator component build` puts in a recipe's run script (the check looks for it).
OUR_RECIPE = 'Run:\n  Script: "python" -I -u -m certrotator.cli agent --greengrass\n'


def component_arn(version: str, name: str = COMPONENT) -> str:
    return f"arn:aws:greengrass:{REGION}:{ACCOUNT}:components:{name}:versions:{version}"


def client_error(code: str, message: str = "", operation: str = "Op", status: int = 400) -> ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, operation)


# ------------------------------------------------------------------------------------- job overrides


def test_overrides_map_to_the_create_job_shapes() -> None:
    api = JobOverrides(
        max_per_minute=500,
        base_rate=20,
        increment_factor=1.5,
        succeeded_per_increase=10,
        in_progress_timeout_minutes=30,
        retry_failed=2,
        retry_timed_out=0,
        abort_failure_percent=12.5,
        abort_min_executed=20,
    ).to_api()
    assert api == {
        "jobExecutionsRolloutConfig": {
            "maximumPerMinute": 500,
            "exponentialRate": {
                "baseRatePerMinute": 20,
                "incrementFactor": 1.5,
                "rateIncreaseCriteria": {"numberOfSucceededThings": 10},
            },
        },
        "timeoutConfig": {"inProgressTimeoutInMinutes": 30},
        "jobExecutionsRetryConfig": {
            "criteriaList": [
                {"failureType": "FAILED", "numberOfRetries": 2},
                {"failureType": "TIMED_OUT", "numberOfRetries": 0},
            ]
        },
        "abortConfig": {
            "criteriaList": [
                {
                    "failureType": "ALL",
                    "action": "CANCEL",
                    "thresholdPercentage": 12.5,
                    "minNumberOfExecutedThings": 20,
                }
            ]
        },
    }
    assert JobOverrides().to_api() == {}
    assert JobOverrides(max_per_minute=1).to_api() == {"jobExecutionsRolloutConfig": {"maximumPerMinute": 1}}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (JobOverrides(max_per_minute=0), "--max-per-minute must be 1-1000, not 0"),
        (JobOverrides(max_per_minute=1001), "--max-per-minute must be 1-1000, not 1001"),
        (JobOverrides(base_rate=10, increment_factor=1.5), "needs all of --base-rate"),
        (JobOverrides(increment_factor=2.0), "needs all of --base-rate"),
        (
            JobOverrides(base_rate=0, increment_factor=1.5, succeeded_per_increase=5),
            "--base-rate must be 1-1000",
        ),
        (
            JobOverrides(base_rate=10, increment_factor=1.0, succeeded_per_increase=5),
            "--increment-factor must be 1.1-5, not 1",
        ),
        (
            JobOverrides(base_rate=10, increment_factor=5.5, succeeded_per_increase=5),
            "--increment-factor must be 1.1-5",
        ),
        (
            JobOverrides(base_rate=10, increment_factor=1.25, succeeded_per_increase=5),
            "one digit after the decimal point",
        ),
        (
            JobOverrides(base_rate=10, increment_factor=1.5, succeeded_per_increase=0),
            "--succeeded-per-increase must be at least 1",
        ),
        (
            JobOverrides(max_per_minute=10, base_rate=50, increment_factor=1.5, succeeded_per_increase=5),
            "--base-rate (50) cannot exceed --max-per-minute (10)",
        ),
        (JobOverrides(in_progress_timeout_minutes=0), "--in-progress-timeout-minutes must be 1-10080"),
        (JobOverrides(in_progress_timeout_minutes=10081), "--in-progress-timeout-minutes must be 1-10080"),
        (JobOverrides(retry_failed=11), "--retry-failed must be 0-10, not 11"),
        (JobOverrides(retry_timed_out=-1), "--retry-timed-out must be 0-10, not -1"),
        (
            JobOverrides(abort_failure_percent=10),
            "needs both --abort-failure-percent and --abort-min-executed",
        ),
        (JobOverrides(abort_min_executed=10), "needs both"),
        (JobOverrides(abort_failure_percent=0, abort_min_executed=1), "above 0 and at most 100"),
        (JobOverrides(abort_failure_percent=100.5, abort_min_executed=1), "above 0 and at most 100"),
        (JobOverrides(abort_failure_percent=10.125, abort_min_executed=1), "at most two digits"),
        (
            JobOverrides(abort_failure_percent=10, abort_min_executed=0),
            "--abort-min-executed must be at least 1",
        ),
    ],
)
def test_overrides_out_of_range_are_refused_with_the_option_named(
    overrides: JobOverrides, message: str
) -> None:
    with pytest.raises(OperationError) as caught:
        overrides.to_api()
    assert message in str(caught.value)


# ---------------------------------------------------------------------------------------- create job


def test_create_job_targets_things_and_groups_with_the_template_and_overrides(
    clients: AwsClients, iot: Any
) -> None:
    create_template(iot)
    create_things(iot, "t1", "t2")
    create_things(iot, "c1", group="cores")
    created = create_job(
        clients,
        things=["t1", "t2", "t1"],
        groups=["cores"],
        job_id="rot-1",
        overrides=JobOverrides(in_progress_timeout_minutes=15, retry_failed=1),
    )
    assert created.job_id == "rot-1"
    assert created.template_arn == TEMPLATE_ARN
    assert created.targets == [
        f"arn:aws:iot:{REGION}:{ACCOUNT}:thing/t1",
        f"arn:aws:iot:{REGION}:{ACCOUNT}:thing/t2",
        GROUP_ARN,
    ]
    job = iot.describe_job(jobId="rot-1")["job"]
    assert job["targetSelection"] == "SNAPSHOT"
    assert job["targets"] == created.targets
    assert job["timeoutConfig"] == {"inProgressTimeoutInMinutes": 15}
    assert job["jobExecutionsRetryConfig"] == {
        "criteriaList": [{"failureType": "FAILED", "numberOfRetries": 1}]
    }


def test_create_job_passes_the_template_arn(clients: AwsClients, iot: Any) -> None:
    # moto ignores jobTemplateArn, so look at what was sent
    create_template(iot)
    create_things(iot, "t1")
    sent: list[dict[str, Any]] = []
    iot.meta.events.register("provide-client-params.iot.CreateJob", lambda params, **_: sent.append(params))
    create_job(clients, things=["t1"], job_id="rot-2")
    assert sent[0]["jobTemplateArn"] == TEMPLATE_ARN
    assert "jobExecutionsRolloutConfig" not in sent[0]  # no override: the template's rollout applies


def test_create_job_default_id(clients: AwsClients, iot: Any) -> None:
    create_template(iot)
    create_things(iot, "t1")
    assert create_job(clients, things=["t1"]).job_id.startswith("rotate-")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"things": ["t1", "ghost"]}, "thing 'ghost' does not exist in us-east-1"),
        ({"groups": ["nogroup"]}, "thing group 'nogroup' does not exist in us-east-1"),
        ({"things": ["t1"], "template": "Other"}, "job template 'Other' does not exist in us-east-1"),
        ({}, "give at least one --thing or --group"),
        ({"things": ["t1"], "job_id": "bad id!"}, "invalid jobId"),
        ({"things": ["t1"], "overrides": JobOverrides(max_per_minute=0)}, "--max-per-minute"),
    ],
)
def test_create_job_refusals_create_nothing(
    clients: AwsClients, iot: Any, kwargs: dict[str, Any], message: str
) -> None:
    create_template(iot)
    create_things(iot, "t1")
    with pytest.raises(OperationError) as caught:
        create_job(clients, **kwargs)
    assert message in str(caught.value)
    assert iot.list_jobs()["jobs"] == []


def test_create_job_refuses_a_template_without_the_rotation_document(clients: AwsClients, iot: Any) -> None:
    create_template(iot, "Firmware", {"operation": "UPDATE_FIRMWARE"})
    create_things(iot, "t1")
    with pytest.raises(OperationError, match="'Firmware' does not carry the rotation document"):
        create_job(clients, things=["t1"], template="Firmware")


def test_create_job_names_a_duplicate_job_id() -> None:
    iot = boto3.client("iot", region_name=REGION)
    with Stubber(iot) as stub:
        stub.add_response("describe_thing", {"thingName": "t1", "thingArn": "arn:aws:iot:r:1:thing/t1"})
        stub.add_response(
            "describe_job_template",
            {"jobTemplateArn": TEMPLATE_ARN, "jobTemplateId": TEMPLATE, "document": json.dumps(JOB_DOCUMENT)},
        )
        stub.add_client_error("create_job", "ResourceAlreadyExistsException", "exists", 409)
        with pytest.raises(OperationError, match="job 'dup' already exists: pick another --job-id"):
            create_job(make_clients(iot=iot), things=["t1"], job_id="dup")


# -------------------------------------------------------------------------------------- describe job


@pytest.fixture
def finished_job(clients: AwsClients, iot: Any) -> str:
    create_template(iot)
    create_things(iot, "t1", "t2", "t3", "t4")
    create_job(clients, things=["t1", "t2", "t3", "t4"], job_id="rot-3")
    set_execution("rot-3", "t1", "SUCCEEDED", {STATUS_DETAILS_KEY: "committed"})
    set_execution(
        "rot-3", "t2", "FAILED", {STATUS_DETAILS_KEY: "x", FAILURE_REASON_KEY: "CSR rejected: key too small"}
    )
    set_execution("rot-3", "t3", "TIMED_OUT")
    set_execution(
        "rot-3", "t4", "REJECTED", {FAILURE_REASON_KEY: "unknown operation"}, job_status="COMPLETED"
    )
    return "rot-3"


def test_describe_job_counts_and_failure_reasons(clients: AwsClients, finished_job: str) -> None:
    report = describe_job(clients, finished_job)
    assert report.status == "COMPLETED" and report.finished
    assert report.counts["SUCCEEDED"] == 1 and report.counts["FAILED"] == 1
    assert report.counts["TIMED_OUT"] == 1 and report.counts["REJECTED"] == 1
    assert (report.total, report.done) == (4, 4)
    assert [(f.thing, f.status, f.reason) for f in report.failures] == [
        ("t2", "FAILED", "CSR rejected: key too small"),
        ("t3", "TIMED_OUT", ""),
        ("t4", "REJECTED", "unknown operation"),
    ]
    assert not report.failures_truncated
    assert report.to_json()["failures"][0] == {
        "thing": "t2",
        "status": "FAILED",
        "reason": "CSR rejected: key too small",
    }


def test_describe_job_bounds_the_failure_lookups(clients: AwsClients, finished_job: str) -> None:
    report = describe_job(clients, finished_job, max_failures=1)
    assert [f.thing for f in report.failures] == ["t2"]
    assert report.failures_truncated
    assert describe_job(clients, finished_job, max_failures=0).failures == []


def test_describe_job_names_a_missing_job(clients: AwsClients) -> None:
    with pytest.raises(OperationError, match="job 'nope' does not exist in us-east-1"):
        describe_job(clients, "nope")


def test_watch_polls_until_the_job_completes(clients: AwsClients, iot: Any) -> None:
    create_template(iot)
    create_things(iot, "t1", "t2")
    create_job(clients, things=["t1", "t2"], job_id="rot-4")
    set_execution("rot-4", "t1", "QUEUED", job_status="IN_PROGRESS")
    steps: Iterator[Callable[[], None]] = iter(
        [
            lambda: set_execution("rot-4", "t1", "IN_PROGRESS"),
            lambda: set_execution("rot-4", "t1", "SUCCEEDED"),
            lambda: set_execution("rot-4", "t2", "SUCCEEDED", job_status="COMPLETED"),
        ]
    )
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        next(steps)()

    reports = list(watch_job(clients, "rot-4", interval=5, timeout=60, sleep=sleep, clock=lambda: 0.0))
    assert [(r.status, r.done) for r in reports] == [
        ("IN_PROGRESS", 0),
        ("IN_PROGRESS", 0),
        ("IN_PROGRESS", 1),
        ("COMPLETED", 2),
    ]
    assert sleeps == [5, 5, 5]


def test_watch_gives_up_at_the_timeout(clients: AwsClients, iot: Any) -> None:
    create_template(iot)
    create_things(iot, "t1")
    create_job(clients, things=["t1"], job_id="rot-5")
    set_execution("rot-5", "t1", "IN_PROGRESS", job_status="IN_PROGRESS")
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    reports = list(watch_job(clients, "rot-5", interval=4, timeout=10, sleep=sleep, clock=lambda: now[0]))
    assert len(reports) == 4  # at 0, 4, 8 and 10 s
    assert now[0] == 10
    assert not reports[-1].finished


# ---------------------------------------------------------------------------------------- cancel job


def test_cancel_job(clients: AwsClients, iot: Any) -> None:
    create_template(iot)
    create_things(iot, "t1")
    create_job(clients, things=["t1"], job_id="rot-6")
    report = cancel_job(clients, "rot-6", force=True, comment="wrong fleet")
    assert report.status == "CANCELED"
    job = iot.describe_job(jobId="rot-6")["job"]
    assert job["forceCanceled"] is True and job["comment"] == "wrong fleet"
    with pytest.raises(OperationError, match="job 'rot-6' is already CANCELED"):
        cancel_job(clients, "rot-6")
    with pytest.raises(OperationError, match="job 'ghost' does not exist"):
        cancel_job(clients, "ghost")
    with pytest.raises(OperationError, match="--comment must be"):
        cancel_job(clients, "rot-6", comment="x" * 2029)


# ----------------------------------------------------------------------------------------- deploy


def deployment(**changes: Any) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "targetArn": GROUP_ARN,
        "deploymentId": "d-old",
        "deploymentName": "cores fleet",
        "deploymentStatus": "COMPLETED",
        "components": {
            "aws.greengrass.Nucleus": {
                "componentVersion": "2.12.0",
                "configurationUpdate": {"merge": NUCLEUS_MERGE},
            },
            COMPONENT: {
                "componentVersion": "1.0.0",
                "configurationUpdate": {"merge": '{"keyAlgorithm":"ECDSA-P256"}'},
            },
            "com.example.App": {"componentVersion": "3.0.0", "runWith": {"posixUser": "app"}},
        },
        "deploymentPolicies": {"failureHandlingPolicy": "ROLLBACK"},
        "iotJobConfiguration": {"jobExecutionsRolloutConfig": {"maximumPerMinute": 50}},
    }
    answer.update(changes)
    return answer


def stub_latest(stub: Stubber, latest: dict[str, Any] | None) -> None:
    listed = [] if latest is None else [{"deploymentId": latest["deploymentId"], "targetArn": GROUP_ARN}]
    stub.add_response(
        "list_deployments",
        {"deployments": listed},
        {"targetArn": GROUP_ARN, "historyFilter": "LATEST_ONLY"},
    )
    if latest is not None:
        stub.add_response("get_deployment", latest, {"deploymentId": latest["deploymentId"]})


def stub_component_exists(stub: Stubber, version: str, exists: bool = True) -> None:
    if exists:
        stub.add_response(
            "describe_component", {"arn": component_arn(version)}, {"arn": component_arn(version)}
        )
    else:
        stub.add_client_error("describe_component", "ResourceNotFoundException", "no such component", 404)


def test_deploy_merges_into_the_latest_deployment(aws: None, iot: Any, greengrass_stub: Stubber) -> None:
    create_things(iot, "core1", group="cores")
    stub_component_exists(greengrass_stub, "1.1.0")
    stub_latest(greengrass_stub, deployment())
    expected = deployment()["components"]
    expected[COMPONENT]["componentVersion"] = "1.1.0"  # its configurationUpdate stays
    greengrass_stub.add_response(
        "create_deployment",
        {"deploymentId": "d-new"},
        {
            "targetArn": GROUP_ARN,
            "deploymentName": "cores fleet",
            "components": expected,
            "deploymentPolicies": {"failureHandlingPolicy": "ROLLBACK"},
            "iotJobConfiguration": {"jobExecutionsRolloutConfig": {"maximumPerMinute": 50}},
        },
    )
    result = aws_greengrass.deploy_component(
        make_clients(greengrassv2=greengrass_stub.client), "1.1.0", "cores"
    )
    assert result.deployment_id == "d-new"
    assert result.previous_version == "1.0.0"
    assert result.kept == ["aws.greengrass.Nucleus", "com.example.App"]


def test_deploy_adds_the_component_to_an_unnamed_deployment(
    aws: None, iot: Any, greengrass_stub: Stubber
) -> None:
    create_things(iot, "core1", group="cores")
    latest = deployment()
    del latest["deploymentName"], latest["deploymentPolicies"], latest["iotJobConfiguration"]
    del latest["components"][COMPONENT]
    stub_component_exists(greengrass_stub, "1.1.0")
    stub_latest(greengrass_stub, latest)
    components = {**latest["components"], COMPONENT: {"componentVersion": "1.1.0"}}
    greengrass_stub.add_response(
        "create_deployment",
        {"deploymentId": "d-new"},
        {"targetArn": GROUP_ARN, "deploymentName": "Deployment for cores", "components": components},
    )
    result = aws_greengrass.deploy_component(
        make_clients(greengrassv2=greengrass_stub.client), "1.1.0", "cores"
    )
    assert result.previous_version is None and result.deployment_name == "Deployment for cores"


def test_deploy_refusals(aws: None, iot: Any, greengrass_stub: Stubber) -> None:
    clients = make_clients(greengrassv2=greengrass_stub.client)
    with pytest.raises(OperationError, match="not a semantic version"):
        aws_greengrass.deploy_component(clients, "1.1", "cores")
    with pytest.raises(OperationError, match="thing group 'cores' does not exist in us-east-1"):
        aws_greengrass.deploy_component(clients, "1.1.0", "cores")
    create_things(iot, "core1", group="cores")
    stub_component_exists(greengrass_stub, "9.9.9", exists=False)
    with pytest.raises(OperationError, match=f"{COMPONENT} 9.9.9 is not published in us-east-1"):
        aws_greengrass.deploy_component(clients, "9.9.9", "cores")
    stub_component_exists(greengrass_stub, "1.1.0")
    stub_latest(greengrass_stub, None)
    with pytest.raises(OperationError, match="thing group 'cores' has no deployment to merge into"):
        aws_greengrass.deploy_component(clients, "1.1.0", "cores")


# ----------------------------------------------------------------------------------------- publish


@pytest.fixture
def built(tmp_path: Path) -> Path:
    """The real `certrotator component build` output, artifact URI with {BUCKET_NAME}."""
    out = tmp_path / "greengrass-build"
    build_component(PROJECT, out, name=COMPONENT, version="1.2.0")
    return out


def stub_create_version(stub: Stubber, bucket: str, state: str = "DEPLOYABLE") -> None:
    stub.add_response(
        "create_component_version",
        {
            "arn": component_arn("1.2.0"),
            "componentName": COMPONENT,
            "componentVersion": "1.2.0",
            "creationTimestamp": datetime(2026, 1, 1, tzinfo=UTC),
            "status": {"componentState": state, "message": "bad recipe" if state == "FAILED" else "ok"},
        },
    )


def test_publish_uploads_the_artifact_then_creates_the_version(
    aws: None, built: Path, greengrass_stub: Stubber
) -> None:
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket="rotator-artifacts")
    stub_component_exists(greengrass_stub, "1.2.0", exists=False)
    stub_create_version(greengrass_stub, "rotator-artifacts")
    result = aws_greengrass.publish_component(
        make_clients(greengrassv2=greengrass_stub.client), built, "rotator-artifacts"
    )
    key = f"{COMPONENT}/1.2.0/certrotator.zip"
    assert result.uploaded == [f"s3://rotator-artifacts/{key}"]
    assert result.arn == component_arn("1.2.0") and result.state == "DEPLOYABLE"
    artifact = built / "artifacts" / COMPONENT / "1.2.0" / "certrotator.zip"
    assert s3.get_object(Bucket="rotator-artifacts", Key=key)["Body"].read() == artifact.read_bytes()


def test_publish_sends_the_recipe_with_the_bucket_filled_in(
    aws: None, built: Path, greengrass_stub: Stubber
) -> None:
    boto3.client("s3", region_name=REGION).create_bucket(Bucket="rotator-artifacts")
    recipe = (built / "recipes" / "recipe.yaml").read_text()
    expected = recipe.replace("{BUCKET_NAME}", "rotator-artifacts").encode()
    stub_component_exists(greengrass_stub, "1.2.0", exists=False)
    greengrass_stub.add_response(
        "create_component_version",
        {
            "arn": component_arn("1.2.0"),
            "componentName": COMPONENT,
            "componentVersion": "1.2.0",
            "creationTimestamp": datetime(2026, 1, 1, tzinfo=UTC),
            "status": {"componentState": "REQUESTED"},
        },
        {"inlineRecipe": expected},
    )
    aws_greengrass.publish_component(
        make_clients(greengrassv2=greengrass_stub.client), built, "rotator-artifacts"
    )
    assert b"{BUCKET_NAME}" not in expected and b"s3://rotator-artifacts/" in expected


def test_publish_refusals(aws: None, built: Path, tmp_path: Path, greengrass_stub: Stubber) -> None:
    clients = make_clients(greengrassv2=greengrass_stub.client)
    with pytest.raises(OperationError, match=r"keeps \{BUCKET_NAME\}: pass --bucket"):
        aws_greengrass.publish_component(clients, built)
    with pytest.raises(OperationError, match="not a valid S3 bucket name"):
        aws_greengrass.publish_component(clients, built, "Bad_Bucket")
    with pytest.raises(OperationError, match="expected one recipe"):
        aws_greengrass.publish_component(clients, tmp_path / "empty")
    # the bucket must exist (it is not created)
    stub_component_exists(greengrass_stub, "1.2.0", exists=False)
    with pytest.raises(OperationError, match="S3 bucket 'missing-bucket' does not exist"):
        aws_greengrass.publish_component(clients, built, "missing-bucket")
    # an existing version is never overwritten: nothing is uploaded
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket="rotator-artifacts")
    stub_component_exists(greengrass_stub, "1.2.0", exists=True)
    with pytest.raises(OperationError, match=r"1\.2\.0 is already published in us-east-1: bump the version"):
        aws_greengrass.publish_component(clients, built, "rotator-artifacts")
    assert s3.list_objects_v2(Bucket="rotator-artifacts").get("KeyCount") == 0
    # Greengrass rejecting the recipe is an error, not a success message
    stub_component_exists(greengrass_stub, "1.2.0", exists=False)
    stub_create_version(greengrass_stub, "rotator-artifacts", state="FAILED")
    with pytest.raises(OperationError, match=r"Greengrass rejected .* bad recipe"):
        aws_greengrass.publish_component(clients, built, "rotator-artifacts")


def test_publish_keeps_a_recipe_built_for_a_bucket_in_that_bucket(tmp_path: Path, aws: None) -> None:
    out = tmp_path / "build"
    build_component(PROJECT, out, name=COMPONENT, version="1.2.0", bucket="built-for")
    build = aws_greengrass.read_build(out)
    assert (build.name, build.version) == (COMPONENT, "1.2.0")
    assert aws_greengrass.resolve_bucket(build, None)[0] == "built-for"
    assert aws_greengrass.resolve_bucket(build, "built-for")[0] == "built-for"
    with pytest.raises(OperationError, match="names bucket 'built-for', not 'other-bucket'"):
        aws_greengrass.resolve_bucket(build, "other-bucket")


def test_publish_refuses_a_recipe_whose_artifact_is_not_built(built: Path) -> None:
    (built / "artifacts" / COMPONENT / "1.2.0" / "certrotator.zip").unlink()
    with pytest.raises(OperationError, match="is not in the build"):
        aws_greengrass.read_build(built)


def test_read_build_takes_a_json_recipe(tmp_path: Path) -> None:
    (tmp_path / "recipes").mkdir()
    recipe = {
        "ComponentName": "com.example.C",
        "ComponentVersion": "2.0.0",
        "Manifests": [{"Artifacts": [{"Uri": "s3://bkt-1/com.example.C/2.0.0/c.zip"}]}],
    }
    (tmp_path / "recipes" / "recipe.json").write_text(json.dumps(recipe, indent=2))
    artifact = tmp_path / "artifacts" / "com.example.C" / "2.0.0" / "c.zip"
    artifact.parent.mkdir(parents=True)
    artifact.write_bytes(b"zip")
    build = aws_greengrass.read_build(tmp_path)
    assert (build.name, build.version) == ("com.example.C", "2.0.0")
    assert build.artifacts == {"s3://bkt-1/com.example.C/2.0.0/c.zip": artifact}


# ------------------------------------------------------------------------------------------- check


class CheckStubs:
    """Stubbed iot (moto lacks describe_event_configurations), cloudformation and greengrassv2."""

    def __init__(self) -> None:
        self.iot = Stubber(boto3.client("iot", region_name=REGION))
        self.cfn = Stubber(boto3.client("cloudformation", region_name=REGION))
        self.gg = Stubber(boto3.client("greengrassv2", region_name=REGION))
        for stub in (self.iot, self.cfn, self.gg):
            stub.activate()

    def clients(self) -> AwsClients:
        return make_clients(iot=self.iot.client, cloudformation=self.cfn.client, greengrassv2=self.gg.client)

    def done(self) -> None:
        for stub in (self.iot, self.cfn, self.gg):
            stub.assert_no_pending_responses()
            stub.deactivate()

    def events(self, enabled: bool = True) -> None:
        self.iot.add_response(
            "describe_event_configurations", {"eventConfigurations": {"JOB_EXECUTION": {"Enabled": enabled}}}
        )

    def stack(
        self,
        status: str = "CREATE_COMPLETE",
        template_arn: str | None = TEMPLATE_ARN,
        issuer: str | None = None,
        seed: bool = False,
    ) -> None:
        """Our stack's outputs (the seed's stack has none)."""
        outputs = [{"OutputKey": "JobTemplateArn", "OutputValue": template_arn}] if template_arn else []
        if not seed:
            outputs.append({"OutputKey": "StateKeySecretArn", "OutputValue": "arn:aws:secretsmanager:key"})
        if issuer is not None:
            outputs.append({"OutputKey": "CertificateIssuer", "OutputValue": issuer})
        self.cfn.add_response(
            "describe_stacks",
            {
                "Stacks": [
                    {
                        "StackName": "AWSLabsCertificateRotator",
                        "CreationTime": datetime(2026, 1, 1, tzinfo=UTC),
                        "StackStatus": status,
                        "Outputs": outputs,
                    }
                ]
            },
            {"StackName": "AWSLabsCertificateRotator"},
        )

    def template(
        self, template: str = TEMPLATE, document: object = JOB_DOCUMENT, max_per_minute: int | None = 300
    ) -> None:
        answer: dict[str, Any] = {
            "jobTemplateArn": f"arn:aws:iot:{REGION}:{ACCOUNT}:jobtemplate/{template}",
            "jobTemplateId": template,
            "document": json.dumps(document),
            "timeoutConfig": {"inProgressTimeoutInMinutes": 5},
        }
        if max_per_minute is not None:
            answer["jobExecutionsRolloutConfig"] = {"maximumPerMinute": max_per_minute}
        self.iot.add_response("describe_job_template", answer, {"jobTemplateId": template})

    def rules(self, rules: list[dict[str, Any]] | None = None, sql: dict[str, str] | None = None) -> None:
        """list_topic_rules (our stack's three rules by default) and get_topic_rule for every enabled
        rule on job execution events, in order."""
        listed = OUR_RULES if rules is None else rules
        self.iot.add_response("list_topic_rules", {"rules": listed})
        for rule in listed:
            if rule["topicPattern"].startswith("$aws/events/jobExecution/") and not rule.get("ruleDisabled"):
                text = (sql or {}).get(rule["ruleName"], "SELECT * FROM '$aws/events/jobExecution/+/+'")
                self.iot.add_response(
                    "get_topic_rule",
                    {"rule": {"ruleName": rule["ruleName"], "sql": text}},
                    {"ruleName": rule["ruleName"]},
                )

    def group(
        self, latest: dict[str, Any] | None, devices: dict[str, str | None], recipe: str = OUR_RECIPE
    ) -> None:
        self.iot.add_response(
            "describe_thing_group",
            {"thingGroupName": "cores", "thingGroupArn": GROUP_ARN},
            {"thingGroupName": "cores"},
        )
        stub_latest(self.gg, latest)
        version = (latest or {}).get("components", {}).get(COMPONENT, {}).get("componentVersion")
        if version:
            self.gg.add_response(
                "get_component",
                {"recipeOutputFormat": "YAML", "recipe": recipe.encode()},
                {"arn": component_arn(version), "recipeOutputFormat": "YAML"},
            )
        self.gg.add_response(
            "list_core_devices",
            {"coreDevices": [{"coreDeviceThingName": name, "status": "HEALTHY"} for name in devices]},
            {"thingGroupArn": GROUP_ARN},
        )
        for name, version in devices.items():
            installed = (
                [{"componentName": "aws.greengrass.Nucleus", "componentVersion": version}] if version else []
            )
            self.gg.add_response(
                "list_installed_components",
                {"installedComponents": installed},
                {"coreDeviceThingName": name, "topologyFilter": "ALL"},
            )
            if not version:
                self.gg.add_response("get_core_device", {"coreDeviceThingName": name, "coreVersion": "2.5.6"})


@pytest.fixture
def stubs() -> Any:
    stubs = CheckStubs()
    yield stubs
    stubs.done()


def summary(checks: list[Check]) -> dict[str, str]:
    return {c.name: c.status.value for c in checks}


def test_check_a_ready_account(stubs: CheckStubs) -> None:
    stubs.events()
    stubs.stack(issuer="AWS IoT")
    stubs.template()
    stubs.rules()
    stubs.group(deployment(), {"core1": "2.12.0", "core2": "2.6.0"})
    checks = run_checks(stubs.clients(), thing_group="cores")
    assert summary(checks) == {
        "job execution events": "pass",
        "stack AWSLabsCertificateRotator": "pass",
        "job template AWSLabsCertificateRotator": "pass",
        "rotation rules": "pass",
        "interpolateComponentConfiguration (cores)": "pass",
        f"{COMPONENT} (cores)": "pass",
        "greengrassDataPlaneEndpoint (cores)": "skip",
        "Nucleus on core1": "pass",
        "Nucleus on core2": "pass",
    }
    assert not failed(checks)
    assert "1.0.0 deployed" in checks[4].detail


def test_check_reports_what_to_fix(stubs: CheckStubs) -> None:
    stubs.events(enabled=False)
    stubs.cfn.add_client_error(
        "describe_stacks", "ValidationError", "Stack with id AWSLabsCertificateRotator does not exist", 400
    )
    stubs.iot.add_client_error(
        "describe_job_template", "ResourceNotFoundException", "Job template not found", 404
    )
    stubs.rules([])
    checks = run_checks(stubs.clients())
    assert [c.status for c in checks] == [Status.FAIL] * 4
    assert "update-event-configurations" in checks[0].fix
    assert checks[1].detail == "not deployed in us-east-1" and "cdk deploy" in checks[1].fix
    assert "deploy the stack" in checks[2].fix
    assert "AWSLabsCertificateRotatorCreateCertificate does not answer" in checks[3].detail
    assert failed(checks)


def test_check_template_found_through_the_stack_output(stubs: CheckStubs) -> None:
    stubs.events()
    stubs.stack(
        status="UPDATE_ROLLBACK_COMPLETE", template_arn=f"arn:aws:iot:{REGION}:{ACCOUNT}:jobtemplate/Staging"
    )
    stubs.template("Staging", document={"operation": "OTHER"})
    stubs.rules()
    checks = run_checks(stubs.clients())
    assert summary(checks) == {
        "job execution events": "pass",
        "stack AWSLabsCertificateRotator": "pass",
        "job template Staging": "fail",
        "rotation rules": "pass",
    }
    assert "rolled back" in checks[1].detail


def test_check_stack_not_ready(stubs: CheckStubs) -> None:
    stubs.events()
    stubs.stack(status="UPDATE_IN_PROGRESS")
    stubs.template()
    stubs.rules()
    assert run_checks(stubs.clients())[1].status is Status.FAIL


def test_check_old_nucleus_and_unconfirmed_interpolation(stubs: CheckStubs) -> None:
    stubs.events()
    stubs.stack()
    stubs.template()
    stubs.rules()
    latest = deployment()
    del latest["components"]["aws.greengrass.Nucleus"]
    stubs.group(latest, {"core1": "2.5.6", "core2": None})
    checks = run_checks(stubs.clients(), thing_group="cores")
    assert summary(checks)["interpolateComponentConfiguration (cores)"] == "warn"
    assert summary(checks)["Nucleus on core1"] == "fail"
    assert summary(checks)["Nucleus on core2"] == "fail"  # from get_core_device's coreVersion
    assert "2.5.6 < 2.6.0" in next(c.detail for c in checks if c.name == "Nucleus on core1")


def test_check_access_denied_fails_that_check_only(stubs: CheckStubs) -> None:
    stubs.iot.add_client_error("describe_event_configurations", "AccessDeniedException", "no", 403)
    stubs.stack()
    stubs.template()
    stubs.rules()
    checks = run_checks(stubs.clients())
    assert [c.status for c in checks] == [Status.FAIL, Status.PASS, Status.PASS, Status.PASS]
    assert "access denied to DescribeEventConfigurations" in checks[0].detail


def test_check_missing_group_and_no_devices(stubs: CheckStubs) -> None:
    stubs.events()
    stubs.stack()
    stubs.template()
    stubs.rules()
    stubs.iot.add_client_error("describe_thing_group", "ResourceNotFoundException", "", 404)
    checks = run_checks(stubs.clients(), thing_group="cores")
    assert checks[-1].status is Status.FAIL and "thing group 'cores' does not exist" in checks[-1].detail


def test_check_group_without_visible_core_devices(stubs: CheckStubs) -> None:
    stubs.events()
    stubs.stack()
    stubs.template()
    stubs.rules()
    stubs.group(None, {})
    checks = run_checks(stubs.clients(), thing_group="cores")
    assert summary(checks)["interpolateComponentConfiguration (cores)"] == "fail"
    assert summary(checks)["core devices (cores)"] == "skip"


@pytest.mark.parametrize(
    ("update", "expected"),
    [
        ({"merge": NUCLEUS_MERGE}, True),
        ({"merge": '{"interpolateComponentConfiguration": "true"}'}, True),
        ({"merge": '{"interpolateComponentConfiguration": false}'}, False),
        ({"reset": ["/interpolateComponentConfiguration"]}, False),
        ({"merge": '{"logging": {}}'}, None),
        ({}, None),
    ],
)
def test_interpolation_setting(update: dict[str, Any], expected: bool | None) -> None:
    latest = {
        "components": {
            "aws.greengrass.Nucleus": {"componentVersion": "2.12.0", "configurationUpdate": update}
        }
    }
    assert aws_checks.interpolation_setting(latest) is expected


# ------------------------------------------------------------------------------------------- errors


def test_error_messages_are_one_line_and_actionable() -> None:
    assert "pass --region" in (error_message(NoRegionError()) or "")
    assert "no AWS credentials" in (error_message(NoCredentialsError()) or "")
    assert "--profile" in (error_message(ProfileNotFound(profile="x")) or "")
    denied = error_message(client_error("AccessDeniedException", "not authorized", "CreateJob", 403))
    assert (
        denied == "access denied to CreateJob: not authorized (the credentials in use need this permission)"
    )
    expired = error_message(client_error("ExpiredTokenException", "expired", "DescribeJob"))
    assert expired is not None and expired.startswith("AWS rejected the credentials (ExpiredTokenException)")
    assert error_message(ValueError("bug")) is None
    for message in (denied, expired):
        assert "\n" not in message


def test_clients_need_a_region(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.delenv("AWS_REGION")
    with pytest.raises(NoRegionError):
        AwsClients.from_session()
    assert AwsClients.from_session(region="eu-west-1").region == "eu-west-1"


def test_clients_are_made_once_and_identity_asked_once(aws: None) -> None:
    made: list[str] = []

    def factory(name: str) -> Any:
        made.append(name)
        return boto3.client(name, region_name=REGION)  # type: ignore[call-overload]

    clients = AwsClients(factory)
    assert clients.iot is clients.iot
    assert clients.identity() == (ACCOUNT, "aws") == clients.identity()
    assert made == ["iot", "sts"]
    assert moto_iot() is not None
