"""The Lambda code asset: our own `certrotator` package plus the one compiled dependency it needs.

Bundling in Docker is not an option here, so the asset is a plain directory assembled at synthesis
time without network access:

* the `certrotator` modules the Lambda entry points import (`crypto`, `protocol`, `strict_json`, `backend/**`),
  copied from `src/` — the same handler code the local engine runs — and those of the scheduled
  reconcile (`ops/reconcile/{aws,policy,runner}.py`, `ops/aws/clients.py`), the same code as
  `certrotator reconcile --aws`, and those of the renewal function (`ops/schedule/{aws,facts,policy,
  runner,settings}.py`, `ops/aws/{jobs,job_overrides}.py`), the same code as `certrotator schedule --aws`;
* `cryptography` (with `cffi` and `pycparser`) built for the Lambda platform (CPython 3.14 on
  arm64 / Amazon Linux 2023), prepared once with network access by `build_lambda_deps.py`
  (`pip install --target ... --platform ... --only-binary=:all:`) into `build/lambda-deps`, all three
  at the versions of the lock (constraints.txt) for the Lambda's Python;

and nothing else: `boto3`/`botocore` come from the Lambda Python runtime, and
`aws-lambda-powertools` from the public Powertools for AWS Lambda layer (see `stack.py`).
"""

from __future__ import annotations

import json
import operator
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
PACKAGE_DIR: Final = REPO_ROOT / "src" / "certrotator"
# The lock: the exact versions the tests ran (pyproject.toml has ranges).
CONSTRAINTS: Final = REPO_ROOT / "constraints.txt"

# The Lambda platform; stack.py uses the same values for the functions and the Powertools layer.
LAMBDA_PYTHON_VERSION: Final = "3.14"
LAMBDA_ARCHITECTURE: Final = "arm64"
# pip --platform tags for Amazon Linux 2023 (glibc 2.34) on arm64, newest first: pip takes each tag
# literally, so the older manylinux levels that wheels are still published for are listed too.
PIP_PLATFORMS: Final = ("manylinux_2_34_aarch64", "manylinux_2_28_aarch64", "manylinux2014_aarch64")

# What the entry points (certrotator.backend.aws.lambdas, certrotator.ops.reconcile.aws.scheduled_handler,
# certrotator.ops.schedule.aws.scheduled_handler) import, relative to the package: only these of ops/,
# whose other modules need the CLI's dependencies.
PACKAGE_SOURCES: Final = (
    "__init__.py",
    "algorithms.py",
    "compat.py",  # StrEnum and UTC on Python 3.10 too (the Lambda runs 3.14: the standard library's)
    "crypto.py",
    "protocol.py",
    "strict_json.py",  # protocol's JSON decoding
    "backend",
    "ops/__init__.py",
    "ops/aws/__init__.py",
    "ops/aws/clients.py",
    "ops/aws/job_overrides.py",
    "ops/aws/jobs.py",
    "ops/reconcile/__init__.py",
    "ops/reconcile/aws.py",
    "ops/reconcile/policy.py",
    "ops/reconcile/runner.py",
    "ops/schedule/__init__.py",
    "ops/schedule/aws.py",
    "ops/schedule/facts.py",
    "ops/schedule/policy.py",
    "ops/schedule/runner.py",
    "ops/schedule/settings.py",
)
# Core dependencies of certrotator that the Lambda needs and the runtime does not provide.
LAMBDA_DEPENDENCIES: Final = ("cryptography",)
# What pip installs for them (cryptography needs cffi, cffi needs pycparser): held to the lock's versions
# by a constraints file, so that two builds of the asset agree. pip bringing anything else is an error.
LAMBDA_INDIRECT_DEPENDENCIES: Final = ("cffi", "pycparser")
DEPENDENCY_MARKER: Final = ".certrotator-lambda-deps.json"


class LambdaAssetError(RuntimeError):
    """The Lambda asset cannot be assembled; the text says what to run."""


