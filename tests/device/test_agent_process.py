"""Agent start-up as real processes (`python -m certrotator.device.standalone.runtime device.toml` and
`certrotator agent --config`): a start-up that cannot succeed ends the process non-zero with the reason,
in bounded time; one that fails only for a while (a PKCS#11 token not there yet, or busy with another
process) is retried until the agent is up. Before, either kind left a process that waited forever."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from certrotator import crypto
from certrotator.device.standalone.config import load_device_config
from certrotator.device.startup import STARTUP_FAILED_EXIT_CODE, StartupRetry
from certrotator.local.engine import EngineConfig
from certrotator.local.handles.thread import EngineThread
from certrotator.local.provision import CONFIG_FILE
from certrotator.sim.fleet import SimulatedDevice, SimulatedFleet
from certrotator.sim.softhsm import SoftHsm, softhsm_available

pytestmark = pytest.mark.timeout(180)

needs_softhsm = pytest.mark.skipif(softhsm_available() is not None, reason=str(softhsm_available()))

ENTRY_POINTS = {
    "runtime module": [sys.executable, "-m", "certrotator.device.standalone.runtime"],
    "certrotator agent": [sys.executable, "-m", "certrotator.cli", "agent", "--config"],
}
EXIT_BOUND_S = 30.0  # process start (~1 s) plus a persistent failure needs no waiting at all


@contextmanager
def engine_fleet(tmp_path: Path) -> Iterator[SimulatedFleet[EngineThread]]:
    with (
        EngineThread(EngineConfig(tmp_path / "engine", port=0)) as engine,
        SimulatedFleet(engine, tmp_path, threads=1) as fleet,
    ):
        yield fleet


def run_to_exit(command: list[str], env: dict[str, str] | None = None) -> tuple[int, str, float]:
    started = time.monotonic()
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=EXIT_BOUND_S,  # the old agent never exits: TimeoutExpired fails the test
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        check=False,
    )
    return result.returncode, result.stderr, time.monotonic() - started


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_a_persistent_start_up_failure_ends_the_process_non_zero_with_the_reason(
    tmp_path: Path, entry: str
) -> None:
    """A journal this version cannot read (a human must look): no retry, exit 69 at once."""
    with engine_fleet(tmp_path) as fleet:
        (device,) = fleet.provision(1)
    device.config.journal.write_text(json.dumps({"jobId": "j", "phase": "from-the-future"}))
    code, stderr, took = run_to_exit([*ENTRY_POINTS[entry], str(device.directory / CONFIG_FILE)])
    assert code == STARTUP_FAILED_EXIT_CODE, stderr
    assert "unknown phase 'from-the-future'" in stderr
    assert "not an error that passes" in stderr
    assert took < EXIT_BOUND_S


@needs_softhsm
def test_a_wrong_token_pin_is_persistent_and_ends_the_process_at_once(tmp_path: Path) -> None:
    with engine_fleet(tmp_path) as fleet:
        (device,) = fleet.provision(1, keystore="pkcs11")
    toml = device.directory / CONFIG_FILE
    pin = load_device_config(toml).pkcs11
    assert pin is not None
    toml.write_text(toml.read_text().replace(f'user_pin = "{pin.user_pin}"', 'user_pin = "0000"'))
    code, stderr, _took = run_to_exit([*ENTRY_POINTS["runtime module"], str(toml)], device.env)
    assert code == STARTUP_FAILED_EXIT_CODE, stderr
    assert "PinIncorrect" in stderr
    assert "try 2 of" not in stderr  # not retried


@needs_softhsm
def test_a_token_that_is_absent_for_longer_than_the_tries_ends_the_process(tmp_path: Path) -> None:
    """Transient, but it does not pass: the process gives up after the tries (here 3, waits capped at
    0.5 s, set in device.toml) and says why."""
    with engine_fleet(tmp_path) as fleet:
        (device,) = fleet.provision(1, keystore="pkcs11")
    toml = device.directory / CONFIG_FILE
    toml.write_text(toml.read_text() + "\n[startup]\nattempts = 3\nmax_delay_s = 0.5\n")
    assert load_device_config(toml).startup == StartupRetry(attempts=3, max_delay_s=0.5)
    assert device.softhsm is not None
    empty = SoftHsm.create(tmp_path / "empty-softhsm")  # the same labels are nowhere in this one
    code, stderr, took = run_to_exit([*ENTRY_POINTS["runtime module"], str(toml)], empty.env)
    assert code == STARTUP_FAILED_EXIT_CODE, stderr
    assert "still failing after 3 tries" in stderr and "has no token labelled" in stderr
    assert stderr.count("start-up failed (try") == 2
    assert took < EXIT_BOUND_S


def start_agent(device: SimulatedDevice, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = (device.directory / "agent.log").open("ab")
    try:
        return subprocess.Popen(
            [*ENTRY_POINTS["runtime module"], str(device.directory / CONFIG_FILE)],
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    finally:
        log.close()


@needs_softhsm
def test_an_agent_whose_token_appears_after_it_started_comes_up(tmp_path: Path) -> None:
    """The token is not there when the agent starts (an HSM not plugged in yet, or hidden from this
    process while another one had the store open): SoftHSM keeps the view it took at C_Initialize, so
    the retry must re-initialise the library to see the token at all."""
    with engine_fleet(tmp_path) as fleet:
        (device,) = fleet.provision(1, keystore="pkcs11")
        assert device.softhsm is not None
        tokens = device.softhsm.conf.parent / "tokens"
        hidden = tokens.with_name("tokens-hidden")
        tokens.rename(hidden)
        tokens.mkdir(mode=0o700)
        process = start_agent(device, device.env)
        try:
            log = device.directory / "agent.log"
            deadline = time.monotonic() + 30
            while "start-up failed (try 2 of" not in log.read_text(errors="replace"):
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            tokens.rmdir()
            hidden.rename(tokens)  # the token is back
            assert fleet.wait_connected([device], 30), log.read_text()
            assert process.poll() is None
        finally:
            process.terminate()
            process.wait(timeout=30)


# Another process that keeps opening the same token store, as the Greengrass nucleus does beside the
# component (it signs with the device key for every TLS handshake): re-initialise, list, log in, close.
CONTENDER = """
import sys, pkcs11
lib = pkcs11.lib(sys.argv[1])
while True:
    try:
        lib.reinitialize()
        for token in lib.get_tokens():
            token.open(rw=True, user_pin=sys.argv[2]).close()
    except pkcs11.exceptions.PKCS11Error:
        pass
