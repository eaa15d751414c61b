"""`certrotator aws check`: is this account ready to rotate? Each check says what it saw and, when it
fails, what to do. A check that AWS refuses to answer (access denied) fails on its own; the others
still run. Missing credentials or region stop everything (the CLI reports them)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import partial
from typing import Any, Final

from botocore.exceptions import ClientError

from certrotator.ops.aws import migration, quotas
from certrotator.ops.aws.checks_model import Check, Status
from certrotator.ops.aws.clients import (
    ACCESS_DENIED_CODES,
    AwsClients,
    OperationError,
    error_code,
    is_not_found,
    thing_group_arn,
)
from certrotator.ops.aws.greengrass import DEFAULT_COMPONENT, NUCLEUS, latest_deployment
from certrotator.ops.aws.jobs import document_of
from certrotator.protocol import JOB_DOCUMENT

DEFAULT_STACK: Final = "AWSLabsCertificateRotator"
MIN_NUCLEUS: Final = (2, 6, 0)
INTERPOLATE: Final = "interpolateComponentConfiguration"
# Stack statuses in which the stack's resources are in place (an update that rolled back left the
# previous, working version).
READY_STACK_STATUSES: Final = frozenset(
    {"CREATE_COMPLETE", "UPDATE_COMPLETE", "UPDATE_ROLLBACK_COMPLETE", "IMPORT_COMPLETE"}
)
DEFAULT_MAX_DEVICES: Final = 50
ENABLE_EVENTS: Final = (
    'aws iot update-event-configurations --event-configurations \'{"JOB_EXECUTION":{"Enabled":true}}\''
)
SET_INTERPOLATE: Final = (
    f'deploy {NUCLEUS} to the group with configurationUpdate merge {{"{INTERPOLATE}": true}}'
)
DATA_PLANE: Final = "greengrassDataPlaneEndpoint"
SET_DATA_PLANE: Final = (
    f'deploy {NUCLEUS} to the group with configurationUpdate merge {{"{DATA_PLANE}": "iotdata"}}'
)
# The stack's output naming what issues certificates: "AWS IoT" or the Private CA's ARN.
ISSUER_OUTPUT: Final = "CertificateIssuer"


def _guarded(name: str, run: Callable[[], list[Check]]) -> list[Check]:
    """A refused or failed AWS call fails this check only."""
    try:
        return run()
    except OperationError as exc:
        return [Check(name, Status.FAIL, str(exc))]
    except ClientError as exc:
        message = exc.response.get("Error", {}).get("Message") or error_code(exc)
        if error_code(exc) in ACCESS_DENIED_CODES:
            return [
                Check(name, Status.FAIL, f"access denied to {exc.operation_name}", "grant that permission")
            ]
        return [Check(name, Status.FAIL, f"{exc.operation_name}: {message}")]


def run_checks(
    clients: AwsClients,
    stack: str = DEFAULT_STACK,
    thing_group: str | None = None,
    max_devices: int = DEFAULT_MAX_DEVICES,
) -> list[Check]:
    checks = _guarded("job execution events", lambda: [check_job_events(clients)])
    outputs: dict[str, str] = {}
    checks += _guarded(f"stack {stack}", lambda: [check_stack(clients, stack, outputs)])
    template = _template_id(outputs.get("JobTemplateArn"), stack)
    checks += _guarded(f"job template {template}", lambda: [check_template(clients, template)])
    checks += _guarded("rotation rules", lambda: [migration.check_rules(clients, stack)])
    if thing_group is not None:
        checks += check_group(clients, thing_group, max_devices, outputs.get(ISSUER_OUTPUT))
    return checks


def check_job_events(clients: AwsClients) -> Check:
    configurations = clients.iot.describe_event_configurations().get("eventConfigurations", {})
    if configurations.get("JOB_EXECUTION", {}).get("Enabled"):
        return Check("job execution events", Status.PASS, "JOB_EXECUTION events are enabled")
    return Check(
        "job execution events",
        Status.FAIL,
        "JOB_EXECUTION events are disabled: the terminal function never runs, old certificates stay "
        "attached and the next rotation of each device fails",
        f"{ENABLE_EVENTS} (the stack's custom resource does this on deploy)",
    )


def check_stack(clients: AwsClients, stack: str, outputs: dict[str, str]) -> Check:
    name = f"stack {stack}"
    deploy = "deploy it: cd infra && npx cdk deploy (see infra/README.md)"
    try:
        described = clients.cloudformation.describe_stacks(StackName=stack)["Stacks"][0]
    except ClientError as exc:
        if error_code(exc) == "ValidationError" and "does not exist" in str(exc):
            return Check(name, Status.FAIL, f"not deployed in {clients.region}", deploy)
        raise
    status = described["StackStatus"]
    outputs.update(
        {o["OutputKey"]: o["OutputValue"] for o in described.get("Outputs", []) if "OutputKey" in o}
    )
    if status in READY_STACK_STATUSES and migration.is_seed_stack(outputs):
        return migration.seed_stack_check(name, status)
    if status in READY_STACK_STATUSES:
        note = " (its last update rolled back)" if "ROLLBACK" in status else ""
        return Check(name, Status.PASS, f"{status}{note}")
    if status.endswith("_IN_PROGRESS"):
        return Check(name, Status.FAIL, f"{status}", "wait for the operation to finish and check again")
    return Check(name, Status.FAIL, status, f"see the stack's events in CloudFormation, then {deploy}")


def _template_id(arn: str | None, stack: str) -> str:
    # The stack names its job template after itself, and exports its ARN.
    return arn.rsplit("/", 1)[-1] if arn and "jobtemplate/" in arn else stack


def check_template(clients: AwsClients, template: str) -> Check:
    name = f"job template {template}"
    try:
        described = clients.iot.describe_job_template(jobTemplateId=template)
    except ClientError as exc:
        if is_not_found(exc):
            return Check(name, Status.FAIL, "does not exist", "deploy the stack (it creates the template)")
        raise
    document = document_of(dict(described))
    if document != JOB_DOCUMENT:
        return Check(
            name,
            Status.FAIL,
            f"document is {json.dumps(document)}, not {json.dumps(JOB_DOCUMENT)}",
            "redeploy the stack, or create jobs from a template with the rotation document",
        )
    timeout = described.get("timeoutConfig", {}).get("inProgressTimeoutInMinutes")
    suffix = f", in-progress timeout {timeout} min" if timeout else ""
    rollout = described.get("jobExecutionsRolloutConfig", {})
    ceiling = quotas.rollout_ceiling_per_minute()
    most = rollout.get("maximumPerMinute")
    if most is None or most > ceiling:
        releases = f"up to {most}" if most is not None else "with no ceiling of its own (AWS: up to 1,000)"
        return Check(
            name,
            Status.WARN,
            f"rotation document{suffix}; it releases {releases} executions a minute, more than the "
            f"{ceiling} a minute the AWS quotas a rotation uses allow (infra/README.md, 'Rollout and quotas')",
            f"redeploy the stack (its template stops at {ceiling}), or pass --max-per-minute {ceiling} "
            "when creating jobs",
        )
    return Check(name, Status.PASS, f"rotation document{suffix}, at most {most} executions a minute")


# ------------------------------------------------------------------------------------ core devices


def nucleus_version(text: str) -> tuple[int, int, int] | None:
    match = re.match(r"^(\d+)\.(\d+)\.(\d+)", text)
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


_RESET: Final = object()  # the deployment resets the key to the nucleus's default


def nucleus_setting(deployment: dict[str, Any], key: str) -> object:
    """What the deployment's Nucleus configurationUpdate does to `key`: its merged value, _RESET, or
    None when it says nothing (an earlier deployment or the device's own config may have set it)."""
    update = deployment.get("components", {}).get(NUCLEUS, {}).get("configurationUpdate", {})
    try:
        merge = json.loads(update.get("merge") or "{}")
    except ValueError:
        merge = {}
    if isinstance(merge, dict) and key in merge:
        return merge[key]
    if any(path in ("", f"/{key}") for path in update.get("reset", [])):
        return _RESET
    return None


def interpolation_setting(deployment: dict[str, Any]) -> bool | None:
    """True/False when the deployment's Nucleus configurationUpdate sets (or resets) it; None when it
    says nothing (an earlier deployment or the device's own config may have set it)."""
    setting = nucleus_setting(deployment, INTERPOLATE)
    if setting is None:
        return None
    return setting in (True, "true")  # reset: its default, which is off


def check_group(clients: AwsClients, group: str, max_devices: int, issuer: str | None = None) -> list[Check]:
    """The group's latest deployment enables interpolation, runs this project's component (and, with a
    Private CA issuing, uses the IoT data endpoint); its core devices run Nucleus >= 2.6.0."""
    found: list[str] = []
    checks = _guarded(f"thing group {group}", lambda: _find_group(clients, group, found))
    if not found:
        return checks
    group_arn = found[0]
    deployments: list[dict[str, Any] | None] = []
    checks += _guarded(
        f"{INTERPOLATE} ({group})", lambda: [_check_deployment(clients, group, group_arn, deployments)]
    )
    if deployments and deployments[0] is not None:
        deployment = deployments[0]
        checks += _guarded(
            f"{DEFAULT_COMPONENT} ({group})",
            lambda: [migration.check_component(clients, group, group_arn, deployment)],
        )
        checks.append(check_data_plane(group, deployment, issuer))
    checks += _guarded(
        f"core devices ({group})", lambda: _check_devices(clients, group, group_arn, max_devices)
    )
    return checks


def _find_group(clients: AwsClients, group: str, found: list[str]) -> list[Check]:
    found.append(thing_group_arn(clients, group))
    return []


def _check_deployment(
    clients: AwsClients, group: str, group_arn: str, found: list[dict[str, Any] | None]
) -> Check:
    name = f"{INTERPOLATE} ({group})"
    deployment = latest_deployment(clients, group_arn)
    found.append(deployment)
    if deployment is None:
        return Check(name, Status.FAIL, f"no Greengrass deployment targets {group}", SET_INTERPOLATE)
    setting = interpolation_setting(deployment)
    ours = deployment.get("components", {}).get(DEFAULT_COMPONENT, {}).get("componentVersion")
    deployed = f"; {DEFAULT_COMPONENT} {ours} deployed" if ours else ""
    if setting is True:
        return Check(name, Status.PASS, f"enabled by the latest deployment{deployed}")
    if setting is False:
        return Check(name, Status.FAIL, f"disabled by the latest deployment{deployed}", SET_INTERPOLATE)
    return Check(
        name,
        Status.WARN,
        "not set by the group's latest deployment: if nothing else set it, the component cannot "
        f"subscribe and rotation jobs stay QUEUED{deployed}",
        SET_INTERPOLATE,
    )


def check_data_plane(group: str, deployment: dict[str, Any], issuer: str | None) -> Check:
    """With a Private CA issuing, Greengrass must use the IoT data endpoint for its data plane: the
    backend registers those certificates without a CA, which AWS IoT recognises only on the account's
    own endpoint (by SNI); the shared Greengrass endpoint refuses them, so deployments stop reaching a
    device after its first rotation."""
    name = f"{DATA_PLANE} ({group})"
    if not issuer:
        return Check(
            name,
            Status.SKIP,
            f"the stack does not say which CA issues (no {ISSUER_OUTPUT} output: redeploy it); with AWS "
            f"Private CA the group needs {DATA_PLANE}: iotdata",
        )
    if not issuer.startswith("arn:"):
        return Check(name, Status.SKIP, f"{issuer} issues the certificates: the default endpoint works")
    setting = nucleus_setting(deployment, DATA_PLANE)
    if setting == "iotdata":
        return Check(name, Status.PASS, "iotdata, as certificates from AWS Private CA need")
    detail = (
        "not set by the group's latest deployment: unless the devices' own configuration sets it, "
        "Greengrass uses its own data endpoint, which refuses certificates from AWS Private CA"
        if setting is None
        else f"{'reset to the default' if setting is _RESET else repr(setting)}: Greengrass's own data "
        "endpoint refuses certificates from AWS Private CA"
    )
    status = Status.WARN if setting is None else Status.FAIL
    return Check(
        name,
        status,
        f"{detail} (deployments stop reaching a device after its first rotation)",
        SET_DATA_PLANE,
    )


def _check_devices(clients: AwsClients, group: str, group_arn: str, max_devices: int) -> list[Check]:
    gg = clients.greengrass
    devices: list[dict[str, Any]] = []
    token: str | None = None
    while len(devices) <= max_devices:
        kwargs: dict[str, Any] = {"thingGroupArn": group_arn}
        if token:
            kwargs["nextToken"] = token
        page = gg.list_core_devices(**kwargs)
        devices += [dict(d) for d in page.get("coreDevices", [])]
        token = page.get("nextToken")
        if not token:
            break
    if not devices:
        return [Check(f"core devices ({group})", Status.SKIP, "none visible in the group")]
    checks: list[Check] = []
    for device in devices[:max_devices]:
        thing = str(device["coreDeviceThingName"])
        checks += _guarded(f"Nucleus on {thing}", partial(_check_nucleus, clients, thing))
    if len(devices) > max_devices or token:
        checks.append(
            Check(f"core devices ({group})", Status.SKIP, f"only the first {max_devices} were checked")
        )
    return checks


def _check_nucleus(clients: AwsClients, thing: str) -> list[Check]:
    name = f"Nucleus on {thing}"
    versions: list[str] = []
    token: str | None = None
    while not versions:
        kwargs: dict[str, Any] = {"coreDeviceThingName": thing, "topologyFilter": "ALL"}
        if token:
            kwargs["nextToken"] = token
        page = clients.greengrass.list_installed_components(**kwargs)
        versions = [
            c.get("componentVersion", "")
            for c in page.get("installedComponents", [])
            if c.get("componentName") == NUCLEUS
        ]
        token = page.get("nextToken")
        if not token:
            break
    if not versions:  # not reported as a component: the device's own report of its core version
        versions = [clients.greengrass.get_core_device(coreDeviceThingName=thing).get("coreVersion", "")]
    text = versions[0]
    parsed = nucleus_version(text)
    minimum = ".".join(map(str, MIN_NUCLEUS))
    if parsed is None:
        return [Check(name, Status.WARN, f"version unknown ({text or 'not reported'})")]
    if parsed < MIN_NUCLEUS:
        return [Check(name, Status.FAIL, f"{text} < {minimum}", f"deploy {NUCLEUS} {minimum} or later")]
    return [Check(name, Status.PASS, f"{text} ≥ {minimum}")]
