"""Shared set-up for the CDK app tests: Node's jsii banner off, infra/ importable, one synthesis per
configuration for the whole session (import ~1-9 s, synthesis ~1-5 s each).

Nothing here imports aws_cdk at import time: without the infra extra each test module skips itself
(pytest.importorskip), which a conftest cannot do.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.infra.support import (
    INFRA_DIR,
    PCA_CONTEXT,
    PCA_RECONCILE_CONTEXT,
    PCA_RENEWAL_AUDIT_CONTEXT,
    RECONCILE_CONTEXT,
    RENEWAL_CONTEXT,
    Synth,
    synthesise_and_read,
)

# Before jsii starts its Node process: Node 20 is past end of life and jsii says so on every start.
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
if str(INFRA_DIR) not in sys.path:
    sys.path.append(str(INFRA_DIR))


@pytest.fixture(scope="session")
def code_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Lambda asset without the platform dependencies (they need PyPI; the template does not)."""
    from certrotator_infra.lambda_asset import stage_lambda_code

    return stage_lambda_code(tmp_path_factory.mktemp("lambda") / "code", dependencies=None)


@pytest.fixture(scope="session")
def iot_synth(tmp_path_factory: pytest.TempPathFactory, code_dir: Path) -> Synth:
    """cdk.json as shipped: AWS IoT issues the certificates."""
    return synthesise_and_read(tmp_path_factory, code_dir, {})


@pytest.fixture(scope="session")
def pca_synth(tmp_path_factory: pytest.TempPathFactory, code_dir: Path) -> Synth:
    return synthesise_and_read(tmp_path_factory, code_dir, PCA_CONTEXT)


@pytest.fixture(scope="session")
def iot_reconcile_synth(tmp_path_factory: pytest.TempPathFactory, code_dir: Path) -> Synth:
    """AWS IoT issues; the scheduled reconcile runs every 6 hours."""
    return synthesise_and_read(tmp_path_factory, code_dir, RECONCILE_CONTEXT)


@pytest.fixture(scope="session")
def pca_reconcile_synth(tmp_path_factory: pytest.TempPathFactory, code_dir: Path) -> Synth:
    """A Private CA issues; the scheduled reconcile runs daily at 03:00 UTC."""
    return synthesise_and_read(tmp_path_factory, code_dir, PCA_RECONCILE_CONTEXT)


@pytest.fixture(scope="session")
def iot_renewal_synth(tmp_path_factory: pytest.TempPathFactory, code_dir: Path) -> Synth:
    """AWS IoT issues; the renewal function runs daily (renew-before=30d); metrics namespace Fleet/Rotator."""
    return synthesise_and_read(tmp_path_factory, code_dir, RENEWAL_CONTEXT)


@pytest.fixture(scope="session")
def pca_renewal_audit_synth(tmp_path_factory: pytest.TempPathFactory, code_dir: Path) -> Synth:
    """A Private CA issues; renewal on a schedule and on Device Defender audit notifications."""
    return synthesise_and_read(tmp_path_factory, code_dir, PCA_RENEWAL_AUDIT_CONTEXT)
