"""The AWS IoT registry behind `ports.Registry`: one API call per port method, except deletion."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

from botocore.exceptions import ClientError

from certrotator.backend.aws.clients import NOT_FOUND, error_code, is_not_found, is_transient, unless_missing
from certrotator.backend.ports import CertificateRecord, CertificateStatus, PermanentFailure, ThingNotFound

if TYPE_CHECKING:
    from certrotator.backend.aws.clients import Clients

log = logging.getLogger(__name__)

EXCLUSIVE_THING: Final = "EXCLUSIVE_THING"
_CERT_MARKER: Final = ":cert/"

# DetachThingPrincipal is asynchronous ("it might take several seconds for the detachment to
# propagate", AWS IoT API reference), so DeleteCertificate right after it can still see the thing
# attached. About 15 s of waiting in all (the terminal Lambda's timeout must allow for it); past that
# the error propagates and the handler reports the certificate it could not delete.
DELETE_RETRY_DELAYS: Final = (0.5, 1.0, 2.0, 4.0, 8.0)


def certificate_arn(partition: str, region: str, account: str, certificate_id: str) -> str:
    return f"arn:{partition}:iot:{region}:{account}:cert/{certificate_id}"


def certificate_id_of(principal_arn: str) -> str | None:
    """The certificate id in a certificate principal ARN; None for other principals."""
    if _CERT_MARKER not in principal_arn:
        return None
    return principal_arn.rsplit(_CERT_MARKER, 1)[1].lower()


class IotRegistry:
    """`ports.Registry` over the AWS IoT control plane.

    Certificate ARNs are built from partition, region and account (the Lambda's own ARN gives them)
    instead of being looked up, which saves a DescribeCertificate per ARN.
    """

    def __init__(
        self,
        clients: Clients,
        *,
        account: str,
        partition: str = "aws",
        delete_retry_delays: Sequence[float] = DELETE_RETRY_DELAYS,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._clients = clients
        self._region, self._account, self._partition = clients.region, account, partition
        self._delete_retry_delays = tuple(delete_retry_delays)
        self._sleep = sleep

    def certificate_arn(self, certificate_id: str) -> str:
        return certificate_arn(self._partition, self._region, self._account, certificate_id)

    def exclusive_principals(self, thing: str) -> list[str]:
        ids: list[str] = []
        paginator = self._clients.iot.get_paginator("list_thing_principals_v2")
        try:
            for page in paginator.paginate(thingName=thing, thingPrincipalType=EXCLUSIVE_THING):
                for item in page.get("thingPrincipalObjects", []):
                    # The request already filters on the type; the check guards against a service
                    # (or emulator) that ignores the filter but still reports the type.
                    if item.get("thingPrincipalType", EXCLUSIVE_THING) != EXCLUSIVE_THING:
                        continue
                    certificate_id = certificate_id_of(item["principal"])
                    if certificate_id is not None:
                        ids.append(certificate_id)
        except ClientError as exc:
            if is_not_found(exc):
                raise ThingNotFound(thing) from exc
            raise
        return ids

    def describe_certificate(self, certificate_id: str) -> CertificateRecord | None:
        response = unless_missing(
            lambda: self._clients.iot.describe_certificate(certificateId=certificate_id)
        )
        if response is None:
            return None
        description = response["certificateDescription"]
        return CertificateRecord(
            certificate_id=description.get("certificateId", certificate_id),
            pem=description.get("certificatePem", ""),
            status=CertificateStatus(description.get("status", "")),
        )

    def certificate_policies(self, certificate_id: str) -> list[str]:
        paginator = self._clients.iot.get_paginator("list_attached_policies")
        names: list[str] = []
        for page in paginator.paginate(target=self.certificate_arn(certificate_id)):
            names.extend(p["policyName"] for p in page.get("policies", []) if "policyName" in p)
        return names

    def attach_policy(self, policy_name: str, certificate_id: str) -> None:
        self._clients.iot.attach_policy(policyName=policy_name, target=self.certificate_arn(certificate_id))

    def attach_exclusive(self, thing: str, certificate_id: str) -> None:
        self._clients.iot.attach_thing_principal(
            thingName=thing,
            principal=self.certificate_arn(certificate_id),
            thingPrincipalType=EXCLUSIVE_THING,
        )

    def delete_certificate(self, thing: str, certificate_id: str) -> None:
        """INACTIVE, detach from the thing, force-delete. Each step tolerates having been done.

        A refusal that repeating cannot fix (access denied, still attached elsewhere after the retries
        below) is raised as `PermanentFailure`; throttling and service errors propagate as they are, for
        the caller to run the whole deletion again.
        """
        try:
            self._delete(thing, certificate_id)
        except ClientError as exc:
            if is_transient(exc):
                raise
            raise PermanentFailure(
                f"{error_code(exc) or 'error'} deleting certificate {certificate_id}: {exc}"
            ) from exc

    def _delete(self, thing: str, certificate_id: str) -> None:
        arn = self.certificate_arn(certificate_id)
        try:
            self._clients.iot.update_certificate(certificateId=certificate_id, newStatus="INACTIVE")
        except ClientError as exc:
            code = error_code(exc)
            if code == NOT_FOUND:
                return  # already deleted: nothing left to do
            # e.g. REVOKED cannot become INACTIVE, but it is not ACTIVE either, so it can be deleted
            if code != "CertificateStateException":
                raise
            log.warning("certificate %s keeps its status (%s); deleting it anyway", certificate_id, exc)
        try:
            self._clients.iot.detach_thing_principal(thingName=thing, principal=arn)
        except ClientError as exc:
            if not is_not_found(exc):  # thing gone or not attached
                raise
        self._force_delete(certificate_id)

    def _force_delete(self, certificate_id: str) -> None:
        # forceDelete "forces the deletion of a certificate if it is inactive and is not attached to
        # an IoT thing" (AWS IoT API reference, DeleteCertificate): policy attachments go with it, so
        # no ListAttachedPolicies + DetachPolicy round trips are needed.
        delays = iter(self._delete_retry_delays)
        while True:
            try:
                self._clients.iot.delete_certificate(certificateId=certificate_id, forceDelete=True)
                return
            except ClientError as exc:
                code = error_code(exc)
                if code == NOT_FOUND:
                    return
                delay = next(delays, None)
                if code != "DeleteConflictException" or delay is None:
                    raise
                log.info(
                    "certificate %s still attached (detach propagating); retry in %ss", certificate_id, delay
                )
                self._sleep(delay)
