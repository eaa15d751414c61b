#!/usr/bin/env python3
"""Build the Lambda functions' dependencies for the Lambda platform (needs PyPI access, not Docker).

    python build_lambda_deps.py [DEST]      # default: build/lambda-deps (cdk.json: LambdaDependenciesDir)

Installs the `cryptography` pinned in constraints.txt (with cffi/pycparser at the lock's versions) as CPython 3.14 / manylinux aarch64 wheels into
DEST, with a marker recording what it was built for; `cdk synth` refuses a missing or stale DEST.
Run it again after changing the pin or the Lambda runtime.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from certrotator_infra.config import DEFAULT_LAMBDA_DEPENDENCIES_DIR
from certrotator_infra.lambda_asset import DEPENDENCY_MARKER, build_dependencies

INFRA_DIR = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dest", nargs="?", type=Path, default=INFRA_DIR / DEFAULT_LAMBDA_DEPENDENCIES_DIR)
    args = parser.parse_args(argv)
    try:
        dest = build_dependencies(args.dest)
    except subprocess.CalledProcessError as exc:
        print(f"error: pip failed ({exc.returncode}); see its output above", file=sys.stderr)
        return 1
    marker = json.loads((dest / DEPENDENCY_MARKER).read_text(encoding="utf-8"))
    print(f"{dest}: {', '.join(marker['installed'])} for python{marker['python']} {marker['architecture']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
