"""The component's install and run scripts, run as real shell scripts against a stand-in nucleus that
changes file owners the way the real one does (tests/ops/component/nucleus.py): whatever root executes
or imports stays root's and writable by root alone, across installs, restarts and an upgrade from the
seed's layout. `previous_recipe.yaml` is the recipe before this rule: the same checks fail on it.

pip installs the wheel alone (no index, no dependencies), with the lock shipped beside it: the checks
are about who owns what, not about PyPI. Needs root (it hands files to another uid, as the nucleus does)."""

from __future__ import annotations

import hashlib
import os
import pwd
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from certrotator.device.greengrass.runtime import JOURNAL_FILE
from certrotator.ops.component import build as c

from .nucleus import FakeNucleus, interpreter_on_path, untrusted

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="changes file owners as the nucleus does: needs root"
)

PROJECT = Path(__file__).resolve().parents[3]
NAME = c.DEFAULT_COMPONENT_NAME
VERSION = "1.4.2"
RUN_AS = 12345  # ggc_user: a uid no account uses on this machine
PREVIOUS_RECIPE = Path(__file__).with_name("previous_recipe.yaml")


def _unused_uid() -> int:
    try:
        pwd.getpwuid(RUN_AS)
    except KeyError:
        return RUN_AS
    pytest.skip(f"uid {RUN_AS} belongs to an account here")


@dataclass
class Component:
    nucleus: FakeNucleus
    lifecycle: dict[str, Any]
    build: c.BuildResult

    def install(self, umask: int = 0o022) -> subprocess.CompletedProcess[str]:
        return self.nucleus.run_step(self.lifecycle["Install"]["Script"], umask)

    def agent_command(self) -> tuple[list[str], Path]:
        """Run the Run script as the nucleus would, traced: the agent command root executed (it stops at
        once here: its dependencies are not installed) and the directory it ran in."""
        done = self.nucleus.run_step("set -x\n" + self.lifecycle["Run"]["Script"])
        cwd = self.nucleus.work
        for line in done.stderr.splitlines():
            words = shlex.split(line.lstrip("+ ")) if line.startswith("+") else []
            if words[:1] == ["cd"]:
                cwd = Path(words[1])
            if "agent" in words and "--greengrass" in words:
                return words, cwd
        raise AssertionError(f"the run script started no agent:\n{done.stderr}")

    def what_root_runs(self) -> list[str]:
        """Everything root executes or imports when it starts the agent, not root's alone."""
        command, cwd = self.agent_command()
        executable = Path(command[0])
        environment = executable.parent.parent  # <env>/bin/<program>
        work = Path(command[command.index("--work") + 1])
        return untrusted(environment, work, cwd, python=environment / "bin" / "python")


def component(tmp_path: Path, template: Path | None = None, constraints: Path | None = None) -> Component:
    uid = _unused_uid()
    build = c.build_component(
        PROJECT,
        tmp_path / "build",
        name=NAME,
        version=VERSION,
        bucket="artifacts",
        template=template,
        constraints=constraints,
    )
    recipe = yaml.safe_load(build.recipe.read_text())
    (linux,) = [m for m in recipe["Manifests"] if m["Platform"]["os"] == "linux"]
    nucleus = FakeNucleus(
        tmp_path / "greengrass" / "v2", NAME, VERSION, uid, interpreter_on_path(tmp_path / "bin")
    )
    nucleus.deploy(build.artifact)
    return Component(nucleus, linux["Lifecycle"], build)


def plant_seed_venv(nucleus: FakeNucleus) -> Path:
    """The seed's layout: a venv its install made in {work:path} (then handed to ggc_user)."""
    venv = nucleus.work / "venv"
    site = venv / "lib" / "python3" / "site-packages"
    site.mkdir(parents=True)
    (venv / "bin").mkdir()
    (venv / "bin" / "python3").symlink_to("/usr/bin/python3")
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (site / "awsiot.py").write_text("# the seed's dependencies\n")
    return venv


