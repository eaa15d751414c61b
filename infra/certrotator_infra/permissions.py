"""Least-privilege IAM for the three functions and the scheduled reconcile, derived from the AWS calls
each makes (the reconcile role is checked against scheduled_handler's recorded calls,
tests/infra/test_reconcile_calls.py).

Which calls (src/certrotator/backend/handlers.py and backend/aws/*):

| call (IAM action)                                   | create | commit | terminal |
| --------------------------------------------------- | ------ | ------ | -------- |
| iot:DescribeEndpoint (data-plane endpoints)         | x      | x      | x        |
| secretsmanager:GetSecretValue (state key)           | x      | x      | x        |
| iotjobsdata:DescribeJobExecution (chain of custody) | x      | x      |          |
| iot:DescribeJobExecution (an execution that ended)  | x      | x      |          |
| iot:GetJobDocument (is it a rotation job?)          |        |        | x        |
| iot:ListThingPrincipals[V2] (exclusive principals)  | x      | x      |          |
| iot:DescribeCertificate (current cert, re-send)     | x      |        |          |
| iot:CreateCertificateFromCsr (AWS IoT issuer)       | x      |        |          |
| acm-pca:IssueCertificate/GetCertificate (Private CA)| x      |        |          |
| iot:RegisterCertificateWithoutCA (Private CA)       | x      |        |          |
| iot:ListAttachedPolicies, iot:AttachPolicy          | x      |        |          |
| iot:AttachThingPrincipal                            | x      |        |          |
| iot:Update/DeleteCertificate, DetachThingPrincipal  | x (withdraw) |  | x        |
| iot:GetThingShadow (rotation state)                 | x      | x      | x        |
| iot:UpdateThingShadow                               | x      | x      | x (mark terminated) |
| iot:DeleteThingShadow                               | x (undo) |      |          |
| iot:Publish (replies to the device)                 | create/* | commit/* |        |
| sns:Publish + kms:GenerateDataKey/Decrypt (notify)  | x (withdrawn) |  | x        |

The scheduled reconcile (`reconcile_grants`) lists every thing (iot:ListThings), reads each thing's
principals, active job executions (iot:ListJobExecutionsForThing), certificates, the documents of active
jobs, who holds a certificate the rotation state names (iot:ListPrincipalThings), the state shadow and the
announcement shadow; it retires a certificate as the terminal function does, deletes a leftover state
shadow, and notifies. It never writes the announcement shadow: the announcement rule does, with its own
role that may only publish to those shadows' update topics (ANNOUNCE_SHADOW_UPDATES).

The renewal function (`renewal_grants`) reads each thing's principals, certificates, job executions
and groups, the documents of jobs in its history and the job template, and creates rotation jobs from
that template (iot:CreateJob, authorised on the job, every target thing and the template); with the
Device Defender trigger it also lists an audit task's findings and the things holding the flagged
certificates. Checked against its recorded calls (tests/infra/test_renewal_calls.py).

Resource scoping follows the Service Authorization Reference: DescribeEndpoint, CreateCertificateFromCsr,
RegisterCertificateWithoutCA and ListAttachedPolicies support no resource-level permissions (`*`);
everything else is scoped to its resource type. Things, certificates and jobs are the whole fleet's
(any thing may be rotated, by any job), so those ARNs end in `*`; each such wildcard carries the reason
that goes into its cdk-nag acknowledgement. The notification topic is encrypted with the stack's own
KMS key (CloudWatch alarms cannot publish to a topic under the AWS managed key), so its publishers need
kms:GenerateDataKey and kms:Decrypt on that key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from aws_cdk import ArnFormat, Stack

from certrotator.compat import StrEnum
from certrotator.ops.reconcile.aws import ANNOUNCE_SHADOW_NAME

SHADOW_NAME: Final = "AWSLabsCertificateRotator"  # = certrotator.backend.aws.adapters.DEFAULT_SHADOW_NAME


class Function(StrEnum):
    CREATE = "CreateCertificate"
    COMMIT = "CommitCertificate"
    TERMINAL = "JobExecutionTerminal"


@dataclass(frozen=True, slots=True)
class IotResource:
    """An AWS IoT resource in the stack's account and region, e.g. "thing/*" or "cert/*"."""

    path: str

    def arn(self, stack: Stack) -> str:
        kind, _, name = self.path.partition("/")
        return stack.format_arn(
            service="iot", resource=kind, resource_name=name, arn_format=ArnFormat.SLASH_RESOURCE_NAME
        )

    def nag_name(self) -> str:
        """How cdk-nag prints the ARN in a finding id (tokens as <AWS::...>)."""
        return f"arn:<AWS::Partition>:iot:<AWS::Region>:<AWS::AccountId>:{self.path}"


