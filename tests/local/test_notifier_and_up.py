"""Notifications reach a webhook (with bounded retries), and `certrotator local up` runs, serves and
stops cleanly on a signal."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from certrotator.backend.ports import Notification
from certrotator.local.adapters import LocalNotifier
from certrotator.local.admin import ENGINE_FILE
from certrotator.local.db import Database
from certrotator.local.registry import LocalRegistry

from .mqtt_clients import Device, PahoClient


class Hook:
    def __init__(self, failures_first: int) -> None:
        self.received: queue.Queue[dict[str, Any]] = queue.Queue()
        self.attempts = 0
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                hook.attempts += 1
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if hook.attempts <= failures_first:
                    self.send_response(503)
                    self.end_headers()
                    return
                hook.received.put(body)
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/notify"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")


NOTE = Notification("dev1", "job1", "FAILED", "nothing to clean up", "fix it", {"DeviceFailureReason": "x"})


def test_notifications_are_stored_logged_and_posted_with_retries(tmp_path: Path, no_proxy: None) -> None:
    hook = Hook(failures_first=1)
    try:
        registry = LocalRegistry(Database(tmp_path))
        LocalNotifier(registry, tmp_path, hook.url, webhook_attempts=3).notify(NOTE)
        posted = hook.received.get(timeout=10)
        assert posted["thingName"] == "dev1" and posted["operatorAction"] == "fix it"
        assert hook.attempts == 2  # the first POST got a 503 and was retried
        line = json.loads((tmp_path / "notifications.jsonl").read_text().splitlines()[0])
        assert line["jobId"] == "job1" and line["details"] == {"DeviceFailureReason": "x"}
        assert registry.notifications()[0]["status"] == "FAILED"
    finally:
        hook.close()


def test_a_dead_webhook_loses_nothing_else(tmp_path: Path, no_proxy: None) -> None:
    registry = LocalRegistry(Database(tmp_path))
    LocalNotifier(registry, tmp_path, "http://127.0.0.1:9/never", webhook_attempts=2).notify(NOTE)
    assert len(registry.notifications()) == 1
    assert (tmp_path / "notifications.jsonl").read_text().count("\n") == 1


@pytest.fixture
def engine_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    data = tmp_path / "data"
    process = subprocess.Popen(
        [sys.executable, "-m", "certrotator.cli", "local", "up", "--port", "0", "--data-dir", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        yield process, data
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_local_up_serves_devices_and_stops_on_sigint(
    engine_process: tuple[subprocess.Popen[bytes], Path], tmp_path: Path
) -> None:
    process, data = engine_process
    assert process.stdout is not None
    ready = process.stdout.readline().decode()  # printed once the broker listens and engine.json exists
    assert "local IoT Core on" in ready, ready
    info = json.loads((data / ENGINE_FILE).read_text())
    assert (data / ENGINE_FILE).stat().st_mode & 0o777 == 0o600  # it holds the admin token

    out = tmp_path / "dev1"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "certrotator.cli",
            "local",
            "provision",
            "dev1",
            "--out",
            str(out),
            "--data-dir",
            str(data),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    from certrotator import crypto

    device = Device(
        "dev1",
        out / "device.pem.crt",
        out / "private.pem.key",
        out / "AmazonRootCA1.pem",
        crypto.certificate_id((out / "device.pem.crt").read_bytes()),
    )
    client = PahoClient(int(info["mqtt_port"]), device)
    try:
        assert client.connect() == 0
    finally:
        client.close()

    os.kill(process.pid, signal.SIGINT)
    assert process.wait(timeout=30) == 0
    assert not (data / ENGINE_FILE).exists()
    remaining = process.stdout.read().decode()
    assert "stopped" in remaining and "Traceback" not in remaining


def test_a_second_engine_on_the_same_data_dir_is_refused(
    engine_process: tuple[subprocess.Popen[bytes], Path],
) -> None:
    process, data = engine_process
    assert process.stdout is not None
    assert "local IoT Core on" in process.stdout.readline().decode()
    second = subprocess.run(
        [sys.executable, "-m", "certrotator.cli", "local", "up", "--port", "0", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert second.returncode == 2
    assert "already running" in second.stdout + second.stderr
    time.sleep(0)  # the first engine is untouched
    assert process.poll() is None
