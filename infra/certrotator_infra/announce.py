"""The announcement rule: the evidence `certrotator reconcile` weighs to tell which certificate a device
really uses.

A device agent publishes `awslabs/things/{thing}/certificate/announce` once its credentials are settled.
The rule (SQL from certrotator.ops.reconcile.aws, so reconcile and the stack cannot disagree) adds what
only the broker knows, the connection's principal() and clientid() and the time, and republishes that as
`state.reported` to the thing's announcement shadow. The device cannot forge the principal; it could
write the shadow itself where its IoT policy lets it update its shadows, which infra/README.md tells
operators to deny.

A republish action may target a reserved topic when its `$` is doubled (AWS IoT developer guide,
"Republish": `$$aws/things/MyThing/shadow/update`); the IAM resource of the publish is the topic itself,
with one `$`. Reserved job topics cannot be republished to; shadow topics can.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from aws_cdk import Aws, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_iot as iot
from constructs import IConstruct

from certrotator.ops.reconcile.aws import ANNOUNCE_RULE_SQL, ANNOUNCE_SHADOW_NAME
from certrotator.protocol import Topics
from certrotator_infra.permissions import ANNOUNCE_SHADOW_UPDATES

RULE_SUFFIX: Final = "CertificateAnnounce"
# `${topic(3)}` is the thing name of `Topics.announce`; `$$` republishes to the reserved `$aws/...` topic.
REPUBLISH_TOPIC: Final = f"$$aws/things/${{topic(3)}}/shadow/name/{ANNOUNCE_SHADOW_NAME}/update"
# At least once: a shadow update lost on the way would leave reconcile without the evidence until the
# device next announces (its next start).
REPUBLISH_QOS: Final = 1
THING_LEVEL: Final = 3  # the topic level (1-based, as the rule's topic(n)) that holds the thing name

Acknowledge = Callable[[IConstruct, str, str], None]
PUBLISH_REASON: Final = (
    "AnnouncementShadows (iot:Publish): only the update topic of the named shadow"
    f" '{ANNOUNCE_SHADOW_NAME}', for any thing: the announcing thing's name is only known from the"
    " topic at run time (the rule republishes to $aws/things/${topic(3)}/shadow/name/.../update)"
)


def check_sql() -> None:
    """The imported SQL selects what reconcile reads, from the topic the devices announce on, and the
    republish topic's `topic(3)` is that topic's thing level. Raises ValueError at synthesis otherwise."""
    expected = (
        "principal() AS state.reported.principal",
        "clientid() AS state.reported.clientId",
        "timestamp() AS state.reported.announcedAt",
        f"FROM '{Topics.announce('+')}'",
    )
    missing = [part for part in expected if part not in ANNOUNCE_RULE_SQL]
    if missing:
        raise ValueError(f"ANNOUNCE_RULE_SQL lacks {missing}: {ANNOUNCE_RULE_SQL!r}")
    levels = Topics.announce("{thing}").split("/")
    if levels[THING_LEVEL - 1] != "{thing}":
        raise ValueError(f"the thing name is not level {THING_LEVEL} of {Topics.announce('{thing}')!r}")


def announcement_rule(
    stack: Stack,
    rule_name: str,
    sql_version: str,
    error_action: iot.CfnTopicRule.ActionProperty,
    acknowledge: Acknowledge,
) -> iot.CfnTopicRule:
    """The rule and the role its republish action uses: trusted by AWS IoT for this rule of this account
    only, allowed iot:Publish only to the announcement shadows' update topics."""
    check_sql()
    role = iam.Role(
        stack,
        "AnnounceRepublishRole",
        assumed_by=iam.ServicePrincipal(
            "iot.amazonaws.com",
            conditions={
                "StringEquals": {"aws:SourceAccount": Aws.ACCOUNT_ID},
                "ArnEquals": {
                    "aws:SourceArn": stack.format_arn(service="iot", resource="rule", resource_name=rule_name)
                },
            },
        ),
        description=f"{stack.stack_name}: the announcement rule records announcements in a named shadow",
    )
    role.add_to_policy(
        iam.PolicyStatement(
            sid="AnnouncementShadows",
            actions=["iot:Publish"],
            resources=[ANNOUNCE_SHADOW_UPDATES.arn(stack)],
        )
    )
    acknowledge(role, f"AwsSolutions-IAM5[Resource::{ANNOUNCE_SHADOW_UPDATES.nag_name()}]", PUBLISH_REASON)
    return iot.CfnTopicRule(
        stack,
        "AnnounceRule",
        rule_name=rule_name,
        topic_rule_payload=iot.CfnTopicRule.TopicRulePayloadProperty(
            description="Certificate rotator: record which certificate a device announces it uses",
            sql=ANNOUNCE_RULE_SQL,
            aws_iot_sql_version=sql_version,
            rule_disabled=False,
            actions=[
                iot.CfnTopicRule.ActionProperty(
                    republish=iot.CfnTopicRule.RepublishActionProperty(
                        topic=REPUBLISH_TOPIC, qos=REPUBLISH_QOS, role_arn=role.role_arn
                    )
                )
            ],
            error_action=error_action,
        ),
    )
