"""Putting the app together: configuration from context, the stack, and cdk-nag at synthesis."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

from aws_cdk import App, Validations
from cdk_nag import AwsSolutionsChecks

from certrotator_infra.config import RotatorConfig
from certrotator_infra.stack import CertificateRotatorStack

INFRA_DIR: Final = Path(__file__).resolve().parents[1]
CDK_JSON: Final = INFRA_DIR / "cdk.json"


def cdk_json_context(path: Path = CDK_JSON) -> dict[str, Any]:
    """The "context" of cdk.json: the CDK CLI passes it to the app, an in-process App() does not."""
    context: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")).get("context", {})
    return context


def build(app: App, *, code_dir: Path, config: RotatorConfig | None = None) -> CertificateRotatorStack:
    """Add the stack to `app` and the AwsSolutions checks to its synthesis (an unacknowledged error
    finding makes `app.synth()` raise). `config` defaults to the app's context."""
    config = config or RotatorConfig.from_context(app.node.try_get_context)
    stack = CertificateRotatorStack(app, config, code_dir=code_dir)
    Validations.of(app).add_plugins(AwsSolutionsChecks(app))
    return stack
