"""Build the Greengrass component: the artifact zip and the versioned recipe, laid out as the Greengrass
Development Kit (GDK) expects from a custom build:

    greengrass-build/artifacts/<name>/<version>/certrotator.zip   (certrotator-<v>-py3-none-any.whl and
                                                                   constraints.txt)
    greengrass-build/recipes/recipe.yaml

The artifact carries a wheel, not the source tree: the device then installs with pip alone, without a
build backend and without writing into the (read-only) artifact directory, which building from source
would do (setuptools writes egg-info next to the sources). The wheel is assembled here with the
standard library -- the package is pure Python, so a wheel is a zip with metadata (PEP 427) -- which
needs no network and no particular setuptools in the build environment.

Beside the wheel goes the project's lock, constraints.txt: the device installs with `pip install -c` it,
so it gets the dependency versions we test, not the newest ones within pyproject.toml's ranges. The
recipe carries the SHA-256 of both; the device checks each after copying it where only root can write.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from certrotator.device.greengrass.runtime import JOURNAL_FILE, RESTART_EXIT_CODE
from certrotator.tomlcompat import tomllib

ARTIFACT_NAME = "certrotator.zip"
CONSTRAINTS_FILE = "constraints.txt"  # the lock, at the project root and in the artifact
DEFAULT_COMPONENT_NAME = "aws.greengrass.labs.CertificateRotator"
DEFAULT_PUBLISHER = "certrotator"
BUCKET_PLACEHOLDER = "{BUCKET_NAME}"
# Fixed timestamps and modes make the artifact byte-for-byte reproducible.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)

_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
_COMPONENT = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_PLACEHOLDER = re.compile(r"\{[A-Z][A-Z0-9_]*\}")


class BuildError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class GdkSettings:
    name: str
    version: str | None  # None for NEXT_PATCH (GDK decides at publish time)
    author: str | None
    bucket: str | None
    region: str | None


@dataclass(frozen=True, slots=True)
class BuildResult:
    name: str
    version: str
    artifact: Path
    recipe: Path
    wheel: str
    bucket: str | None
    region: str | None
    wheel_sha256: str
    constraints_sha256: str
    environment_sha256: str  # what the device's environment is built from: see environment_digest

    def publish_commands(self) -> list[str]:
        """How to publish without GDK (with GDK: `gdk component publish`)."""
        region = f" --region {self.region}" if self.region else ""
        bucket = self.bucket or "<bucket>"
        return [
            f"aws s3 cp {self.artifact} s3://{bucket}/{self.name}/{self.version}/{ARTIFACT_NAME}{region}",
            f"aws greengrassv2 create-component-version --inline-recipe fileb://{self.recipe}{region}",
        ]


# ---------------------------------------------------------------------------------------- project


def find_project_root(start: Path) -> Path:
    """The directory of certrotator's pyproject.toml, at or above `start` (GDK runs the custom build
    from component/)."""
    for directory in (start.resolve(), *start.resolve().parents):
        pyproject = directory / "pyproject.toml"
        if pyproject.is_file() and _project_table(pyproject).get("name") == "certrotator":
            return directory
    raise BuildError(f"no certrotator pyproject.toml at or above {start}; pass --project")


def _project_table(pyproject: Path) -> dict[str, Any]:
    try:
        project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise BuildError(f"cannot read {pyproject}: {exc}") from None
    return project if isinstance(project, dict) else {}


def read_gdk_config(path: Path) -> GdkSettings | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        (name, component), *_ = data["component"].items()
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise BuildError(f"{path} is not a GDK configuration: {exc}") from None
    version = component.get("version")
    publish = component.get("publish") or {}
    return GdkSettings(
        name=name,
        version=None if version in (None, "NEXT_PATCH") else str(version),
        author=component.get("author"),
        bucket=publish.get("bucket"),
        region=publish.get("region"),
    )


# ------------------------------------------------------------------------------------------ wheel


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _requires_dist(requirement: str, extra: str) -> str:
    """A Requires-Dist line for a requirement of `extra`. A requirement with a marker of its own (the device
    extra's `python-pkcs11; sys_platform != 'win32'`) keeps it, and-ed with the extra's: a second `;` is not
    valid metadata."""
    spec, _, marker = requirement.partition(";")
    condition = f'extra == "{extra}"'
    if marker.strip():
        condition = f"({marker.strip()}) and {condition}"
    return f"Requires-Dist: {spec.strip()}; {condition}"


def _metadata(project: dict[str, Any]) -> str:
    lines = [
        "Metadata-Version: 2.1",
        f"Name: {project['name']}",
        f"Version: {project['version']}",
    ]
    if description := project.get("description"):
        lines.append(f"Summary: {description}")
    if isinstance(project.get("license"), str):
        lines.append(f"License: {project['license']}")
    if requires_python := project.get("requires-python"):
        lines.append(f"Requires-Python: {requires_python}")
    lines += [f"Requires-Dist: {requirement}" for requirement in project.get("dependencies", [])]
    for extra, requirements in project.get("optional-dependencies", {}).items():
        lines.append(f"Provides-Extra: {extra}")
        lines += [_requires_dist(requirement, extra) for requirement in requirements]
    return "\n".join(lines) + "\n"


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def build_wheel(project_root: Path, out_dir: Path) -> Path:
    """A py3-none-any wheel of src/<package>, with the project's dependencies, extras and scripts."""
    project = _project_table(project_root / "pyproject.toml")
    name, version = project.get("name"), project.get("version")
    if not isinstance(name, str) or not isinstance(version, str):
        raise BuildError("pyproject.toml [project] needs a static name and version")
    package_dir = project_root / "src" / _normalized(name)
    if not package_dir.is_dir():
        raise BuildError(f"package sources not found at {package_dir}")
    files: dict[str, bytes] = {}
    for path in sorted(package_dir.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo"):
            files[path.relative_to(package_dir.parent).as_posix()] = path.read_bytes()
    dist_info = f"{_normalized(name)}-{version}.dist-info"
    files[f"{dist_info}/METADATA"] = _metadata(project).encode()
    files[f"{dist_info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: certrotator component build\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    if scripts := project.get("scripts"):
        entry_points = "[console_scripts]\n" + "".join(f"{k} = {v}\n" for k, v in scripts.items())
        files[f"{dist_info}/entry_points.txt"] = entry_points.encode()
    record = [_record_line(path, data) for path, data in files.items()] + [f"{dist_info}/RECORD,,"]
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()

    out_dir.mkdir(parents=True, exist_ok=True)
    wheel = out_dir / f"{_normalized(name)}-{version}-py3-none-any.whl"
    wheel.write_bytes(_zip(files))
    return wheel


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, data in files.items():  # RECORD last, as the wheel spec recommends
            info = zipfile.ZipInfo(path, date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------- recipe


def render_recipe(template: str, values: dict[str, str], keep: frozenset[str] = frozenset()) -> str:
    """Fill `{NAME}` placeholders; any left over (other than `keep`) is an error, never shipped."""
    recipe = template
    for key, value in values.items():
        recipe = recipe.replace(f"{{{key}}}", value)
    leftover = sorted(set(_PLACEHOLDER.findall(recipe)) - keep)
    if leftover:
        raise BuildError(f"recipe template placeholders without a value: {', '.join(leftover)}")
    return recipe


def build_component(
    project_root: Path,
    out: Path,
    *,
    name: str = DEFAULT_COMPONENT_NAME,
    version: str | None = None,
    bucket: str | None = None,
    region: str | None = None,
    publisher: str = DEFAULT_PUBLISHER,
    template: Path | None = None,
    constraints: Path | None = None,
) -> BuildResult:
    """Write the artifact and recipe under `out`. Without `bucket`, the artifact URI keeps
    {BUCKET_NAME}: `gdk component publish` rewrites s3:// URIs with its own bucket
    (<bucket>-<region>-<account>), which a build cannot know. `constraints` is the lock shipped with
    the wheel (default: the project's constraints.txt)."""
    version = version or str(_project_table(project_root / "pyproject.toml").get("version", ""))
    if not _SEMVER.match(version):
        raise BuildError(f"component version {version!r} is not a semantic version (major.minor.patch)")
    if not _COMPONENT.match(name):
        raise BuildError(f"component name {name!r} is not valid (letters, digits, '.', '_', '-')")
    if bucket is not None and not _BUCKET.match(bucket):
        raise BuildError(f"{bucket!r} is not a valid S3 bucket name")
    if region is not None and not _REGION.match(region):
        raise BuildError(f"{region!r} is not an AWS region (e.g. eu-west-1)")
    template = template or project_root / "component" / "recipe.yaml"
    try:
        template_text = template.read_text(encoding="utf-8")
    except OSError as exc:
        raise BuildError(f"cannot read the recipe template: {exc}") from None
    constraints = constraints or project_root / CONSTRAINTS_FILE
    try:
        lock = constraints.read_bytes()
    except OSError as exc:
        raise BuildError(f"cannot read the lock the device installs with: {exc}") from None

    artifact_dir = out / "artifacts" / name / version
    artifact_dir.mkdir(parents=True, exist_ok=True)
    wheel = build_wheel(project_root, out / "wheel")
    wheel_bytes = wheel.read_bytes()
    (artifact_dir / ARTIFACT_NAME).write_bytes(_zip({wheel.name: wheel_bytes, CONSTRAINTS_FILE: lock}))
    # The device checks the wheel and the lock against these digests after copying them out of the
    # artifact directory, which the run-as user owns; the environment it builds is named after the
    # version and both digests.
    digest = hashlib.sha256(wheel_bytes).hexdigest()
    lock_digest = hashlib.sha256(lock).hexdigest()
    environment = environment_digest(digest, lock_digest)

    values = {
        "COMPONENT_NAME": name,
        "COMPONENT_VERSION": version,
        "COMPONENT_PUBLISHER": publisher,
        "WHEEL_FILE": wheel.name,
        "WHEEL_SHA256": digest,
        "CONSTRAINTS_FILE": CONSTRAINTS_FILE,
        "CONSTRAINTS_SHA256": lock_digest,
        "ENV_SHA256": environment,
        "ENV_NAME": environment_name(version, environment),
        "JOURNAL_FILE": JOURNAL_FILE,
        "RESTART_EXIT_CODE": str(RESTART_EXIT_CODE),
        "RESTART_EXIT_CODE_PLUS_ONE": str(RESTART_EXIT_CODE + 1),
    }
    if bucket is not None:
        values["BUCKET_NAME"] = bucket
    recipe_text = render_recipe(template_text, values, keep=frozenset({BUCKET_PLACEHOLDER}))
    recipe = out / "recipes" / "recipe.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(recipe_text, encoding="utf-8")
    return BuildResult(
        name,
        version,
        artifact_dir / ARTIFACT_NAME,
        recipe,
        wheel.name,
        bucket,
        region,
        wheel_sha256=digest,
        constraints_sha256=lock_digest,
        environment_sha256=environment,
    )


def environment_digest(wheel_sha256: str, constraints_sha256: str) -> str:
    """One digest of what an environment on the device is built from: the wheel and the lock pip
    installs it with. Its `.complete` marker holds it."""
    return hashlib.sha256(f"{wheel_sha256} {constraints_sha256}\n".encode()).hexdigest()


def environment_name(version: str, environment_sha256: str) -> str:
    """The directory of a version's Python environment on the device: a rebuilt wheel or a new lock of
    the same version gets a new one (12 hex digits keep the interpreter path short)."""
    return f"{version}-{environment_sha256[:12]}"
