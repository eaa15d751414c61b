"""Both engine handles (engine on a thread of this process, engine in its own `local up` process) give
the same answers through the one `EngineHandle` interface, against a real engine and a real device
connection."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from certrotator.local import admin
from certrotator.local.engine import EngineConfig
from certrotator.local.handles.base import EngineHandle, EngineRefused
from certrotator.local.handles.process import EngineGone, EngineProcess, RemoteEngine
from certrotator.local.handles.thread import EngineThread
from certrotator.local.operations import JobRequest
from certrotator.local.provision import CERT_FILE, CONFIG_FILE, KEY_FILE, ROOT_CA_FILE, ProvisionRequest
from certrotator.protocol import STATUS_DETAILS_KEY, JobExecutionStatus, Topics

from .mqtt_clients import Device, PahoClient

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(params=["thread", "process"])
def handle(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EngineHandle]:
    data_dir = tmp_path / "engine"
    if request.param == "thread":
        with EngineThread(EngineConfig(data_dir, port=0)) as thread:
            yield thread
        return
    with EngineProcess(data_dir, ["--ca-signing-algorithm", "SHA384WITHRSA"]):
        remote = RemoteEngine(data_dir)  # an RSA private CA: the handle must load it as it is
        try:
            yield remote
        finally:
            remote.close()


def test_a_device_and_a_job_through_the_handle(handle: EngineHandle, tmp_path: Path) -> None:
    directory = tmp_path / "dev-1"
    done = handle.provision(ProvisionRequest("dev-1", directory, group="g", state_timeout_s=7))
    assert f"port = {handle.port}" in (directory / CONFIG_FILE).read_text()
    assert (directory / ROOT_CA_FILE).read_bytes() == handle.root_ca().read_bytes()
    assert handle.attached_certificates(["dev-1"]) == {"dev-1": [done.certificate_id]}
    assert handle.certificate_ids() == [done.certificate_id]

    device = PahoClient(
        handle.port,
        Device(
            "dev-1",
            directory / CERT_FILE,
            directory / KEY_FILE,
            directory / ROOT_CA_FILE,
            done.certificate_id,
        ),
    )
    try:
        assert device.connect() == 0
        assert all(not r.is_failure for r in device.subscribe(*Topics.device_subscriptions("dev-1")))
        assert handle.wait_for(
            lambda: ("dev-1", done.certificate_id) in {(c.thing, c.principal) for c in handle.connections()},
            10,
            tick_s=0.05,
        )

        before = time.time()
        handle.create_job(JobRequest("job-1", groups=("g",), unlimited_rollout=True))
        assert handle.wait_for(lambda: handle.status_counts("job-1") == {"QUEUED": 1}, 10)
        created = handle.job_created_at("job-1")
        assert created is not None and before - 1 <= created <= time.time()
        assert handle.job_created_at("no-such-job") is None
        with pytest.raises(EngineRefused, match="job-1"):
            handle.create_job(JobRequest("job-1", groups=("g",)))  # the engine's refusal reaches the caller

        # the device fails the execution: the terminal handling notifies, and the handle sees both
        update = Topics.job_update("dev-1", "job-1")
        device.publish(
            update, json.dumps({"status": "FAILED", "statusDetails": {STATUS_DETAILS_KEY: "x"}}).encode()
        )
        assert handle.wait_for(lambda: bool(handle.notifications("job-1")), 10, tick_s=0.05)
    finally:
        device.close()
    (execution,) = handle.executions("job-1")
    assert (execution.thing, execution.status) == ("dev-1", JobExecutionStatus.FAILED)
    assert handle.status_counts("job-1") == {"FAILED": 1}
    assert [n["thingName"] for n in handle.notifications("job-1")] == ["dev-1"]
    assert handle.notifications("another-job") == []
    # nothing happens any more: waiting gives up after its timeout
    started = time.monotonic()
    assert not handle.wait_for(lambda: handle.status_counts("job-1") == {"SUCCEEDED": 1}, 0.3)
    assert 0.3 <= time.monotonic() - started < 5


def test_the_process_handle_follows_its_engine_through_a_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "engine"
    with EngineProcess(data_dir) as engine:
        remote = RemoteEngine(data_dir)
        try:
            remote.provision(ProvisionRequest("dev-1", tmp_path / "dev-1", group="g"))
            engine.stop()
            with pytest.raises(EngineGone):
                remote.connections()
            engine.start()
            info = admin.running_engine(data_dir)
            assert info is not None and remote.port == int(info["mqtt_port"])  # `--port 0`: a new port
            assert remote.connections() == []
            remote.create_job(JobRequest("after-restart", things=("dev-1",), unlimited_rollout=True))
            assert remote.wait_for(lambda: remote.status_counts("after-restart") == {"QUEUED": 1}, 10)
        finally:
            remote.close()
