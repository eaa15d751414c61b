"""The Greengrass component in AWS: publish a built component version (artifact to S3, then the
recipe), and deploy a version to a thing group by merging it into the group's latest deployment, so
every other component and its configuration stays as it is (as the seed's deploy script does)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any, Final, cast

from botocore.exceptions import ClientError

from certrotator.ops.aws.clients import (
    AwsClients,
    OperationError,
    error_code,
    is_not_found,
    thing_group_arn,
)

# A component version's state (GreengrassV2 CreateComponentVersion), not a job execution status.
COMPONENT_VERSION_FAILED: Final = "FAILED"

DEFAULT_COMPONENT: Final = "aws.greengrass.labs.CertificateRotator"
NUCLEUS: Final = "aws.greengrass.Nucleus"
BUCKET_PLACEHOLDER: Final = "{BUCKET_NAME}"
# What `certrotator component build` (and GDK) leave under greengrass-build/.
RECIPE_NAMES: Final = ("recipe.yaml", "recipe.yml", "recipe.json")
# Deployment fields carried over from the deployment being merged into (tags and ids are not).
CARRIED_FIELDS: Final = ("deploymentPolicies", "iotJobConfiguration", "parentTargetArn")

_SEMVER: Final = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$"
)
_S3_URI: Final = re.compile(r"s3://[^\s\"']+")
_BUCKET_NAME: Final = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def _recipe_field(key: str) -> re.Pattern[str]:
    # A top-level `Key: value` (YAML) or `"Key": "value"` (JSON); the recipe is our own build output,
    # so this needs no YAML parser in the operator's install.
    return re.compile(rf'^[ \t]*"?{key}"?[ \t]*:[ \t]*["\']?([A-Za-z0-9._+-]+)["\']?[ \t]*,?[ \t]*$', re.M)


def component_version_arn(clients: AwsClients, name: str, version: str) -> str:
    account, partition = clients.identity()
    return f"arn:{partition}:greengrass:{clients.region}:{account}:components:{name}:versions:{version}"


def component_version_exists(clients: AwsClients, name: str, version: str) -> bool:
    try:
        clients.greengrass.describe_component(arn=component_version_arn(clients, name, version))
    except ClientError as exc:
        if is_not_found(exc):
            return False
        raise
    return True


def latest_deployment(clients: AwsClients, group_arn: str) -> dict[str, Any] | None:
    """The thing group's latest deployment (get_deployment's answer), None if it never had one."""
    listed = clients.greengrass.list_deployments(targetArn=group_arn, historyFilter="LATEST_ONLY")
    deployments = listed.get("deployments", [])
    if not deployments:
        return None
    newest = max(deployments, key=lambda d: d.get("creationTimestamp") or datetime.min)
    deployment = clients.greengrass.get_deployment(deploymentId=newest["deploymentId"])
    return cast(dict[str, Any], deployment)


# ------------------------------------------------------------------------------------------- deploy


def merge_components(existing: Mapping[str, Any], component: str, version: str) -> dict[str, Any]:
    """The deployment's components with `component` at `version`; everything else (its own
    configurationUpdate and runWith included) unchanged."""
    merged = {name: dict(spec) for name, spec in existing.items()}
    merged[component] = {**merged.get(component, {}), "componentVersion": version}
    return merged


@dataclass(frozen=True, slots=True)
class DeployResult:
    deployment_id: str
    deployment_name: str
    group_arn: str
    component: str
    version: str
    previous_version: str | None  # None: the component was not in the group's deployment
    kept: list[str]  # the other components carried over


def deploy_component(
    clients: AwsClients, version: str, group: str, component: str = DEFAULT_COMPONENT
) -> DeployResult:
    if not _SEMVER.match(version):
        raise OperationError(f"component version {version!r} is not a semantic version (e.g. 1.2.0)")
    group_arn = thing_group_arn(clients, group)
    if not component_version_exists(clients, component, version):
        raise OperationError(
            f"component {component} {version} is not published in {clients.region}: "
            "publish it first (certrotator aws component publish)"
        )
    current = latest_deployment(clients, group_arn)
    if current is None:
        # As the seed's script: the group must already run a deployment (at least the Nucleus with
        # interpolateComponentConfiguration), which this one extends rather than replaces.
        raise OperationError(
            f"thing group {group!r} has no deployment to merge into: first deploy {NUCLEUS} to it with "
            'configurationUpdate merge {"interpolateComponentConfiguration": true}'
        )
    existing = current.get("components") or {}
    components = merge_components(existing, component, version)
    name = current.get("deploymentName") or f"Deployment for {group}"
    carried = {key: current[key] for key in CARRIED_FIELDS if current.get(key)}
    created = clients.greengrass.create_deployment(
        targetArn=group_arn, deploymentName=name, components=components, **carried
    )
    return DeployResult(
        deployment_id=created["deploymentId"],
        deployment_name=name,
        group_arn=group_arn,
        component=component,
        version=version,
        previous_version=existing.get(component, {}).get("componentVersion"),
        kept=sorted(set(existing) - {component}),
    )


# ------------------------------------------------------------------------------------------ publish


@dataclass(frozen=True, slots=True)
class BuiltComponent:
    """A `certrotator component build` (or `gdk component build`) output directory, read."""

    name: str
    version: str
    recipe: Path
    recipe_text: str
    # s3://bucket/key URI in the recipe -> the local file to upload there
    artifacts: dict[str, Path]


def read_build(build_dir: Path) -> BuiltComponent:
    recipes = [build_dir / "recipes" / n for n in RECIPE_NAMES if (build_dir / "recipes" / n).is_file()]
    if len(recipes) != 1:
        found = "none" if not recipes else ", ".join(r.name for r in recipes)
        raise OperationError(
            f"expected one recipe in {build_dir / 'recipes'} (found {found}): run `certrotator component build`"
        )
    recipe = recipes[0]
    text = recipe.read_text(encoding="utf-8")
    fields = {}
    for key in ("ComponentName", "ComponentVersion"):
        match = _recipe_field(key).search(text)
        if match is None:
            raise OperationError(f"{recipe} has no {key}")
        fields[key] = match.group(1)
    name, version = fields["ComponentName"], fields["ComponentVersion"]
    artifacts: dict[str, Path] = {}
    for uri in dict.fromkeys(_S3_URI.findall(text)):
        local = build_dir / "artifacts" / name / version / PurePosixPath(uri).name
        if not local.is_file():
            raise OperationError(f"artifact {uri} of the recipe is not in the build: {local} is missing")
        artifacts[uri] = local
    if not artifacts:
        raise OperationError(f"{recipe} names no s3:// artifact")
    return BuiltComponent(name, version, recipe, text, artifacts)


def _split_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def resolve_bucket(build: BuiltComponent, bucket: str | None) -> tuple[str, str, dict[str, Path]]:
    """(bucket, recipe text, artifacts) with the {BUCKET_NAME} placeholder filled from `bucket`; a
    recipe built for one bucket is not published into another (its URIs are part of the recipe)."""
    buckets = {_split_uri(uri)[0] for uri in build.artifacts}
    if bucket is not None and not _BUCKET_NAME.match(bucket):
        raise OperationError(f"{bucket!r} is not a valid S3 bucket name")
    if buckets == {BUCKET_PLACEHOLDER}:
        if bucket is None:
            raise OperationError(
                f"the recipe's artifact URI keeps {BUCKET_PLACEHOLDER}: pass --bucket "
                "(or build with `certrotator component build --bucket ...`)"
            )
        text = build.recipe_text.replace(BUCKET_PLACEHOLDER, bucket)
        artifacts = {uri.replace(BUCKET_PLACEHOLDER, bucket): path for uri, path in build.artifacts.items()}
        return bucket, text, artifacts
    if len(buckets) != 1 or BUCKET_PLACEHOLDER in buckets:
        raise OperationError(f"the recipe's artifacts name several buckets: {', '.join(sorted(buckets))}")
    (named_bucket,) = buckets
    if bucket is not None and bucket != named_bucket:
        raise OperationError(
            f"the recipe's artifact URI names bucket {named_bucket!r}, not {bucket!r}: "
            "rebuild with --bucket, or publish without --bucket"
        )
    return named_bucket, build.recipe_text, dict(build.artifacts)


@dataclass(frozen=True, slots=True)
class PublishResult:
    arn: str
    name: str
    version: str
    state: str
    uploaded: list[str]


def publish_component(clients: AwsClients, build_dir: Path, bucket: str | None = None) -> PublishResult:
    """Upload the artifact to the S3 location the recipe names, then create the component version.
    Refuses before uploading when the version already exists: overwriting a published version's
    artifact would break its recorded digest on every device that deploys it."""
    build = read_build(build_dir)
    bucket, recipe_text, artifacts = resolve_bucket(build, bucket)
    if component_version_exists(clients, build.name, build.version):
        raise OperationError(
            f"component {build.name} {build.version} is already published in {clients.region}: "
            "bump the version and rebuild"
        )
    account, _ = clients.identity()
    try:
        clients.s3.head_bucket(Bucket=bucket, ExpectedBucketOwner=account)
    except ClientError as exc:
        code = error_code(exc)
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise OperationError(
                f"S3 bucket {bucket!r} does not exist: create it (aws s3 mb s3://{bucket} --region "
                f"{clients.region}) or pass --bucket"
            ) from None
        if code in ("403", "AccessDenied"):
            raise OperationError(
                f"S3 bucket {bucket!r} is not accessible: it belongs to another account, or the "
                "credentials lack s3:ListBucket on it"
            ) from None
        raise
    uploaded = []
    for uri, path in artifacts.items():
        _, key = _split_uri(uri)
        clients.s3.put_object(Bucket=bucket, Key=key, Body=path.read_bytes(), ExpectedBucketOwner=account)
        uploaded.append(uri)
    created = clients.greengrass.create_component_version(inlineRecipe=recipe_text.encode())
    status = created.get("status", {})
    state = str(status.get("componentState", "REQUESTED"))
    if state == COMPONENT_VERSION_FAILED:
        errors = "; ".join(f"{k}: {v}" for k, v in (status.get("errors") or {}).items())
        raise OperationError(
            f"Greengrass rejected {build.name} {build.version}: {status.get('message', '')} {errors}".strip()
        )
    return PublishResult(
        created["arn"], created["componentName"], created["componentVersion"], state, uploaded
    )
