"""device.toml's settings for start-up retries and the periodic re-synchronisation: defaults, values,
and errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from certrotator.device.settings import ConfigError
from certrotator.device.standalone.config import DEFAULT_RESYNC_INTERVAL_S, load_device_config
from certrotator.device.startup import StartupRetry

BASE = """thing_name = "thing-1"
endpoint = "127.0.0.1"
port = 8883
root_ca = "AmazonRootCA1.pem"

[credentials]
certificate = "device.pem.crt"
private_key = "private.pem.key"
"""


def test_defaults(tmp_path: Path) -> None:
    toml = tmp_path / "device.toml"
    toml.write_text(BASE)
    config = load_device_config(toml)
    assert config.startup == StartupRetry()
    assert config.resync_interval_s == DEFAULT_RESYNC_INTERVAL_S == 6 * 3600


def test_values(tmp_path: Path) -> None:
    toml = tmp_path / "device.toml"
    toml.write_text(
        BASE + "\n[startup]\nattempts = 3\nmax_delay_s = 2\n\n[rotation]\nresync_interval_s = 600\n"
    )
    config = load_device_config(toml)
    assert config.startup == StartupRetry(attempts=3, max_delay_s=2.0)
    assert config.resync_interval_s == 600.0


def test_a_resync_interval_of_zero_turns_it_off(tmp_path: Path) -> None:
    toml = tmp_path / "device.toml"
    toml.write_text(BASE + "\n[rotation]\nresync_interval_s = 0\n")
    assert load_device_config(toml).resync_interval_s is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("\n[startup]\nattempts = 0\n", r"\[startup\]: attempts must be at least 1"),
        ("\n[startup]\nattempts = 2.5\n", r"\[startup\]: 'attempts' must be int"),
        ("\n[startup]\nmax_delay_s = 0.1\n", r"\[startup\]: max_delay_s must be at least 0.5"),
        ("\n[rotation]\nresync_interval_s = 5\n", r"resync_interval_s must be 0 \(never\) or at least 60"),
        ('\n[rotation]\nresync_interval_s = "1h"\n', r"'resync_interval_s' must be float"),
    ],
)
def test_errors_name_the_setting(tmp_path: Path, extra: str, message: str) -> None:
    toml = tmp_path / "device.toml"
    toml.write_text(BASE + extra)
    with pytest.raises(ConfigError, match=message):
        load_device_config(toml)
