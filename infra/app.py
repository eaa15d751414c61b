#!/usr/bin/env python3
"""CDK entry point (`cdk synth` / `cdk deploy` run it from this directory; see README.md)."""

from __future__ import annotations

import sys
from pathlib import Path

from aws_cdk import App
from certrotator_infra.application import build
from certrotator_infra.config import ContextError, RotatorConfig
from certrotator_infra.lambda_asset import LambdaAssetError, stage_lambda_code

INFRA_DIR = Path(__file__).resolve().parent
STAGING_DIR = INFRA_DIR / "build" / "lambda-code"


def main() -> int:
    app = App()
    try:
        config = RotatorConfig.from_context(app.node.try_get_context)
        dependencies = INFRA_DIR / config.lambda_dependencies_dir
        code_dir = stage_lambda_code(STAGING_DIR, dependencies=dependencies)
        build(app, code_dir=code_dir, config=config)
    except (ContextError, LambdaAssetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    app.synth()
    return 0


if __name__ == "__main__":
    sys.exit(main())