def plant_modules(nucleus: FakeNucleus, marker: Path) -> None:
    """What the run-as user could leave in {work:path}: modules root would import from there if it ran
    `python -m` with that directory as its working directory."""
    code = f"open({str(marker)!r}, 'a').write(__file__ + '\\n')\n"
    for module in ("venv.py", "pip.py", "ensurepip.py", "hashlib.py"):
        (nucleus.work / module).write_text(code)
    (nucleus.work / "certrotator").mkdir()
    (nucleus.work / "certrotator" / "__init__.py").write_text(code)


# ------------------------------------------------------------------------------------------ tests


def test_what_root_runs_stays_roots_across_installs_restarts_and_the_seed_upgrade(tmp_path: Path) -> None:
    rotator = component(tmp_path)
    nucleus = rotator.nucleus
    seed_venv = plant_seed_venv(nucleus)
    marker = tmp_path / "planted-code-ran"
    plant_modules(nucleus, marker)
    (nucleus.work / JOURNAL_FILE).write_text('{"jobId": "j1", "phase": "installed", "extra": {}}')

    # A nucleus whose umask leaves everything writable: the script must not depend on it.
    first = rotator.install(umask=0o000)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "installed" in first.stdout and not seed_venv.exists()
    assert rotator.what_root_runs() == []
    command, cwd = rotator.agent_command()
    assert command[1:4] == ["-I", "-u", "-m"]  # isolated: no PYTHON* variables, no user site
    state = Path(command[command.index("--work") + 1])
    assert (state / JOURNAL_FILE).read_text().startswith('{"jobId": "j1"')  # moved once, root's now
    assert not (nucleus.work / JOURNAL_FILE).exists()
    assert cwd == state

    # Every rotation restarts the nucleus: ownership is changed again and the install runs again.
    environment = Path(command[0]).parent.parent
    before = (environment / ".complete").stat().st_mtime_ns
    again = rotator.install()
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"using {environment}" in again.stdout
    assert (environment / ".complete").stat().st_mtime_ns == before  # reused, not rebuilt
    (nucleus.work / JOURNAL_FILE).write_text('{"jobId": "forged", "phase": "installed", "extra": {}}')
    assert rotator.install().returncode == 0
    assert "forged" not in (state / JOURNAL_FILE).read_text()  # {work:path} is read once, never again
    assert rotator.what_root_runs() == []
    assert not marker.exists(), marker.read_text()

    # The package root imports is the one in the environment.
    probe = subprocess.run(
        [str(environment / "bin" / "python"), "-I", "-c", "import certrotator; print(certrotator.__file__)"],
        cwd="/",
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert probe.stdout.startswith(str(environment / "lib"))

    # A file in the environment handed to another user (by anyone): the next install rebuilds it.
    victim = next((environment / "lib").rglob("certrotator/cli.py"))
    os.chown(victim, RUN_AS, RUN_AS)
    rebuilt = rotator.install()
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert "installed" in rebuilt.stdout
    assert rotator.what_root_runs() == []


@pytest.mark.parametrize("changed", ["wheel", "constraints.txt"])
def test_a_file_changed_in_the_artifact_directory_is_refused(tmp_path: Path, changed: str) -> None:
    """The run-as user owns the artifact files: a wheel, or a lock that would steer pip to other versions,
    changed there is refused before pip runs."""
    rotator = component(tmp_path)
    name, digest = (
        (rotator.build.wheel, rotator.build.wheel_sha256)
        if changed == "wheel"
        else ("constraints.txt", rotator.build.constraints_sha256)
    )
    changed_file = rotator.nucleus.unarchived / "certrotator" / name
    changed_file.write_bytes(changed_file.read_bytes() + b"\n# changed\n")
    done = rotator.install()
    assert done.returncode != 0
    assert f"/{name} is not the file this recipe was built with (SHA-256 {digest})" in done.stderr
    assert done.stderr.count("is not the file this recipe was built with") == 1  # the other one is fine
    assert hashlib.sha256(changed_file.read_bytes()).hexdigest() != digest
    assert not list((rotator.nucleus.root / "certrotator").rglob("pyvenv.cfg"))
    assert not list((rotator.nucleus.root / "certrotator").rglob(".copies.*"))  # the copies are gone


def test_pip_installs_with_the_shipped_lock(tmp_path: Path) -> None:
    """The lock reaches pip: one that pins another release of certrotator makes pip refuse the wheel;
    the project's own lock installs it, and its environment's marker names wheel and lock."""
    other = tmp_path / "other-lock.txt"
    other.write_text("certrotator==9.9.9\n")
    refused = component(tmp_path / "other", constraints=other).install()
    assert refused.returncode != 0, refused.stdout
    # pip's words differ between releases (this is the venv's own pip): "(constraint) certrotator==9.9.9"
    # or "No matching distribution found for certrotator[device] 0.1.0".
    assert "ERROR" in refused.stderr and "certrotator" in refused.stderr, refused.stderr
    assert not list((tmp_path / "other").rglob(".complete"))

    rotator = component(tmp_path / "ours")
    done = rotator.install()
    assert done.returncode == 0, done.stdout + done.stderr
    environment = Path(rotator.agent_command()[0][0]).parent.parent
    assert environment.name == c.environment_name(VERSION, rotator.build.environment_sha256)
    assert (environment / ".complete").read_text().strip() == rotator.build.environment_sha256


def test_the_seeds_component_is_not_replaced_in_the_middle_of_its_rotation(tmp_path: Path) -> None:
    """The seed keeps its backup of the previous certificate and key in {work:path} while it rotates:
    the install fails (the deployment does) rather than strand it."""
    rotator = component(tmp_path)
    seed_venv = plant_seed_venv(rotator.nucleus)
    (rotator.nucleus.work / "private_key.bak").write_text("the previous key")
    done = rotator.install()
    assert done.returncode != 0 and "a rotation of the seed's component is in flight" in done.stderr
    assert seed_venv.is_dir() and (rotator.nucleus.work / "private_key.bak").exists()
    assert not list((rotator.nucleus.root / "certrotator").rglob("pyvenv.cfg"))


def test_install_refuses_a_directory_another_user_owns(tmp_path: Path) -> None:
    rotator = component(tmp_path)
    squatted = rotator.nucleus.root / "certrotator"
    squatted.mkdir()
    os.chown(squatted, RUN_AS, RUN_AS)
    done = rotator.install()
    assert done.returncode != 0
    assert "refusing to run as root" in done.stderr and f"{squatted} belongs to uid {RUN_AS}" in done.stderr


def test_the_checks_fail_on_the_previous_recipe(tmp_path: Path) -> None:
    """The recipe before this rule (venv in {work:path}, `python3 -m` run there): after the first
    restart, ggc_user owns what root runs, and a module planted in {work:path} runs as root."""
    rotator = component(tmp_path, template=PREVIOUS_RECIPE)
    marker = tmp_path / "planted-code-ran"
    plant_modules(rotator.nucleus, marker)
    rotator.install()
    assert marker.exists() and str(rotator.nucleus.work / "venv.py") in marker.read_text()  # ran as root
    marker.unlink()
    for module in ("venv.py", "pip.py", "ensurepip.py", "hashlib.py"):
        (rotator.nucleus.work / module).unlink()
    done = rotator.install()  # the next nucleus start
    assert done.returncode == 0, done.stdout + done.stderr
    problems = rotator.what_root_runs()
    venv = rotator.nucleus.work / "venv"
    assert any(p.startswith(f"{venv}/bin/") and f"owner uid {RUN_AS}" in p for p in problems), problems
    assert any(f"{venv}/lib/" in p and p.endswith(f"owner uid {RUN_AS}") for p in problems), problems
