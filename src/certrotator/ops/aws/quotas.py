"""The AWS quotas a rotation consumes, and the fastest rollout they allow.

Each rotation makes, at most once each: CreateCertificateFromCsr (the AWS IoT issuer) or AWS Private CA
IssueCertificate (the Private CA issuer) and AttachThingPrincipal in the create function, and
UpdateCertificate (the old certificate INACTIVE) and DeleteCertificate in the terminal function. These
are account-wide, per-region request rates (public AWS IoT Core and AWS Private CA quotas; check the
current values in Service Quotas): the slowest, 10 requests per second, bounds the rotations per
second whatever the job's rollout. Half of each is left to everything else in the account (other
tools, the console, retries after throttling), so a rotation job may release at most
60 * 10 * 0.5 = 300 executions a minute; the job template (infra/) and the local default template
(`certrotator.local.jobs.DEFAULT_CONFIG`) use that ceiling, and `certrotator aws check` compares a
deployed template against it. Lambda concurrency follows from the rate (Little's law): see
`lambda_concurrency`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class Quota:
    api: str
    per_second: float  # the account's request rate in one region
    per_rotation: int  # calls one rotation makes
    where: str


ROTATION_QUOTAS: Final = (
    Quota("iot:CreateCertificateFromCsr", 15, 1, "create function, AWS IoT issuer"),
    Quota("acm-pca:IssueCertificate", 25, 1, "create function, Private CA issuer"),
    Quota("iot:AttachThingPrincipal", 15, 1, "create function"),
    Quota("iot:UpdateCertificate", 10, 1, "terminal function: the old certificate INACTIVE"),
    Quota("iot:DeleteCertificate", 10, 1, "terminal function: the old certificate"),
)
# The part of each shared quota rotations may take; the rest is the account's.
ACCOUNT_SHARE: Final = 0.5
LAMBDA_CONCURRENCY: Final = 1000  # the default account limit in a region, shared by every function
# Seconds a rotation's functions run, end to end: create (the AWS IoT issuer ~1-3 s; a Private CA's
# GetCertificate polling up to 60 s), commit (< 1 s), terminal (~1-2 s).
FUNCTION_SECONDS_TYPICAL: Final = 6.0
FUNCTION_SECONDS_WORST: Final = 63.0


def rotations_per_second(share: float = ACCOUNT_SHARE) -> float:
    """The rotation rate the quotas allow when rotations take `share` of each."""
    return min(q.per_second / q.per_rotation for q in ROTATION_QUOTAS) * share


def rollout_ceiling_per_minute(share: float = ACCOUNT_SHARE) -> int:
    """The most executions a rotation job should release per minute: every released device rotates
    within seconds, so releases per minute are rotations per minute."""
    return math.floor(60 * rotations_per_second(share))


def lambda_concurrency(per_minute: float, seconds: float = FUNCTION_SECONDS_TYPICAL) -> int:
    """Concurrent function executions at `per_minute` rotations (rate x time in the functions)."""
    return math.ceil(per_minute / 60 * seconds)
