"""The Lambda code asset: our package's handler modules (importable on their own), plus dependencies
built for the Lambda platform, checked before they are shipped."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.infra.support import CDK_MISSING

pytest.importorskip("aws_cdk", reason=CDK_MISSING)

from certrotator_infra import lambda_asset, reconcile, renewal, rotation_rules, stack
from certrotator_infra.lambda_asset import (
    DEPENDENCY_MARKER,
    LambdaAssetError,
    build_dependencies,
    check_dependencies,
    lambda_constraints,
    lambda_requirements,
    powertools_version,
    stage_lambda_code,
)
from certrotator_infra.permissions import SHADOW_NAME

from certrotator import protocol
from certrotator.backend.aws.adapters import DEFAULT_SHADOW_NAME

ROOT = Path(__file__).resolve().parents[2]


def locked_pin(name: str) -> str:
    """The lock's line for `name` that holds on Python 3.11 and later, the Lambda's 3.14 among them
    (constraints.txt: the versions the tests run), without its marker."""
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    (pin,) = [
        line.split(";")[0].strip()
        for line in lines
        if line.startswith(f"{name}==") and (";" not in line or line.endswith('python_version >= "3.11"'))
    ]
    return pin


def test_pins_come_from_the_lock() -> None:
    assert lambda_requirements() == [locked_pin("cryptography")]
    assert lambda_constraints() == [locked_pin("cffi"), locked_pin("pycparser")]
    assert f"aws-lambda-powertools=={powertools_version()}" == locked_pin("aws-lambda-powertools")


def test_a_pin_per_python_version_gives_the_lambdas_python_its_own(tmp_path: Path) -> None:
    lock = tmp_path / "constraints.txt"
    lock.write_text(
        'cryptography==50.0.2; python_version >= "3.11"\ncryptography==49.0.0; python_version < "3.11"\n'
        "aws_lambda_powertools==3.37.0  # a comment\n"
        "CFFI==2.1.1\n"
        "pycparser==3.11; python_version < '3.11'\n"
        "pycparser==3.12; python_version >= '3.11' and python_version < '3.15'\n"
    )
    assert lambda_requirements(lock) == ["cryptography==50.0.2"]
    assert lambda_constraints(lock) == ["cffi==2.1.1", "pycparser==3.12"]
    assert powertools_version(lock) == "3.37.0"


@pytest.mark.parametrize(
    "lines",
    [
        'cffi==2.1.1\npycparser==3.12; python_version < "3.14"\n',  # no line for 3.14
        'cffi==2.1.1\npycparser==3.12; sys_platform == "linux"\n',  # a marker this cannot evaluate
        "cffi==2.1.1\npycparser==3.12\npycparser==3.11\n",  # two lines
        "cffi==2.1.1\npycparser>=3.12\n",  # not a pin
    ],
    ids=["none-for-3.14", "other-marker", "two", "range"],
)
def test_a_package_without_one_pin_for_the_lambdas_python_is_refused(tmp_path: Path, lines: str) -> None:
    lock = tmp_path / "constraints.txt"
    lock.write_text(lines)
    with pytest.raises(LambdaAssetError, match=r"does not pin pycparser once for Python 3\.14"):
        lambda_constraints(lock)


def test_runtime_constants_agree() -> None:
    assert stack.RUNTIME.name == f"python{lambda_asset.LAMBDA_PYTHON_VERSION}"
    assert stack.ARCHITECTURE.name == lambda_asset.LAMBDA_ARCHITECTURE
    assert all(p.endswith("_aarch64") for p in lambda_asset.PIP_PLATFORMS)  # arm64


def test_stack_constants_agree_with_the_package() -> None:
    assert SHADOW_NAME == DEFAULT_SHADOW_NAME
    assert json.loads(stack.JOB_DOCUMENT) == protocol.JOB_DOCUMENT
    assert f"FROM '{protocol.Topics.create('+')}'" in rotation_rules.CREATE_SQL
    assert f"FROM '{protocol.Topics.commit('+')}'" in rotation_rules.COMMIT_SQL
    # every terminal status's event topic, selected by its fifth level, and nothing from the device
    assert "FROM '$aws/events/jobExecution/+/+' WHERE " in rotation_rules.TERMINAL_SQL
    levels = [
        protocol.Topics.job_execution_event("j", status).split("/")[4]
        for status in protocol.TERMINAL_EXECUTION_STATUSES
    ]
    assert rotation_rules.TERMINAL_SQL.split(" WHERE ", 1)[1] == " OR ".join(
        f"topic(5) = '{lv}'" for lv in levels
    )
    assert "statusDetails" not in rotation_rules.TERMINAL_SQL
    from certrotator.backend.aws import lambdas

    for handler in stack.HANDLERS.values():
        module, _, name = handler.rpartition(".")
        assert module == lambdas.__name__
        assert callable(getattr(lambdas, name))


OPS_FILES = {
    "certrotator/ops/__init__.py",
    "certrotator/ops/aws/__init__.py",
    "certrotator/ops/aws/clients.py",
    "certrotator/ops/aws/job_overrides.py",
    "certrotator/ops/aws/jobs.py",
    "certrotator/ops/reconcile/__init__.py",
    "certrotator/ops/reconcile/aws.py",
    "certrotator/ops/reconcile/policy.py",
    "certrotator/ops/reconcile/runner.py",
    "certrotator/ops/schedule/__init__.py",
    "certrotator/ops/schedule/aws.py",
    "certrotator/ops/schedule/facts.py",
    "certrotator/ops/schedule/policy.py",
    "certrotator/ops/schedule/runner.py",
    "certrotator/ops/schedule/settings.py",
}


def test_staged_code_holds_only_the_backend_and_reconcile_modules(code_dir: Path) -> None:
    files = {p.relative_to(code_dir).as_posix() for p in code_dir.rglob("*") if p.is_file()}
    assert "certrotator/backend/aws/lambdas.py" in files
    assert {
        "certrotator/__init__.py",
        "certrotator/algorithms.py",
        "certrotator/compat.py",
        "certrotator/crypto.py",
        "certrotator/protocol.py",
        "certrotator/strict_json.py",
    } <= files
    assert files >= OPS_FILES  # and none of ops/'s CLI modules, which need typer and rich
    assert all(
        f.startswith(
            (
                "certrotator/__init__",
                "certrotator/algorithms",
                "certrotator/compat",
                "certrotator/crypto",
                "certrotator/protocol",
                "certrotator/strict_json",
                "certrotator/backend/",
            )
        )
        or f in OPS_FILES
        for f in files
    ), files
    assert all(f.endswith(".py") for f in files)


# Runs in a fresh interpreter with only the staged code on the path: importing a module that is neither
# the standard library, nor staged, nor what the Lambda provides fails, and every certrotator module
# must come from the staged copy.
IMPORT_CHECK = """
import importlib, importlib.abc, json, sys
allowed, entry_points = set(sys.argv[1].split(",")), sys.argv[2].split(",")

