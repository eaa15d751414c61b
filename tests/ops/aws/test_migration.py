"""`certrotator aws check` on an account that runs, or ran, the seed: its stack, its rules, its component;
Private CA devices' data plane endpoint; the rollout ceiling the AWS quotas allow, and the templates
(AWS and local) that must keep to it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from certrotator.local.jobs import DEFAULT_CONFIG
from certrotator.ops.aws import quotas
from certrotator.ops.aws.checks import check_data_plane, run_checks
from certrotator.ops.aws.checks_model import Check, Status, failed
from certrotator.ops.aws.migration import is_seed_recipe
from certrotator.ops.component.build import build_component

from .conftest import ACCOUNT, REGION, TEMPLATE
from .test_jobs import COMPONENT, OUR_RULES, PROJECT, CheckStubs, deployment

PCA_ARN = f"arn:aws:acm-pca:{REGION}:{ACCOUNT}:certificate-authority/0123abcd-4567-89ef-0123-456789abcdef"
# What the seed's component recipe says (aws-greengrass-labs-certificate-rotator 1.2.0), in short.
SEED_RECIPE = """\
ComponentName: aws.greengrass.labs.CertificateRotator
ComponentVersion: '1.2.0'
Manifests:
- Platform:
    os: linux
  Lifecycle:
    Install:
      Script: python3 -m venv venv && . venv/bin/activate && pip3 install -r requirements.txt
    Run:
      RequiresPrivilege: true
      Script: . venv/bin/activate && python3 -u {artifacts:decompressedPath}/certificate-rotator/main.py
  Artifacts:
  - Uri: s3://bucket/aws.greengrass.labs.CertificateRotator/1.2.0/certificate-rotator.zip