_COMPARISONS: Final[dict[str, Callable[[tuple[int, ...], tuple[int, ...]], bool]]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}
_PYTHON_VERSION_CLAUSE: Final = re.compile(
    r"""python_version\s*(<=|>=|==|!=|<|>)\s*(["'])(\d+(?:\.\d+)*)\2"""
)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _holds_on_lambda(marker: str) -> bool | None:
    """Whether a lock line's environment marker holds on the Lambda's Python; None for a marker other than
    python_version comparisons joined by `and` (the only kind the lock has: a package pinned per Python)."""
    lambda_python = _version(LAMBDA_PYTHON_VERSION)
    holds = True
    for clause in marker.split(" and "):
        match = _PYTHON_VERSION_CLAUSE.fullmatch(clause.strip())
        if match is None:
            return None
        holds = holds and _COMPARISONS[match[1]](lambda_python, _version(match[3]))
    return holds


def _locked(constraints: Path) -> dict[str, list[str | None]]:
    """The lock's exact pins ("name==version") that hold on the Lambda's Python, by normalised distribution
    name: a line without a marker holds everywhere, one with a python_version marker where it says. None
    stands for a line whose marker cannot be evaluated here."""
    pins: dict[str, list[str | None]] = {}
    for line in constraints.read_text(encoding="utf-8").splitlines():
        requirement, _, marker = line.split("#", 1)[0].partition(";")
        name, equals, version = requirement.strip().partition("==")
        if not equals:
            continue
        name = re.sub(r"[-_.]+", "-", name.strip()).lower()
        holds = _holds_on_lambda(marker) if marker.strip() else True
        if holds is None:
            pins.setdefault(name, []).append(None)
        elif holds:
            pins.setdefault(name, []).append(f"{name}=={version.strip()}")
    return pins


def _lambda_pins(constraints: Path, names: Sequence[str]) -> list[str]:
    """The one pin for the Lambda's Python of each of `names`; an error names those without exactly one."""
    locked = _locked(constraints)
    found: list[str] = []
    unpinned: list[str] = []
    for name in names:
        match locked.get(name, []):
            case [str(pin)]:
                found.append(pin)
            case _:
                unpinned.append(name)
    if unpinned:
        raise LambdaAssetError(
            f"{constraints} does not pin {', '.join(unpinned)} once for Python {LAMBDA_PYTHON_VERSION} "
            "(name==version, with no marker or a python_version one)"
        )
    return found


def lambda_requirements(constraints: Path = CONSTRAINTS) -> list[str]:
    """The pinned requirements (e.g. "cryptography==50.0.2") of LAMBDA_DEPENDENCIES, from the lock
    (constraints.txt), so the Lambda runs the version the tests ran."""
    return _lambda_pins(constraints, LAMBDA_DEPENDENCIES)


def lambda_constraints(constraints: Path = CONSTRAINTS) -> list[str]:
    """The lock's pins of LAMBDA_INDIRECT_DEPENDENCIES for the Lambda's Python (e.g. "cffi==2.1.1"): what
    build_dependencies hands pip as constraints."""
    return _lambda_pins(constraints, LAMBDA_INDIRECT_DEPENDENCIES)


def powertools_version(constraints: Path = CONSTRAINTS) -> str:
    """The aws-lambda-powertools version of the lock (the layer version to deploy)."""
    (requirement,) = _lambda_pins(constraints, ("aws-lambda-powertools",))
    match = re.fullmatch(r"aws-lambda-powertools==(\d+\.\d+\.\d+)", requirement)
    if match is None:
        raise LambdaAssetError(f"{constraints} must pin aws-lambda-powertools==X.Y.Z, found {requirement!r}")
    return match[1]


def _expected_marker(requirements: Sequence[str], constraints: Sequence[str]) -> dict[str, object]:
    return {
        "python": LAMBDA_PYTHON_VERSION,
        "architecture": LAMBDA_ARCHITECTURE,
        "requirements": list(requirements),
        "constraints": list(constraints),
    }


