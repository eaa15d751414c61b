"""A stand-in for the parts of the Greengrass nucleus that decide who owns what a component runs.

What it models, from aws-greengrass-nucleus (`GenericExternalService.run` -> `updateComponentPathOwner`
-> `RunWithPathOwnershipHandler.updateOwner`, `ShellRunner`): before it runs a lifecycle step with a
freshly resolved run-as user (every install, so every nucleus start), the nucleus makes that user the
owner of everything inside the component's artifact directories (not the directories themselves) and of
its work directory, recursively, the directory included; it runs the step with `sh -c` in the work
directory, as root when the step requires privilege. Recipe variables are interpolated first.

`untrusted` is the test's own account of what root would execute or import from an environment, written
apart from the recipe's check so that one cannot hide a mistake of the other.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

# The nucleus's own pattern for a recipe variable of the same component (KernelConfigResolver).
RECIPE_VARIABLE = re.compile(r"\{([.\w-]+):([^:}]*)}")


@dataclass
class FakeNucleus:
    root: Path  # {kernel:rootPath}
    name: str
    version: str
    run_as: int  # the run-as user (ggc_user); uid and gid alike
    path: str  # PATH for the lifecycle scripts

    @property
    def work(self) -> Path:
        return self.root / "work" / self.name

    @property
    def artifacts(self) -> Path:
        return self.root / "packages" / "artifacts" / self.name / self.version

    @property
    def unarchived(self) -> Path:
        return self.root / "packages" / "artifacts-unarchived" / self.name / self.version

    def deploy(self, artifact: Path) -> None:
        """What a deployment leaves before the first install: the artifact downloaded and unzipped
        (into a directory named after the archive), a private work directory, a config directory."""
        (self.root / "config").mkdir(parents=True, exist_ok=True)
        self.artifacts.mkdir(parents=True, exist_ok=True)
        shutil.copy(artifact, self.artifacts / artifact.name)
        target = self.unarchived / artifact.stem
        target.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(artifact) as archive:
            archive.extractall(target)
        self.work.mkdir(mode=0o700, parents=True, exist_ok=True)

    def update_owner(self) -> None:
        """RunWithPathOwnershipHandler.updateOwner: the run-as user owns it all (modes unchanged)."""
        for directory in (self.artifacts, self.unarchived):
            for child in directory.iterdir():
                _chown_tree(child, self.run_as)
        _chown_tree(self.work, self.run_as)

    def interpolate(self, script: str) -> str:
        values = {
            "kernel:rootPath": str(self.root),
            "work:path": str(self.work),
            "artifacts:path": str(self.artifacts),
            "artifacts:decompressedPath": str(self.unarchived),
            "iot:thingName": "core-1",
        }
        for key, value in values.items():
            script = script.replace("{" + key + "}", value)
        left = RECIPE_VARIABLE.findall(script)
        assert not left, f"recipe variables the test nucleus does not know: {left}"
        return script

    def run_step(
        self, script: str, umask: int = 0o022, timeout_s: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """One privileged lifecycle step, after the ownership change the nucleus makes before it."""
        self.update_owner()
        home = self.root.parent / "root-home"
        home.mkdir(mode=0o700, exist_ok=True)
        env = {
            "PATH": self.path,
            "HOME": str(home),
            "LANG": "C.UTF-8",
            # No PyPI in tests: pip installs the wheel alone, from the file the recipe names.
            "PIP_NO_INDEX": "1",
            "PIP_NO_DEPS": "1",
            "PIP_NO_CACHE_DIR": "1",
        }
        return subprocess.run(
            ["sh", "-c", self.interpolate(script)],
            cwd=self.work,
            env=env,
            umask=umask,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )


def _chown_tree(path: Path, uid: int) -> None:
    os.chown(path, uid, uid, follow_symlinks=False)
    if path.is_dir() and not path.is_symlink():
        for where, dirs, files in os.walk(path):
            for name in dirs + files:
                os.chown(os.path.join(where, name), uid, uid, follow_symlinks=False)


# ------------------------------------------------------------------------------------ what root runs


def _untrusted_node(path: Path, may_be_sticky: bool) -> str | None:
    st = os.lstat(path)
    if st.st_uid != 0:
        return f"{path}: owner uid {st.st_uid}"
    if stat.S_ISLNK(st.st_mode) or not st.st_mode & 0o022:
        return None
    if may_be_sticky and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX:
        return None  # like /tmp: others cannot rename or delete root's entries in it
    return f"{path}: mode {stat.S_IMODE(st.st_mode):o}"


def _chain(path: Path) -> list[str]:
    """`path` (links resolved) and every directory above it."""
    real = Path(os.path.realpath(path))
    problems = [p for p in [_untrusted_node(real, False)] if p]
    problems += [p for d in real.parents if (p := _untrusted_node(d, True))]
    return problems


def untrusted(*tops: Path, python: Path | None = None) -> list[str]:
    """Everything in `tops`, every directory above them, every link target, and (with `python`) the
    interpreter and every sys.path entry it has when run isolated: what is not root's alone."""
    problems: list[str] = []
    trees = [Path(t) for t in tops]
    if python is not None:
        found = subprocess.run(
            [str(python), "-I", "-c", "import json, sys; print(json.dumps([sys.executable, *sys.path]))"],
            cwd="/",
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        executable, *path = json.loads(found.stdout)
        problems += _chain(Path(executable))
        trees += [Path(p) for p in path if p and Path(p).is_dir()]
    for top in dict.fromkeys(Path(os.path.realpath(t)) for t in trees):
        problems += _chain(top)
        for where, dirs, files in os.walk(top):
            for name in dirs + files:
                path = Path(where) / name
                if problem := _untrusted_node(path, False):
                    problems.append(problem)
                if path.is_symlink():
                    problems += _chain(path)
    return sorted(set(problems))


def interpreter_on_path(directory: Path) -> str:
    """A PATH whose python3 is this test's base interpreter (what `python3 -m venv` links to)."""
    directory.mkdir(parents=True, exist_ok=True)
    link = directory / "python3"
    if not link.exists():
        link.symlink_to(os.path.realpath(sys.executable))
    return f"{directory}:/usr/bin:/bin"