"""
SEED_TERMINAL_SQL = (
    "SELECT * FROM '$aws/events/jobExecution/#' WHERE isUndefined(statusDetails.CertificateRotator) = false"
)


@pytest.fixture
def stubs() -> Any:
    stubs = CheckStubs()
    yield stubs
    stubs.done()


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


# ------------------------------------------------------------------------------------ quotas, templates


def test_the_rollout_ceiling_comes_from_the_quotas_a_rotation_uses() -> None:
    # UpdateCertificate and DeleteCertificate (10/s, once each per rotation) are the slowest; half of
    # them is the account's.
    assert quotas.rotations_per_second() == 5.0
    assert quotas.rollout_ceiling_per_minute() == 300
    assert quotas.rollout_ceiling_per_minute(share=1.0) == 600
    assert quotas.lambda_concurrency(300) == 30
    worst = quotas.lambda_concurrency(300, quotas.FUNCTION_SECONDS_WORST)  # a Private CA polled 60 s
    assert worst == 315 and worst < quotas.LAMBDA_CONCURRENCY / 2


def test_the_local_and_the_aws_templates_keep_to_the_ceiling() -> None:
    assert DEFAULT_CONFIG.max_per_minute == quotas.rollout_ceiling_per_minute()
    pytest.importorskip("aws_cdk")
    os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
    infra = str(PROJECT / "infra")
    if infra not in sys.path:
        sys.path.append(infra)
    from certrotator_infra.stack import ROLLOUT_CONFIG, TIMEOUT_CONFIG  # type: ignore[import-not-found]

    assert {
        "ExponentialRolloutRate": {
            "BaseRatePerMinute": DEFAULT_CONFIG.base_rate_per_minute,
            "IncrementFactor": DEFAULT_CONFIG.increment_factor,
            "RateIncreaseCriteria": {"NumberOfSucceededThings": DEFAULT_CONFIG.succeeded_per_increase},
        },
        "MaximumPerMinute": DEFAULT_CONFIG.max_per_minute,
    } == ROLLOUT_CONFIG
    assert DEFAULT_CONFIG.in_progress_timeout_s == TIMEOUT_CONFIG["InProgressTimeoutInMinutes"] * 60


@pytest.mark.parametrize(
    ("most", "status"), [(100, Status.PASS), (300, Status.PASS), (1000, Status.WARN), (None, Status.WARN)]
)
def test_check_compares_the_templates_rollout_with_the_ceiling(
    stubs: CheckStubs, most: int | None, status: Status
) -> None:
    stubs.events()
    stubs.stack()
    stubs.template(max_per_minute=most)
    stubs.rules()
    template = by_name(run_checks(stubs.clients()))[f"job template {TEMPLATE}"]
    assert template.status is status
    if status is Status.WARN:
        assert "300 a minute" in template.detail and "--max-per-minute 300" in template.fix


# ------------------------------------------------------------------------------------------- the seed


def test_a_seed_account_is_recognised_and_told_what_to_do(stubs: CheckStubs, tmp_path: Path) -> None:
    """The seed's stack (same name, no outputs), its template (100/min), its rules (the terminal one
    filtering on statusDetails) and its component on the group."""
    stubs.events()
    stubs.stack(template_arn=None, seed=True)
    stubs.template(max_per_minute=100)
    seed_rules = [{**r} for r in OUR_RULES[:3]]
    seed_rules[2]["topicPattern"] = "$aws/events/jobExecution/#"
    stubs.rules(seed_rules, {f"{TEMPLATE}JobExecutionTerminal": SEED_TERMINAL_SQL})
    seed_deployment = deployment()
    seed_deployment["components"][COMPONENT]["componentVersion"] = "1.2.0"
    stubs.group(seed_deployment, {"core1": "2.12.0"}, recipe=SEED_RECIPE)
    checks = by_name(run_checks(stubs.clients(), thing_group="cores"))
    stack = checks[f"stack {TEMPLATE}"]
    assert stack.status is Status.FAIL and "the seed's stack" in stack.detail
    assert "Switching from the seed" in stack.fix and "same name" in stack.fix
    assert checks[f"job template {TEMPLATE}"].status is Status.PASS
    rules = checks["rotation rules"]
    assert rules.status is Status.FAIL and "the seed's terminal rule" in rules.detail
    component = checks[f"{COMPONENT} (cores)"]
    assert component.status is Status.WARN and "1.2.0 is the seed's component" in component.detail
    assert "certrotator aws deploy-component 2.0.0 --thing-group cores" in component.fix
    assert failed(list(checks.values()))


@pytest.mark.parametrize(
    ("rules", "status", "words"),
    [
        (OUR_RULES, Status.PASS, "only AWSLabsCertificateRotator's rules"),
        (  # the seed's stack left in place beside this one deployed under another name
            [
                *OUR_RULES,
                {"ruleName": "SeedCreateCertificate", "topicPattern": "awslabs/things/+/certificate/create"},
            ],
            Status.FAIL,
            "SeedCreateCertificate (create)",
        ),
        (  # the same, disabled: harmless
            [
                *OUR_RULES,
                {
                    "ruleName": "SeedCreateCertificate",
                    "topicPattern": "awslabs/things/+/certificate/create",
                    "ruleDisabled": True,
                },
            ],
            Status.PASS,
            "only",
        ),
        (
            [{**OUR_RULES[0], "ruleDisabled": True}, *OUR_RULES[1:]],
            Status.FAIL,
            "AWSLabsCertificateRotatorCreateCertificate does not answer awslabs/things/+/certificate/create",
        ),
    ],
)
def test_check_rotation_rules(
    stubs: CheckStubs, rules: list[dict[str, Any]], status: Status, words: str
) -> None:
    stubs.events()
    stubs.stack()
    stubs.template()
    stubs.rules(rules)
    found = by_name(run_checks(stubs.clients()))["rotation rules"]
    assert found.status is status and words in found.detail, found


def test_the_component_check_tells_the_seeds_recipe_from_ours(tmp_path: Path) -> None:
    built = build_component(PROJECT, tmp_path / "build", version="2.0.0")
    assert not is_seed_recipe(built.recipe.read_text())
    assert is_seed_recipe(SEED_RECIPE)


def test_check_component_missing_from_the_group(stubs: CheckStubs) -> None:
    stubs.events()
    stubs.stack()
    stubs.template()
    stubs.rules()
    latest = deployment()
    del latest["components"][COMPONENT]
    stubs.group(latest, {})
    component = by_name(run_checks(stubs.clients(), thing_group="cores"))[f"{COMPONENT} (cores)"]
    assert component.status is Status.WARN and "not in the group's latest deployment" in component.detail


# ------------------------------------------------------------------------------ Private CA data plane


def nucleus(merge: dict[str, Any] | None = None, reset: list[str] | None = None) -> dict[str, Any]:
    update: dict[str, Any] = {}
    if merge is not None:
        update["merge"] = json.dumps(merge)
    if reset is not None:
        update["reset"] = reset
    return {
        "components": {
            "aws.greengrass.Nucleus": {"componentVersion": "2.12.0", "configurationUpdate": update}
        }
    }


@pytest.mark.parametrize(
    ("issuer", "latest", "status"),
    [
        (PCA_ARN, nucleus({"greengrassDataPlaneEndpoint": "iotdata"}), Status.PASS),
        (PCA_ARN, nucleus({"interpolateComponentConfiguration": True}), Status.WARN),
        (PCA_ARN, nucleus({"greengrassDataPlaneEndpoint": "greengrass"}), Status.FAIL),
        (PCA_ARN, nucleus(reset=["/greengrassDataPlaneEndpoint"]), Status.FAIL),
        ("AWS IoT", nucleus(), Status.SKIP),
        (None, nucleus({"greengrassDataPlaneEndpoint": "iotdata"}), Status.SKIP),
    ],
)
def test_private_ca_devices_need_the_iot_data_endpoint(
    issuer: str | None, latest: dict[str, Any], status: Status
) -> None:
    found = check_data_plane("cores", latest, issuer)
    assert found.status is status, found
    if status in (Status.WARN, Status.FAIL):
        assert '"greengrassDataPlaneEndpoint": "iotdata"' in found.fix


def test_check_reads_the_issuer_from_the_stack(stubs: CheckStubs) -> None:
    stubs.events()
    stubs.stack(issuer=PCA_ARN)
    stubs.template()
    stubs.rules()
    stubs.group(deployment(), {})
    found = by_name(run_checks(stubs.clients(), thing_group="cores"))["greengrassDataPlaneEndpoint (cores)"]
    assert found.status is Status.WARN and "refuses certificates from AWS Private CA" in found.detail
