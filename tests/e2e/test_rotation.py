"""Whole rotations on the local IoT Core, over real mutual TLS, with the real agent."""

from __future__ import annotations

from pathlib import Path

import pytest

from certrotator.local.engine import LocalIoTCore
from certrotator.protocol import JobExecutionStatus

from .harness import running_fleet

pytestmark = pytest.mark.timeout(120)


def test_a_small_fleet_rotates_end_to_end(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        devices = fleet.provision(3)
        fleet.start_agents()
        fleet.engine.call(lambda e: e.create_job("rotate-1", groups=["fleet"], unlimited_rollout=True))

        statuses = fleet.wait_terminal("rotate-1", 3)

        assert set(statuses.values()) == {JobExecutionStatus.SUCCEEDED}
        for device in devices:
            assert device.pair_matches()
            new_id = device.certificate_id()
            assert new_id != device.first_certificate_id

            def registry_view(
                engine: LocalIoTCore, thing: str = device.thing, old: str = device.first_certificate_id
            ) -> tuple[list[str], bool]:
                return engine.registry.thing_principals(thing), engine.registry.certificate(old) is None

            principals, old_gone = fleet.engine.call(registry_view)
            assert principals == [new_id]
            assert old_gone
            assert not (device.config.certificate.with_name("device.pem.crt.bak")).exists()
        assert fleet.engine.call(lambda e: e.registry.notifications()) == []