ALL: Final = "*"  # a service that supports no resource-level permissions for the action


@dataclass(frozen=True, slots=True)
class Grant:
    """One policy statement. `resources` are IotResource paths, ALL, or ARNs/tokens given by the stack
    (the secret, the CA, the SNS topic). `wildcard_reason` justifies every `*` in `resources`."""

    sid: str
    actions: tuple[str, ...]
    resources: tuple[IotResource | str, ...]
    wildcard_reason: str = ""

    def has_wildcard(self) -> bool:
        return any(r == ALL or (isinstance(r, IotResource) and "*" in r.path) for r in self.resources)


THINGS: Final = IotResource("thing/*")
CERTIFICATES: Final = IotResource("cert/*")
JOBS: Final = IotResource("job/*")
STATE_SHADOWS: Final = IotResource(f"thing/*/{SHADOW_NAME}")
ANNOUNCE_SHADOWS: Final = IotResource(f"thing/*/{ANNOUNCE_SHADOW_NAME}")
# The announcement rule republishes to each thing's announcement shadow (the topic's thing level is `*`).
ANNOUNCE_SHADOW_UPDATES: Final = IotResource(f"topic/$aws/things/*/shadow/name/{ANNOUNCE_SHADOW_NAME}/update")

_ANY_THING: Final = (
    "any thing of the fleet may be in a rotation job, and the thing name is only known from the MQTT"
    " topic at run time"
)
_ANY_CERTIFICATE: Final = (
    "the certificates a rotation touches (the thing's current one, the newly issued one) are created and"
    " named at run time; their ids are not known when the stack is deployed"
)
_ANY_JOB: Final = (
    "rotation jobs are created by operators at run time (from the job template, or by hand); their ids"
    " are not known when the stack is deployed"
)
_ENDPOINTS: Final = (
    "iot:DescribeEndpoint supports no resource-level permissions (Service Authorization Reference); the"
    " functions look up the account's iot:Data-ATS and iot:Jobs endpoints once per container"
)


def _state_shadow(*actions: str, sid: str) -> Grant:
    return Grant(
        sid,
        tuple(f"iot:{a}ThingShadow" for a in actions),
        (STATE_SHADOWS,),
        f"only the rotator's named shadow '{SHADOW_NAME}' of each thing; {_ANY_THING}",
    )


def _reply_topics(request: str) -> Grant:
    replies = tuple(
        IotResource(f"topic/awslabs/things/*/certificate/{request}/{r}") for r in ("accepted", "rejected")
    )
    return Grant(
        f"Reply{request.capitalize()}",
        ("iot:Publish",),
        replies,
        f"only the {request} reply topics (accepted/rejected); the thing name in the topic is {_ANY_THING}",
    )


