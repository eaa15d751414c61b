"""Suite-wide guard: no test may reach the network. HTTP(S) goes to a dead local proxy (loopback is
exempt, for the engine's admin endpoint and webhooks under test), and AWS credentials are fake, so
anything that escapes a mock fails at once instead of talking to AWS."""

from __future__ import annotations

import pytest

DEAD_PROXY = "http://127.0.0.1:9"


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(name, DEAD_PROXY)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost,::1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