"""


@needs_softhsm
def test_two_agents_sharing_one_token_directory_both_come_up(tmp_path: Path) -> None:
    """Two agent processes start at the same moment on one SoftHSM2 store, a few times over, while a
    third process keeps opening it. SoftHSM's file store then answers some of them CKR_GENERAL_ERROR,
    or shows them no token: each must retry until it is up, not hang."""
    shared = SoftHsm.create(tmp_path / "shared-softhsm")
    with engine_fleet(tmp_path) as fleet:
        devices = fleet.provision(2, keystore="pkcs11", softhsm=shared)
        pkcs11_settings = devices[0].config.pkcs11
        assert pkcs11_settings is not None
        contender = subprocess.Popen(
            [sys.executable, "-c", CONTENDER, str(pkcs11_settings.library), pkcs11_settings.user_pin],
            env={**os.environ, **shared.env},
        )
        try:
            for _ in range(4):
                processes = [start_agent(d, shared.env) for d in devices]
                try:
                    up = fleet.wait_connected(devices, 60)
                    logs = [(d.directory / "agent.log").read_text(errors="replace")[-2000:] for d in devices]
                    assert up, logs
                    assert all(p.poll() is None for p in processes), logs
                finally:
                    for p in processes:
                        p.terminate()
                    for p in processes:
                        p.wait(timeout=30)
        finally:
            contender.kill()
            contender.wait(timeout=10)
        retried = sum((d.directory / "agent.log").read_text().count("start-up failed (try") for d in devices)
        print(f"\ntries that met a busy or hidden token and were retried: {retried} (8 start-ups)")
        for device in devices:
            assert (
                crypto.certificate_id(device.config.certificate.read_bytes()) == device.first_certificate_id
            )