def function_grants(
    function: Function, *, secret_arn: str, topic_arn: str, topic_key_arn: str, ca_arn: str | None
) -> list[Grant]:
    """The statements of `function`'s role (AWS IoT issuer when `ca_arn` is None)."""
    grants = [
        Grant("DataPlaneEndpoints", ("iot:DescribeEndpoint",), (ALL,), _ENDPOINTS),
        Grant("StateKey", ("secretsmanager:GetSecretValue",), (secret_arn,)),
    ]
    notify = [
        Grant("Notify", ("sns:Publish",), (topic_arn,)),
        # SNS encrypts the message with a data key from the topic's KMS key, as the publisher.
        Grant("NotificationKey", ("kms:GenerateDataKey", "kms:Decrypt"), (topic_key_arn,)),
    ]
    custody = [
        Grant("ChainOfCustody", ("iotjobsdata:DescribeJobExecution",), (THINGS,), _ANY_THING),
        # The data plane may refuse an execution that has ended (TerminalStateException): the control
        # plane then tells its status.
        Grant(
            "EndedExecution",
            ("iot:DescribeJobExecution",),
            (THINGS, JOBS),
            f"{_ANY_THING}; {_ANY_JOB}",
        ),
        # The API reference names iot:ListThingPrincipals as the permission ListThingPrincipalsV2
        # needs, while the Service Authorization Reference also lists iot:ListThingPrincipalsV2: both,
        # on the same resources, so either reading authorises the call.
        Grant(
            "ThingPrincipals",
            ("iot:ListThingPrincipals", "iot:ListThingPrincipalsV2"),
            (THINGS,),
            _ANY_THING,
        ),
    ]
    remove_certificate = Grant(
        "RemoveCertificate",
        ("iot:UpdateCertificate", "iot:DetachThingPrincipal", "iot:DeleteCertificate"),
        (CERTIFICATES,),
        _ANY_CERTIFICATE,
    )
    if function is Function.CREATE:
        if ca_arn is None:
            issuer = [
                Grant(
                    "IssueWithAwsIot",
                    ("iot:CreateCertificateFromCsr",),
                    (ALL,),
                    "iot:CreateCertificateFromCsr supports no resource-level permissions (Service"
                    " Authorization Reference)",
                )
            ]
        else:
            issuer = [
                Grant(
                    "IssueWithPrivateCa", ("acm-pca:IssueCertificate", "acm-pca:GetCertificate"), (ca_arn,)
                ),
                Grant(
                    "RegisterPrivateCaCertificate",
                    ("iot:RegisterCertificateWithoutCA",),
                    (ALL,),
                    "iot:RegisterCertificateWithoutCA supports no resource-level permissions (Service"
                    " Authorization Reference)",
                ),
            ]
        return [
            *grants,
            *custody,
            Grant("ReadCertificate", ("iot:DescribeCertificate",), (CERTIFICATES,), _ANY_CERTIFICATE),
            *issuer,
            Grant(
                "ReadCertificatePolicies",
                ("iot:ListAttachedPolicies",),
                (ALL,),
                "iot:ListAttachedPolicies supports no resource-level permissions (Service Authorization"
                " Reference); the new certificate gets the policies of the current one",
            ),
            Grant(
                "SetUpNewCertificate",
                ("iot:AttachPolicy", "iot:AttachThingPrincipal"),
                (CERTIFICATES,),
                f"{_ANY_CERTIFICATE}; the policies attached are those the thing's current certificate"
                " already has",
            ),
            remove_certificate,
            _state_shadow("Get", "Update", "Delete", sid="RotationState"),
            _reply_topics("create"),
            *notify,  # a certificate withdrawn because the execution ended while it was being created
        ]
    if function is Function.COMMIT:
        return [
            *grants,
            *custody,
            _state_shadow("Get", "Update", sid="RotationState"),
            _reply_topics("commit"),
        ]
    return [
        *grants,
        Grant(
            "RotationJobs",
            ("iot:GetJobDocument",),
            (JOBS,),
            f"the terminal rule forwards every job's execution events; the function reads a job's document"
            f" (once per job and container) to tell rotations from other jobs; {_ANY_JOB}",
        ),
        remove_certificate,
        _state_shadow("Get", "Update", sid="RotationState"),
        *notify,
    ]