class OnlyWhatTheLambdaHas(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in sys.stdlib_module_names or top in allowed:
            return None
        raise ImportError(f"{name} is not available in the Lambda function")

sys.meta_path.insert(0, OnlyWhatTheLambdaHas())
found = {}
for entry_point in entry_points:
    module_name, _, attribute = entry_point.rpartition(".")
    found[entry_point] = callable(getattr(importlib.import_module(module_name), attribute))
ours = {n: getattr(m, "__file__", None) for n, m in sys.modules.items() if n.split(".")[0] == "certrotator"}
print(json.dumps({"entry_points": found, "ours": ours}))
"""
# boto3 and its dependencies come with the Lambda runtime; cryptography (+ cffi) is staged from
# build/lambda-deps; Powertools comes from the layer, which only the three handler functions have.
RUNTIME_MODULES = {"boto3", "botocore", "s3transfer", "jmespath", "dateutil", "six", "urllib3"}
DEPENDENCY_MODULES = {"cryptography", "cffi", "_cffi_backend", "pycparser"}
POWERTOOLS_MODULES = {"aws_lambda_powertools", "typing_extensions", "jmespath"}


def import_staged(code_dir: Path, cwd: Path, entry_points: list[str], *, powertools: bool) -> dict[str, Any]:
    allowed = (
        {"certrotator"} | RUNTIME_MODULES | DEPENDENCY_MODULES | (POWERTOOLS_MODULES if powertools else set())
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(code_dir)}
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_CHECK, ",".join(sorted(allowed)), ",".join(entry_points)],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    assert all(answer["entry_points"].values()), answer["entry_points"]
    for name, file in answer["ours"].items():
        assert file is not None and Path(file).is_relative_to(code_dir), (name, file)
    return answer


def test_the_three_handlers_import_from_the_staged_code(code_dir: Path, tmp_path: Path) -> None:
    answer = import_staged(code_dir, tmp_path, list(stack.HANDLERS.values()), powertools=True)
    assert "certrotator.backend.aws.lambdas" in answer["ours"]


def test_the_scheduled_reconcile_imports_from_the_staged_code_without_powertools(
    code_dir: Path, tmp_path: Path
) -> None:
    answer = import_staged(code_dir, tmp_path, [reconcile.HANDLER], powertools=False)
    assert {"certrotator.ops.reconcile.aws", "certrotator.ops.aws.clients"} <= answer["ours"].keys()


def test_the_renewal_function_imports_from_the_staged_code_without_powertools(
    code_dir: Path, tmp_path: Path
) -> None:
    answer = import_staged(code_dir, tmp_path, [renewal.HANDLER], powertools=False)
    assert {"certrotator.ops.schedule.aws", "certrotator.ops.aws.jobs"} <= answer["ours"].keys()
    # the report's certificate details load cryptography only when asked: not at import
    assert "certrotator.crypto" not in answer["ours"]


def test_the_import_check_refuses_what_the_lambda_lacks(code_dir: Path, tmp_path: Path) -> None:
    """The check can fail: the reconcile command's module is not staged, and typer (which it needs) is
    installed here but not in the function."""
    with pytest.raises(AssertionError, match=r"No module named 'certrotator\.ops\.reconcile\.cli'"):
        import_staged(
            code_dir, tmp_path, ["certrotator.ops.reconcile.cli.reconcile_command"], powertools=False
        )
    with pytest.raises(AssertionError, match="typer is not available in the Lambda function"):
        import_staged(code_dir, tmp_path, ["typer.run"], powertools=False)


def write_marker(directory: Path, **overrides: object) -> None:
    marker = {
        "python": lambda_asset.LAMBDA_PYTHON_VERSION,
        "architecture": lambda_asset.LAMBDA_ARCHITECTURE,
        "requirements": lambda_requirements(),
        "constraints": lambda_constraints(),
    } | overrides
    directory.mkdir(parents=True, exist_ok=True)
    (directory / DEPENDENCY_MARKER).write_text(json.dumps(marker))


def test_missing_dependencies_are_refused(tmp_path: Path) -> None:
    with pytest.raises(LambdaAssetError, match=r"missing.*build_lambda_deps\.py"):
        stage_lambda_code(tmp_path / "code", dependencies=tmp_path / "deps")
    assert not (tmp_path / "code").exists()


@pytest.mark.parametrize(
    "overrides",
    [
        {"architecture": "x86_64"},
        {"python": "3.12"},
        {"requirements": ["cryptography==1.0"]},
        {"constraints": ["cffi==1.0", "pycparser==1.0"]},
        {"constraints": None},  # built before the indirect dependencies were pinned
    ],
    ids=["architecture", "python", "requirements", "constraints", "no-constraints"],
)
def test_stale_dependencies_are_refused(tmp_path: Path, overrides: dict[str, object]) -> None:
    write_marker(tmp_path / "deps", **overrides)
    with pytest.raises(LambdaAssetError, match="were built for"):
        check_dependencies(tmp_path / "deps")


def test_matching_dependencies_are_staged_with_the_code(tmp_path: Path) -> None:
    deps = tmp_path / "deps"
    write_marker(deps)
    (deps / "cryptography").mkdir()
    (deps / "cryptography" / "__init__.py").write_text("")
    staged = stage_lambda_code(tmp_path / "code", dependencies=deps)
    assert (staged / "cryptography" / "__init__.py").is_file()
    assert (staged / "certrotator" / "backend" / "aws" / "lambdas.py").is_file()


# Installs what it is asked for as pip would with the lock: each requirement and each constraint (as if
# cryptography needed cffi and cffi pycparser), plus the distributions FAKE_PIP_EXTRA names.
FAKE_PIP = """
import json, os, pathlib, sys
args = sys.argv[1:]
target = pathlib.Path(args[args.index("--target") + 1])
constraints = pathlib.Path(args[args.index("-c") + 1]).read_text()
requirements = [a for a in args if "==" in a]
pins = requirements + constraints.split() + os.environ.get("FAKE_PIP_EXTRA", "").split()
(target / "cryptography").mkdir(parents=True)
for pin in pins:
    name, _, version = pin.partition("==")
    (target / f"{name.replace('-', '_')}-{version}.dist-info").mkdir()
(target / "bin").mkdir()
(target / "bin" / "tool").write_text("")
pathlib.Path(sys.argv[0]).with_suffix(".json").write_text(json.dumps({"args": args, "constraints": constraints}))
"""


def fake_pip(tmp_path: Path) -> Path:
    fake = tmp_path / "pip.py"
    fake.write_text(FAKE_PIP)
    return fake


def test_build_dependencies_asks_pip_for_lambda_platform_wheels_at_the_locks_versions(tmp_path: Path) -> None:
    fake = fake_pip(tmp_path)
    dest = build_dependencies(tmp_path / "deps", pip=[sys.executable, str(fake)])
    called = json.loads(fake.with_suffix(".json").read_text())
    args = called["args"]
    assert args[0] == "install"
    assert args[args.index("--python-version") + 1] == "3.14"
    assert args[args.index("--implementation") + 1] == "cp"
    assert [args[i + 1] for i, a in enumerate(args) if a == "--platform"] == list(lambda_asset.PIP_PLATFORMS)
    assert "--only-binary=:all:" in args
    assert args[-1] == locked_pin("cryptography")
    # cffi and pycparser at the lock's versions for Python 3.14, as constraints (pip would evaluate the
    # lock's own markers for the Python it runs on); the file is gone afterwards.
    assert called["constraints"] == f"{locked_pin('cffi')}\n{locked_pin('pycparser')}\n"
    assert not Path(args[args.index("-c") + 1]).exists()
    assert not (dest / "bin").exists()
    marker = json.loads((dest / DEPENDENCY_MARKER).read_text())
    assert marker["installed"] == sorted(
        pin.replace("==", "-")
        for pin in (locked_pin("cffi"), locked_pin("cryptography"), locked_pin("pycparser"))
    )
    assert marker["constraints"] == [locked_pin("cffi"), locked_pin("pycparser")]
    check_dependencies(dest)


@pytest.mark.parametrize("extra", ["six==1.17.0", "cffi==1.0.0"], ids=["unpinned", "other-version"])
def test_a_distribution_the_lock_does_not_pin_for_the_lambda_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: str
) -> None:
    """What pip brings beyond the pinned set (a new dependency of cryptography, a version the lock does not
    name) stops the build, and the directory gets no marker: synthesis refuses it."""
    monkeypatch.setenv("FAKE_PIP_EXTRA", extra)
    with pytest.raises(LambdaAssetError, match=re.escape(f"pip installed {extra.replace('==', '-')} into")):
        build_dependencies(tmp_path / "deps", pip=[sys.executable, str(fake_pip(tmp_path))])
    with pytest.raises(LambdaAssetError, match="missing"):
        check_dependencies(tmp_path / "deps")
