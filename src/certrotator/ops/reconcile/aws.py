"""`reconcile --aws`: the facts from AWS IoT, the changes through the backend's own boto3 adapters.

- certificates: the thing's exclusive principals (`IotRegistry`, as the handlers read them), each one's
  status and creationDate (DescribeCertificate);
- rotation state: the backend's signed shadow (`ShadowStateStore`: a state whose MAC fails is no state);
  its age from the shadow's metadata, which AWS IoT writes (a handler may still act on a young one);
- executions: QUEUED and IN_PROGRESS executions of the thing (ListJobExecutionsForThing), each job's
  document asked once per run (GetJobDocument) to tell rotations from other jobs;
- evidence: the announcement shadow, written by an IoT rule from `Topics.announce` with the
  connection's principal() and timestamp() (see `ANNOUNCE_RULE_SQL`). The device cannot forge the
  principal; it could write that shadow itself where its policy lets it update its shadows, which can
  only make reconcile retire its own working certificate: deny it in the device policy.

Retiring is `IotRegistry.delete_certificate` (INACTIVE, detach, force-delete with the policies),
clearing is `ShadowStateStore.clear`, notifying is `SnsNotifier`: the terminal handler's own code.
API calls per thing: ListThingPrincipalsV2, DescribeCertificate per certificate, GetThingShadow x2
(state, announcement), ListJobExecutionsForThing x2 (QUEUED, IN_PROGRESS); more only for findings.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import boto3
from botocore.exceptions import ClientError

from certrotator.backend.aws.adapters import (
    DEFAULT_SHADOW_NAME,
    STATE_KEY_SECRET_ARN_ENV,
    IotRegistry,
    SecretStateKey,
    ShadowStateStore,
    SnsNotifier,
    StateKey,
)
from certrotator.backend.aws.clients import Clients
from certrotator.backend.ports import CertificateStatus, Notification, RotationState
from certrotator.ops.aws.clients import AwsClients, OperationError, error_code, is_not_found, unless_missing
from certrotator.ops.reconcile.policy import (
    ActiveExecution,
    CertificateFact,
    Evidence,
    EvidenceKind,
    ThingFacts,
    Verdict,
    is_live,
)
from certrotator.ops.reconcile.runner import Options, reconcile
from certrotator.protocol import ACTIVE_EXECUTION_STATUSES, JobExecutionStatus, Topics, is_rotation_document

log = logging.getLogger("certrotator.reconcile")

ANNOUNCE_SHADOW_NAME: Final = "AWSLabsCertificateRotatorAnnounce"
# The rule that records announcements (the CDK stack creates it, with a republish action to
# `$$aws/things/${topic(3)}/shadow/name/<ANNOUNCE_SHADOW_NAME>/update`, QoS 1). timestamp() is in ms.
ANNOUNCE_RULE_SQL: Final = (
    "SELECT principal() AS state.reported.principal, clientid() AS state.reported.clientId, "
    "timestamp() AS state.reported.announcedAt "
    f"FROM '{Topics.announce('+')}'"
)
# Stack outputs (infra/certrotator_infra/stack.py) that name what reconcile needs.
TOPIC_OUTPUT: Final = "NotificationTopicArn"
STATE_KEY_OUTPUT: Final = "StateKeySecretArn"

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class AwsSettings:
    stack: str = "AWSLabsCertificateRotator"
    topic_arn: str | None = None  # default: the stack's output
    state_key_secret_arn: str | None = None  # default: the stack's output
    state_shadow: str = DEFAULT_SHADOW_NAME
    announce_shadow: str = ANNOUNCE_SHADOW_NAME


def stack_outputs(control: AwsClients, stack: str) -> dict[str, str]:
    try:
        described = control.cloudformation.describe_stacks(StackName=stack)["Stacks"][0]
    except ClientError as exc:
        if error_code(exc) == "ValidationError" or is_not_found(exc):
            raise OperationError(
                f"stack {stack!r} does not exist in {control.region}: pass --stack, or "
                "--state-key-secret-arn and --topic-arn"
            ) from None
        raise
    return {o["OutputKey"]: o["OutputValue"] for o in described.get("Outputs", []) if "OutputKey" in o}


def connect_backend(region: str | None, profile: str | None, settings: AwsSettings) -> AwsBackend:
    """Clients from boto3's usual chain (or --region/--profile), the stack's outputs where not given."""
    control = AwsClients.from_session(region, profile)
    data = Clients(control.region, boto3.session.Session(profile_name=profile, region_name=control.region))
    return AwsBackend.build(control, data, settings)


class AwsBackend:
    """`runner.Backend` on AWS IoT. `control` is the operator's IoT/STS/CloudFormation clients; `data`
    the backend's client set (IoT data plane, SNS, Secrets Manager) its adapters are written for."""

    def __init__(
        self,
        control: AwsClients,
        data: Clients,
        *,
        state_key: StateKey,
        topic_arn: str | None,
        settings: AwsSettings = AwsSettings(),
        clock: Clock = time.time,
    ) -> None:
        account, partition = control.identity()
        self.control, self.data, self.settings, self.clock = control, data, settings, clock
        self.registry = IotRegistry(data, account=account, partition=partition)
        self.store = ShadowStateStore(data, key=state_key, shadow_name=settings.state_shadow)
        self.notifier = SnsNotifier(data, topic_arn) if topic_arn else None
        self._rotation_jobs: dict[str, bool | None] = {}

    @classmethod
    def build(
        cls, control: AwsClients, data: Clients, settings: AwsSettings, clock: Clock = time.time
    ) -> AwsBackend:
        topic, secret = settings.topic_arn, settings.state_key_secret_arn
        if topic is None or secret is None:
            outputs = stack_outputs(control, settings.stack)
            topic = topic or outputs.get(TOPIC_OUTPUT)
            secret = secret or outputs.get(STATE_KEY_OUTPUT)
        if not secret:
            raise OperationError(
                f"stack {settings.stack!r} has no {STATE_KEY_OUTPUT} output: pass --state-key-secret-arn"
            )
        key = SecretStateKey(data, secret)
        key()  # fail now, with one clear message, if the operator may not read it
        return cls(control, data, state_key=key, topic_arn=topic, settings=settings, clock=clock)

    # ------------------------------------------------------------------------------------- facts

    def things(self) -> Iterator[str]:
        for page in self.control.iot.get_paginator("list_things").paginate():
            for thing in page.get("things", []):
                if "thingName" in thing:
                    yield thing["thingName"]

    def facts(self, thing: str) -> ThingFacts:
        now = self.clock()
        attached = self.registry.exclusive_principals(thing)
        certificates = [c for c in (self._certificate(cid, thing, True) for cid in attached) if c is not None]
        state = self.store.load(thing)
        state_age = None
        if state is not None:
            for cid in dict.fromkeys((state.old_certificate_id, state.new_certificate_id)):
                if cid and cid not in attached and (c := self._certificate(cid, thing, False)) is not None:
                    certificates.append(c)
            if is_live(state):
                written = self._shadow_written_at(thing)
                state_age = None if written is None else now - written
        return ThingFacts(
            thing,
            tuple(certificates),
            state,
            tuple(self._active_executions(thing)),
            tuple(self._announcements(thing)),
            None,
            now,
            state_age_s=state_age,
            handlers_idle=False,  # the Lambdas run apart from us
        )

    def recheck(self, thing: str) -> ThingFacts:
        return self.facts(thing)  # every read is fresh

    def _certificate(self, certificate_id: str, thing: str, attached: bool) -> CertificateFact | None:
        described = unless_missing(
            lambda: self.control.iot.describe_certificate(certificateId=certificate_id)
        )
        if described is None:
            return None
        description = described["certificateDescription"]
        created = description.get("creationDate")
        created_at = created.timestamp() if created is not None else 0.0
        status = CertificateStatus(description.get("status", CertificateStatus.INACTIVE.value))
        other = None
        if not attached:
            owners = self.control.iot.list_principal_things(
                principal=self.registry.certificate_arn(certificate_id)
            )
            other = next((t for t in owners.get("things", []) if t != thing), None)
        return CertificateFact(certificate_id, status, created_at, attached, other)

    def _active_executions(self, thing: str) -> Iterator[ActiveExecution]:
        for status in sorted(ACTIVE_EXECUTION_STATUSES):
            kwargs: dict[str, Any] = {"thingName": thing, "status": status.value}
            while True:
                page = self.control.iot.list_job_executions_for_thing(**kwargs)
                for summary in page.get("executionSummaries", []):
                    job_id = summary.get("jobId")
                    if job_id:
                        yield ActiveExecution(job_id, JobExecutionStatus(status), self._is_rotation(job_id))
                token = page.get("nextToken")
                if not token:
                    break
                kwargs["nextToken"] = token

    def _is_rotation(self, job_id: str) -> bool | None:
        if job_id not in self._rotation_jobs:
            try:
                text = self.control.iot.get_job_document(jobId=job_id).get("document", "")
                self._rotation_jobs[job_id] = is_rotation_document(json.loads(text))
            except (ClientError, ValueError) as exc:
                log.warning("could not read job %s's document (%s): counted as a rotation", job_id, exc)
                self._rotation_jobs[job_id] = None
        return self._rotation_jobs[job_id]

    def _shadow(self, thing: str, name: str) -> dict[str, Any] | None:
        response = unless_missing(
            lambda: self.data.iot_data.get_thing_shadow(thingName=thing, shadowName=name)
        )
        if response is None:
            return None
        try:
            document = json.loads(response["payload"].read() or b"{}")
        except ValueError:
            return None
        return document if isinstance(document, dict) else None

    def _shadow_written_at(self, thing: str) -> float | None:
        """When the rotation state was last written: AWS IoT's own metadata timestamp (seconds)."""
        document = self._shadow(thing, self.settings.state_shadow) or {}
        reported = document.get("metadata", {}).get("reported", {})
        stamps = [
            v["timestamp"]
            for v in reported.values()
            if isinstance(v, dict) and isinstance(v.get("timestamp"), int | float)
        ]
        return float(max(stamps)) if stamps else None

    def _announcements(self, thing: str) -> Iterator[Evidence]:
        document = self._shadow(thing, self.settings.announce_shadow) or {}
        reported = document.get("state", {}).get("reported", {})
        principal = reported.get("principal") if isinstance(reported, dict) else None
        if not isinstance(principal, str) or not principal:
            return
        at = reported.get("announcedAt")
        if isinstance(at, int | float) and not isinstance(at, bool):
            since = float(at) / 1000.0  # the rule's timestamp() is in milliseconds
        else:  # written some other way: AWS IoT's metadata says when
            stamp = document.get("metadata", {}).get("reported", {}).get("principal", {}).get("timestamp")
            if not isinstance(stamp, int | float):
                return
            since = float(stamp)
        client = reported.get("clientId")
        source = f"shadow {self.settings.announce_shadow}" + (
            f" ({client})" if isinstance(client, str) else ""
        )
        yield Evidence(principal.lower(), since, EvidenceKind.ANNOUNCEMENT, source)

    # ----------------------------------------------------------------------------------- changes

    def retire(self, thing: str, certificate_id: str) -> None:
        self.registry.delete_certificate(thing, certificate_id)

    def clear_state(self, thing: str, expected: RotationState) -> bool:
        if self.store.load(thing) != expected:
            return False
        self.store.clear(thing)
        return True

    def notify(self, notification: Notification) -> None:
        if self.notifier is None:
            raise OperationError("no notification topic (pass --topic-arn)")
        self.notifier.notify(notification)


