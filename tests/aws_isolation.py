"""One way for a test module to shut AWS out: no profile, config file, instance metadata or real
endpoint; fake credentials; every HTTP(S) request through a dead local proxy, so a client that escapes
moto or the Stubber fails at once instead of reaching AWS; moto's iot-data host (moto answers only on the
default `data-ats` host, not DescribeEndpoint's account-specific one)."""

from __future__ import annotations

import pytest

DEAD_PROXY = "http://127.0.0.1:9"
REGION = "us-east-1"
MOTO_DATA_ENDPOINT = f"data-ats.iot.{REGION}.amazonaws.com"


def isolate_from_aws(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory, region: str = REGION
) -> None:
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(name, DEAD_PROXY)
    for name in ("NO_PROXY", "no_proxy", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    nowhere = tmp_path_factory.mktemp("aws") / "none"
    monkeypatch.setenv("AWS_CONFIG_FILE", str(nowhere))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(nowhere))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", region)
    monkeypatch.setenv("AWS_REGION", region)
    monkeypatch.setenv("IOT_DATA_ENDPOINT", f"data-ats.iot.{region}.amazonaws.com")
