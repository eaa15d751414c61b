"""The Greengrass component: recipe content and the `certrotator component build` output."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from typer.testing import CliRunner

from certrotator.device.greengrass.component_settings import parse_component_configuration
from certrotator.device.greengrass.runtime import RESTART_EXIT_CODE
from certrotator.ops.component import build as c
from certrotator.ops.component.cli import component_app
from certrotator.protocol import Topics
from certrotator.tomlcompat import tomllib

PROJECT = Path(__file__).resolve().parents[3]
NAME = "aws.greengrass.labs.CertificateRotator"
THING = "{iot:thingName}"  # the recipe's topics are the protocol's, with the recipe variable as thing


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> c.BuildResult:
    out = tmp_path_factory.mktemp("build") / "greengrass-build"
    return c.build_component(
        PROJECT, out, name=NAME, version="1.4.2", bucket="my-artifacts", region="eu-west-1"
    )


@pytest.fixture(scope="module")
def recipe(built: c.BuildResult) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(built.recipe.read_text())
    return data


def manifest(recipe: dict[str, Any], os_name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [m for m in recipe["Manifests"] if m["Platform"]["os"] == os_name]
    assert len(found) == 1
    return found[0]


# ---------------------------------------------------------------------------------------- recipe


def test_access_control_grants_exactly_the_protocol_topics(recipe: dict[str, Any]) -> None:
    policies = recipe["ComponentConfiguration"]["DefaultConfiguration"]["accessControl"]
    assert list(policies) == ["aws.greengrass.ipc.mqttproxy"]
    by_operation: dict[str, list[str]] = {}
    for policy_id, policy in policies["aws.greengrass.ipc.mqttproxy"].items():
        assert policy_id.startswith(f"{NAME}:mqttproxy:")
        (operation,) = policy["operations"]
        by_operation.setdefault(operation, []).extend(policy["resources"])
    assert by_operation["aws.greengrass#PublishToIoTCore"] == [
        Topics.job_update(THING, "+"),
        Topics.next_get(THING),
        Topics.create(THING),
        Topics.commit(THING),
        Topics.announce(THING),
    ]
    assert by_operation["aws.greengrass#SubscribeToIoTCore"] == Topics.device_subscriptions(THING)
    assert set(by_operation) == {"aws.greengrass#PublishToIoTCore", "aws.greengrass#SubscribeToIoTCore"}


def test_defaults_identity_and_nucleus_dependency(recipe: dict[str, Any], built: c.BuildResult) -> None:
    defaults = recipe["ComponentConfiguration"]["DefaultConfiguration"]
    assert (defaults["keyAlgorithm"], defaults["signingAlgorithm"]) == ("RSA-2048", "SHA256WITHRSA")
    parse_component_configuration(defaults, "file")  # the defaults pass the component's own validation
    assert recipe["RecipeFormatVersion"] == "2020-01-25"
    assert (recipe["ComponentName"], recipe["ComponentVersion"]) == (NAME, "1.4.2")
    assert recipe["ComponentDependencies"] == {
        "aws.greengrass.Nucleus": {"VersionRequirement": ">=2.6.0", "DependencyType": "SOFT"}
    }
    assert {m["Platform"]["os"] for m in recipe["Manifests"]} == {"linux", "windows"}
    for os_name in ("linux", "windows"):
        (artifact,) = manifest(recipe, os_name)["Artifacts"]
        assert artifact["Uri"] == f"s3://my-artifacts/{NAME}/1.4.2/certrotator.zip"
        assert artifact["Unarchive"] == "ZIP"


def test_linux_manifest_installs_a_root_owned_environment_runs_the_agent_and_restarts_greengrass(
    recipe: dict[str, Any], built: c.BuildResult
) -> None:
    """What the scripts say; tests/ops/component/test_root_trust.py runs them."""
    lifecycle = manifest(recipe, "linux")["Lifecycle"]
    install, run = lifecycle["Install"], lifecycle["Run"]
    assert install["RequiresPrivilege"] is True and run["RequiresPrivilege"] is True
    assert install["Timeout"] >= 600  # awscrt and cryptography wheels take a while on a small device
    script = install["Script"]
    assert f'home="{{kernel:rootPath}}/certrotator/{NAME}"' in script
    assert 'env="$home/envs/1.4.2-' + built.environment_sha256[:12] + '"' in script
    assert script.startswith("set -eu\numask 022\ncd /\n")
    for name in (built.wheel, "constraints.txt"):
        assert f'"{{artifacts:decompressedPath}}/certrotator/{name}" "$copies/{name}"' in script
    # Both copies are checked before pip sees them (test_root_trust.py runs the check).
    assert (
        f'python3 -I -S - "$copies/{built.wheel}" "{built.wheel_sha256}" '
        f'"$copies/constraints.txt" "{built.constraints_sha256}" <<'
    ) in script
    assert f'[ "$(cat "$env/.complete")" = "{built.environment_sha256}" ]' in script
    assert f'echo "{built.environment_sha256}" > "$env/.complete"' in script
    assert "python3 -m" not in script and 'python" -m' not in script  # always isolated (-I)
    # The system's Python without site: no site-packages (nor their .pth files) run as root.
    assert 'python3 -I -S -m venv "$env"' in script and "verify python3 -I -S - " in script
    assert "python3 -I -c" not in script and "python3 -I -m" not in script
    run_script = run["Script"]
    assert 'cd "$home/state" || exit 1' in run_script
    assert (
        f'"$home/envs/1.4.2-{built.environment_sha256[:12]}/bin/python" -I -u -m certrotator.cli agent --greengrass '
        '--root "{kernel:rootPath}" --work "$home/state"'
    ) in run_script
    assert "{work:path}" not in run_script
    assert f'if [ "$code" -eq {RESTART_EXIT_CODE} ]; then' in run_script
    assert "systemctl --no-block restart greengrass.service" in run_script
    assert run_script.rstrip().endswith('exit "$code"')  # any other exit status reaches the nucleus
    assert "Setenv" not in lifecycle  # -I ignores PYTHON* variables: -u instead of PYTHONUNBUFFERED


def test_windows_manifest_installs_an_environment_outside_the_work_path_and_restarts_greengrass(
    recipe: dict[str, Any], built: c.BuildResult
) -> None:
    lifecycle = manifest(recipe, "windows")["Lifecycle"]
    install, run = lifecycle["Install"], lifecycle["Run"]
    assert install["RequiresPrivilege"] is True and run["RequiresPrivilege"] is True
    home = f"{{kernel:rootPath}}\\certrotator\\{NAME}"
    environment = f"{home}\\envs\\1.4.2-{built.environment_sha256[:12]}"
    wheel = f"{home}\\wheel\\{built.wheel}"
    lock = f"{home}\\wheel\\constraints.txt"
    script = install["Script"]
    assert "\n" not in script  # cmd.exe gets one line: the folded scalar joined it
    assert script.startswith('cd /d "{kernel:rootPath}" && ')
    assert f'copy /y "{{artifacts:decompressedPath}}\\certrotator\\{built.wheel}" "{wheel}"' in script
    assert f'copy /y "{{artifacts:decompressedPath}}\\certrotator\\constraints.txt" "{lock}"' in script
    assert (
        f'"{wheel}" "{built.wheel_sha256}" "{lock}" "{built.constraints_sha256}" && '
        f'python -I -S -m venv "{environment}"'
    ) in script
    assert (
        f'"{environment}\\Scripts\\python.exe" -I -m pip install --disable-pip-version-check --no-input '
        f'-c "{lock}" "{wheel}[device]"'
    ) in script
    assert f'(echo {built.environment_sha256}> "{environment}\\.complete")' in script
    assert script.count("(") == script.count(")")
    run_script = run["Script"]
    assert "\n" not in run_script
    assert run_script.startswith(
        f'cd /d "{home}\\state" && "{environment}\\Scripts\\python.exe" -I -u -m certrotator.cli agent '
        f'--greengrass --root "{{kernel:rootPath}}" --work "{home}\\state"'
    )
    # Exactly the restart code (errorlevel N means >= N), tested when it runs, not when parsed.
    assert f"& if errorlevel {RESTART_EXIT_CODE} if not errorlevel {RESTART_EXIT_CODE + 1} (" in run_script
    assert "Restart-Service -Name greengrass -Force" in run_script
    assert "schtasks /Run /TN CertificateRotatorRestartGreengrass" in run_script


def test_the_digests_in_the_recipe_are_the_artifacts_wheel_and_lock(built: c.BuildResult) -> None:
    with zipfile.ZipFile(built.artifact) as artifact:
        wheel = hashlib.sha256(artifact.read(built.wheel)).hexdigest()
        lock = hashlib.sha256(artifact.read("constraints.txt")).hexdigest()
    assert (wheel, lock) == (built.wheel_sha256, built.constraints_sha256)
    assert lock == hashlib.sha256((PROJECT / "constraints.txt").read_bytes()).hexdigest()
    text = built.recipe.read_text()
    assert text.count(wheel) == text.count(lock) == 2  # checked on Linux and on Windows
    environment = c.environment_digest(wheel, lock)
    assert environment == built.environment_sha256
    assert text.count(environment) == 3  # the .complete marker: Linux compares and writes, Windows writes
    assert c.environment_name("1.4.2", environment) == f"1.4.2-{environment[:12]}"
    # A new lock (or wheel) is a new environment on the device.
    assert c.environment_digest(wheel, "0" * 64) != environment != c.environment_digest("0" * 64, lock)


def test_the_install_scripts_pass_the_lock_to_every_pip_install(recipe: dict[str, Any]) -> None:
    """Every pip install the device runs is constrained by the lock it copied and checked, on Linux and
    on Windows (test_root_trust.py shows pip on Linux obeys it)."""
    locks = {"linux": '"$copies/constraints.txt"', "windows": '\\wheel\\constraints.txt"'}
    for os_name, lock in locks.items():
        script = manifest(recipe, os_name)["Lifecycle"]["Install"]["Script"]
        commands = [rest.split("\n", 1)[0].split(" && ", 1)[0] for rest in script.split(" pip install ")[1:]]
        assert commands, os_name
        for command in commands:
            words = command.split()
            assert words[-1].endswith('[device]"'), command
            assert "-c" in words and words[words.index("-c") + 1].endswith(lock), command


def test_gdk_config_uses_the_custom_build() -> None:
    gdk = json.loads((PROJECT / "component" / "gdk-config.json").read_text())
    (name, settings), *_ = gdk["component"].items()
    assert name == NAME
    assert settings["build"] == {
        "build_system": "custom",
        "custom_build_command": ["certrotator", "component", "build"],
    }
    assert c.read_gdk_config(PROJECT / "component" / "gdk-config.json") == c.GdkSettings(
        NAME,
        settings["version"],
        settings["author"],
        settings["publish"]["bucket"],
        settings["publish"]["region"],
    )


# ----------------------------------------------------------------------------------------- build


def test_build_layout_and_placeholders(built: c.BuildResult) -> None:
    out = built.recipe.parents[1]
    assert built.recipe == out / "recipes" / "recipe.yaml"
    assert built.artifact == out / "artifacts" / NAME / "1.4.2" / "certrotator.zip"
    text = built.recipe.read_text()
    assert "{COMPONENT_" not in text and "{BUCKET_NAME}" not in text and "{WHEEL_FILE}" not in text
    assert "{RESTART_EXIT_CODE" not in text and "{CONSTRAINTS_" not in text and "{ENV_" not in text
    assert "{WHEEL_SHA256}" not in text
    assert "{kernel:rootPath}" in text and "{iot:thingName}" in text  # recipe variables stay for the device
    assert any("--region eu-west-1" in command for command in built.publish_commands())
    assert any(
        f"s3://my-artifacts/{NAME}/1.4.2/certrotator.zip" in command for command in built.publish_commands()
    )


def test_artifact_holds_an_installable_wheel_of_the_package(built: c.BuildResult, tmp_path: Path) -> None:
    with zipfile.ZipFile(built.artifact) as artifact:
        assert artifact.namelist() == [built.wheel, "constraints.txt"]
        wheel_bytes = artifact.read(built.wheel)
        assert artifact.read("constraints.txt") == (PROJECT / "constraints.txt").read_bytes()
    project = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]
    assert built.wheel == f"certrotator-{project['version']}-py3-none-any.whl"
    with zipfile.ZipFile(io.BytesIO(wheel_bytes)) as wheel:
        names = set(wheel.namelist())
        sources = {
            p.relative_to(PROJECT / "src").as_posix()
            for p in (PROJECT / "src" / "certrotator").rglob("*.py")
            if "__pycache__" not in p.parts
        }
        assert sources <= names
        assert {
            "certrotator/device/greengrass/runtime.py",
            "certrotator/device/greengrass/transport.py",
        } <= names
        assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
        dist_info = f"certrotator-{project['version']}.dist-info"
        metadata = wheel.read(f"{dist_info}/METADATA").decode()
        for requirement in project["dependencies"]:
            assert f"Requires-Dist: {requirement}\n" in metadata
        # Each Requires-Dist parses as pip parses it, and a requirement's own marker (python-pkcs11: not on
        # Windows) holds together with its extra's.
        requires = [
            Requirement(line.removeprefix("Requires-Dist: "))
            for line in metadata.splitlines()
            if line.startswith("Requires-Dist: ")
        ]

        def wanted(extra: str, platform: str) -> set[str]:
            environment = {"extra": extra, "sys_platform": platform}
            return {r.name for r in requires if r.marker is None or r.marker.evaluate(environment)}

        device = {Requirement(r).name for r in project["optional-dependencies"]["device"]}
        assert device <= wanted("device", "linux")
        assert device - wanted("device", "win32") == {"python-pkcs11"}
        assert not device & wanted("", "linux")
        assert "Provides-Extra: device\n" in metadata
        assert wheel.read(f"{dist_info}/entry_points.txt").decode() == (
            "[console_scripts]\ncertrotator = certrotator.cli:app\n"
        )
        # Every RECORD hash and size is right (pip refuses a wheel whose RECORD does not match).
        for line in wheel.read(f"{dist_info}/RECORD").decode().splitlines():
            path, digest, size = line.split(",")
            if path.endswith("RECORD"):
                assert digest == size == ""
                continue
            data = wheel.read(path)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert (digest, int(size)) == (f"sha256={expected}", len(data))

    # pip accepts it, and what it installs imports (no network: --no-deps, from the file).
    target = tmp_path / "site"
    wheel_file = tmp_path / built.wheel
    wheel_file.write_bytes(wheel_bytes)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--target",
            str(target),
            str(wheel_file),
        ],
        check=True,
        timeout=120,
    )
    probe = subprocess.run(
        [sys.executable, "-c", "import certrotator.ops.component.build as m; print(m.__file__)"],
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert probe.stdout.strip().startswith(str(target))


def test_build_is_reproducible(tmp_path: Path) -> None:
    first = c.build_component(PROJECT, tmp_path / "a", version="1.0.0")
    second = c.build_component(PROJECT, tmp_path / "b", version="1.0.0")
    assert first.artifact.read_bytes() == second.artifact.read_bytes()
    assert first.recipe.read_text() == second.recipe.read_text()


def test_a_new_lock_is_a_new_artifact_and_a_new_environment(tmp_path: Path) -> None:
    lock = tmp_path / "constraints.txt"
    lock.write_bytes((PROJECT / "constraints.txt").read_bytes() + b"# a new pin\n")
    before = c.build_component(PROJECT, tmp_path / "a", version="1.0.0")
    after = c.build_component(PROJECT, tmp_path / "b", version="1.0.0", constraints=lock)
    assert after.wheel_sha256 == before.wheel_sha256
    assert (
        after.constraints_sha256 == hashlib.sha256(lock.read_bytes()).hexdigest() != before.constraints_sha256
    )
    assert after.environment_sha256[:12] != before.environment_sha256[:12]
    with zipfile.ZipFile(after.artifact) as artifact:
        assert artifact.read("constraints.txt") == lock.read_bytes()
    assert f"/envs/1.0.0-{after.environment_sha256[:12]}" in after.recipe.read_text()
    with pytest.raises(c.BuildError, match="cannot read the lock"):
        c.build_component(PROJECT, tmp_path / "c", version="1.0.0", constraints=tmp_path / "missing.txt")


def test_without_a_bucket_the_placeholder_is_left_for_gdk_publish(tmp_path: Path) -> None:
    result = c.build_component(PROJECT, tmp_path / "out", version="2.0.0")
    recipe = yaml.safe_load(result.recipe.read_text())
    assert {m["Artifacts"][0]["Uri"] for m in recipe["Manifests"]} == {
        f"s3://{{BUCKET_NAME}}/{c.DEFAULT_COMPONENT_NAME}/2.0.0/certrotator.zip"
    }


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"version": "1.0"}, "not a semantic version"),
        ({"version": "v1.0.0"}, "not a semantic version"),
        ({"bucket": "My_Bucket"}, "not a valid S3 bucket"),
        ({"region": "europe"}, "not an AWS region"),
        ({"name": "bad name"}, "component name"),
    ],
)
def test_invalid_build_options(tmp_path: Path, options: dict[str, str], message: str) -> None:
    with pytest.raises(c.BuildError, match=message):
        c.build_component(
            PROJECT,
            tmp_path / "out",
            name=options.get("name", NAME),
            version=options.get("version", "1.0.0"),
            bucket=options.get("bucket"),
            region=options.get("region"),
        )


def test_unfilled_template_placeholders_are_an_error() -> None:
    with pytest.raises(c.BuildError, match=r"\{NEW_THING\}"):
        c.render_recipe("a: {COMPONENT_NAME}\nb: {NEW_THING}\n", {"COMPONENT_NAME": "x"})


def test_cli_build_as_gdk_runs_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GDK runs the custom build command in the folder of gdk-config.json; name, version and region
    come from there, the output lands in ./greengrass-build."""
    folder = tmp_path / "component"
    folder.mkdir()
    (folder / "gdk-config.json").write_text(
        json.dumps(
            {
                "component": {
                    "com.example.Rotator": {
                        "author": "Example Corp",
                        "version": "3.2.1",
                        "build": {
                            "build_system": "custom",
                            "custom_build_command": ["certrotator", "component", "build"],
                        },
                        "publish": {"bucket": "example", "region": "ap-southeast-2"},
                    }
                },
                "gdk_version": "1.1.0",
            }
        )
    )
    monkeypatch.chdir(folder)
    result = CliRunner().invoke(component_app, ["build", "--project", str(PROJECT)])
    assert result.exit_code == 0, result.output
    recipe = yaml.safe_load((folder / "greengrass-build" / "recipes" / "recipe.yaml").read_text())
    assert (recipe["ComponentName"], recipe["ComponentVersion"], recipe["ComponentPublisher"]) == (
        "com.example.Rotator",
        "3.2.1",
        "Example Corp",
    )
    assert (
        folder / "greengrass-build" / "artifacts" / "com.example.Rotator" / "3.2.1" / "certrotator.zip"
    ).is_file()

    bad = CliRunner().invoke(component_app, ["build", "--project", str(PROJECT), "--version", "latest"])
    assert bad.exit_code == 2 and "not a semantic version" in bad.output