# ------------------------------------------------------------------------------ scheduled (Lambda)

TOPIC_ENV: Final = "SNS_TOPIC_ARN"  # as the backend's functions are configured
REGION_ENV: Final = "AWS_REGION"  # set by Lambda


def scheduled_handler(event: dict[str, Any], _context: object = None) -> dict[str, Any]:
    """Entry point for the stack's scheduled reconcile (an EventBridge rule, off by default): every thing,
    or `event["things"]`; `event["dryRun"]` to only report. Returns counts and the things that need an
    operator (each also notified on the topic)."""
    settings = AwsSettings(
        topic_arn=os.environ[TOPIC_ENV], state_key_secret_arn=os.environ[STATE_KEY_SECRET_ARN_ENV]
    )
    backend = connect_backend(os.environ[REGION_ENV], None, settings)
    things = event.get("things")
    options = Options(dry_run=bool(event.get("dryRun", False)))
    outcomes = reconcile(backend, options, list(things) if isinstance(things, list) else None)
    return {
        "things": len(outcomes),
        "retired": sum(len(o.decision.retire) for o in outcomes if o.applied),
        "statesCleared": sum(1 for o in outcomes if o.applied and o.decision.clear_state),
        "needOperator": [o.decision.thing for o in outcomes if o.needs_operator],
        "skipped": [o.decision.thing for o in outcomes if o.decision.verdict is Verdict.SKIP],
    }