def reconcile_grants(*, secret_arn: str, topic_arn: str, topic_key_arn: str) -> list[Grant]:
    """The statements of the scheduled reconcile's role: the calls of certrotator.ops.reconcile.aws
    (facts per thing, then retiring through the backend's IotRegistry and ShadowStateStore, notifying
    through SnsNotifier). It only reads the announcement shadow, and only reads or deletes the state
    shadow (clearing a leftover state deletes it); STS GetCallerIdentity needs no permission."""
    return [
        Grant("DataPlaneEndpoints", ("iot:DescribeEndpoint",), (ALL,), _ENDPOINTS),
        Grant("StateKey", ("secretsmanager:GetSecretValue",), (secret_arn,)),
        Grant(
            "EveryThing",
            ("iot:ListThings",),
            (ALL,),
            "iot:ListThings supports no resource-level permissions (Service Authorization Reference);"
            " the scheduled reconcile looks at every thing of the account",
        ),
        Grant(
            "ThingFacts",
            ("iot:ListThingPrincipals", "iot:ListThingPrincipalsV2", "iot:ListJobExecutionsForThing"),
            (THINGS,),
            f"reconcile reads each thing's certificates and active job executions; {_ANY_THING}",
        ),
        Grant(
            "RotationJobs",
            ("iot:GetJobDocument",),
            (JOBS,),
            f"reconcile reads the document of each active job (once per run) to tell rotations from other"
            f" jobs; {_ANY_JOB}",
        ),
        Grant("ReadCertificate", ("iot:DescribeCertificate",), (CERTIFICATES,), _ANY_CERTIFICATE),
        Grant(
            "CertificateOwners",
            ("iot:ListPrincipalThings",),
            (ALL,),
            "iot:ListPrincipalThings is granted on all resources: the Service Authorization Reference gives"
            " it no resource type; reconcile asks which thing holds a certificate the rotation state names"
            " but this thing does not, so it never retires another thing's certificate",
        ),
        Grant(
            "RemoveCertificate",
            ("iot:UpdateCertificate", "iot:DetachThingPrincipal", "iot:DeleteCertificate"),
            (CERTIFICATES,),
            f"the certificate reconcile retires (the one the device is proven not to use); {_ANY_CERTIFICATE}",
        ),
        _state_shadow("Get", "Delete", sid="RotationState"),
        Grant(
            "Announcements",
            ("iot:GetThingShadow",),
            (ANNOUNCE_SHADOWS,),
            f"only the announcement shadow '{ANNOUNCE_SHADOW_NAME}' of each thing (the evidence of the"
            f" certificate a device uses); {_ANY_THING}",
        ),
        Grant("Notify", ("sns:Publish",), (topic_arn,)),
        Grant("NotificationKey", ("kms:GenerateDataKey", "kms:Decrypt"), (topic_key_arn,)),
    ]


def renewal_grants(*, template: IotResource, audit_findings: bool) -> list[Grant]:
    """The statements of the renewal function's role: the calls of certrotator.ops.schedule.aws (facts
    per thing, then ops.aws.jobs.create_job from the stack's job template), and with the audit trigger
    the findings of an audit and the things that hold the flagged certificates. It creates jobs and
    nothing else: no certificate, shadow or topic is touched."""
    grants = [
        Grant(
            "EveryThing",
            ("iot:ListThings",),
            (ALL,),
            "iot:ListThings supports no resource-level permissions (Service Authorization Reference);"
            " a scheduled run looks at every thing of the account",
        ),
        Grant(
            "GroupMembers",
            ("iot:ListThingsInThingGroup",),
            (IotResource("thinggroup/*"),),
            "iot:ListThingsInThingGroup on the thing group the renewal policy names (group=...); the"
            " policy is the function's configuration, so any group of the account may be named",
        ),
        Grant(
            "ThingFacts",
            (
                "iot:ListThingPrincipals",
                "iot:ListThingPrincipalsV2",
                "iot:ListJobExecutionsForThing",
                "iot:ListThingGroupsForThing",
                "iot:DescribeThing",
            ),
            (THINGS,),
            "renewal reads each thing's certificates, job executions (its rotation history) and groups,"
            f" and iot:DescribeThing gives create_job the thing's ARN; {_ANY_THING}",
        ),
        Grant("ReadCertificate", ("iot:DescribeCertificate",), (CERTIFICATES,), _ANY_CERTIFICATE),
        Grant(
            "RotationJobs",
            ("iot:GetJobDocument",),
            (JOBS,),
            f"renewal reads the document of each job in a thing's history (once per run) to tell rotations"
            f" from other jobs; {_ANY_JOB}",
        ),
        Grant("JobTemplate", ("iot:DescribeJobTemplate",), (template,)),
        Grant(
            "CreateRotationJobs",
            ("iot:CreateJob",),
            (JOBS, THINGS, template),
            "iot:CreateJob is authorised on the new job, each target thing and the template; the job ids"
            f" are made at run time and the targets are whichever things are due; {_ANY_THING}",
        ),
    ]
    if audit_findings:
        grants += [
            Grant(
                "AuditFindings",
                ("iot:ListAuditFindings",),
                (ALL,),
                "iot:ListAuditFindings requires * (Device Defender's audit permissions, Service"
                " Authorization Reference); renewal reads the findings of the audit task the notification"
                " names, for the expiring-certificate check only",
            ),
            Grant(
                "CertificateOwners",
                ("iot:ListPrincipalThings",),
                (ALL,),
                "iot:ListPrincipalThings is granted on all resources: the Service Authorization Reference"
                " gives it no resource type; renewal asks which thing holds each flagged certificate",
            ),
        ]
    return grants
