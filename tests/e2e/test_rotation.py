"""Whole rotations on the local IoT Core, over real mutual TLS, with the real agent."""

from __future__ import annotations

from pathlib import Path

import pytest

from .harness import rotate_verified, running_fleet

pytestmark = pytest.mark.timeout(120)


def test_a_small_fleet_rotates_end_to_end_twice(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        devices = fleet.provision(3, state_timeout_s=5)
        fleet.start_agents()
        first = rotate_verified(fleet, "rotate-1")
        assert first.summary()["verified"] == 3
        after_first = {d.thing: d.certificate_id() for d in devices}
        assert all(after_first[d.thing] != d.first_certificate_id for d in devices)

        # the second job rotates the certificates the first one issued
        second = rotate_verified(fleet, "rotate-2")
        assert second.verified == 3
        assert all(d.certificate_id() not in (after_first[d.thing], d.first_certificate_id) for d in devices)
        assert all(not d.config.certificate.with_name("device.pem.crt.bak").exists() for d in devices)