def _unpinned(installed: Sequence[str], pins: Sequence[str]) -> list[str]:
    """The installed distributions ("name-version", from their .dist-info) that are not one of `pins`."""
    wanted = set(pins)
    found = []
    for distribution in installed:
        name, _, version = distribution.rpartition("-")
        if f"{re.sub(r'[-_.]+', '-', name).lower()}=={version}" not in wanted:
            found.append(distribution)
    return found


def build_dependencies(dest: Path, *, pip: Sequence[str] | None = None) -> Path:
    """Install the Lambda's dependencies for the Lambda platform into `dest` (needs PyPI access).

    `dest` is replaced. A marker file records platform and requirements, so a later synthesis can tell
    a matching directory from a stale one.
    """
    requirements = lambda_requirements()
    pinned = lambda_constraints()
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="lambda-deps-") as scratch:
        # The lock's own lines cannot be handed to pip: pip evaluates their markers for the Python it runs
        # on, not for --python-version.
        lock = Path(scratch) / "constraints.txt"
        lock.write_text("".join(f"{pin}\n" for pin in pinned), encoding="utf-8")
        command = [
            *(pip or [sys.executable, "-m", "pip"]),
            "install",
            "--quiet",
            "--target",
            str(dest),
            "--implementation",
            "cp",
            "--python-version",
            LAMBDA_PYTHON_VERSION,
            *(arg for platform in PIP_PLATFORMS for arg in ("--platform", platform)),
            "--only-binary=:all:",
            "--no-compile",
            "-c",
            str(lock),
            *requirements,
        ]
        subprocess.run(command, check=True)
    # Console scripts (e.g. cffi's) are of no use in a Lambda.
    shutil.rmtree(dest / "bin", ignore_errors=True)
    installed = sorted(p.name.removesuffix(".dist-info") for p in dest.glob("*.dist-info"))
    if unpinned := _unpinned(installed, [*requirements, *pinned]):
        raise LambdaAssetError(
            f"pip installed {', '.join(unpinned)} into {dest}, which the lock does not pin for the Lambda: "
            "add the package to LAMBDA_INDIRECT_DEPENDENCIES (and constraints.txt)"
        )
    marker = _expected_marker(requirements, pinned) | {"installed": installed}
    (dest / DEPENDENCY_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return dest


def check_dependencies(deps_dir: Path) -> None:
    """Raise LambdaAssetError unless `deps_dir` holds the dependencies build_dependencies would make now."""
    rebuild = f"run `python build_lambda_deps.py` in infra/ (needs PyPI access) to create {deps_dir}"
    marker_path = deps_dir / DEPENDENCY_MARKER
    if not marker_path.is_file():
        raise LambdaAssetError(
            f"the Lambda dependencies are missing: {marker_path} does not exist; {rebuild}"
        )
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LambdaAssetError(f"cannot read {marker_path} ({exc}); {rebuild}") from None
    expected = _expected_marker(lambda_requirements(), lambda_constraints())
    found = {key: marker.get(key) for key in expected} if isinstance(marker, dict) else marker
    if found != expected:
        raise LambdaAssetError(
            f"the Lambda dependencies in {deps_dir} were built for {found}, the stack needs {expected}; {rebuild}"
        )


def stage_lambda_code(dest: Path, *, dependencies: Path | None, package_dir: Path = PACKAGE_DIR) -> Path:
    """Assemble the asset directory `dest` (replaced): the certrotator modules, plus the contents of the
    `dependencies` directory (checked first) unless it is None (template-only synthesis, e.g. tests)."""
    if dependencies is not None:
        check_dependencies(dependencies)
    if not (package_dir / "backend" / "aws" / "lambdas.py").is_file():
        raise LambdaAssetError(f"{package_dir} is not the certrotator package (no backend/aws/lambdas.py)")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if dependencies is not None:
        shutil.copytree(dependencies, dest, dirs_exist_ok=True)
    target = dest / "certrotator"
    for name in PACKAGE_SOURCES:
        source = package_dir / name
        if source.is_dir():
            for path in sorted(source.rglob("*.py")):
                if "__pycache__" in path.parts:
                    continue
                copy = target / name / path.relative_to(source)
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, copy)
        else:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target / name)
    return dest
