"""The running engine's loopback admin endpoint, and the client the CLI uses to reach it.

The engine writes `engine.json` (owner-only: it holds the admin token) into its data directory;
CLI commands that must act on live state (kick connections, publish notify-next, switch rules) send
them here. When no engine runs, the CLI works on the database directly and the engine catches up on
start (queued jobs roll out, timeouts expire)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

from certrotator.backend.ports import CertificateStatus
from certrotator.local.operations import JobRequest
from certrotator.local.policy import Connection

ENGINE_FILE = "engine.json"

AdminOp = Callable[[dict[str, Any]], Coroutine[Any, Any, Any]]


class AdminError(RuntimeError):
    pass


class EngineControls(Protocol):
    """What the admin endpoint may do to a running engine (`LocalIoTCore` has these)."""

    async def set_certificate_status(self, certificate_id: str, status: CertificateStatus) -> None: ...

    def set_rule_enabled(self, name: str, enabled: bool) -> None: ...

    def create_job(self, request: JobRequest) -> None: ...

    async def cancel_job(self, job_id: str, force: bool = False) -> None: ...

    def connections(self) -> list[Connection]: ...

    def fault_released(self, thing: str) -> None: ...


def engine_ops(engine: EngineControls) -> dict[str, AdminOp]:
    """The admin operations, by name, each taking the request's JSON body (`op` plus its arguments)."""

    async def set_status(a: dict[str, Any]) -> None:
        await engine.set_certificate_status(str(a["certificate_id"]), CertificateStatus(a["status"]))

    async def set_rule(a: dict[str, Any]) -> None:
        engine.set_rule_enabled(str(a["name"]), bool(a["enabled"]))

    async def create_job(a: dict[str, Any]) -> None:
        engine.create_job(JobRequest.from_json(a))

    async def cancel_job(a: dict[str, Any]) -> None:
        await engine.cancel_job(str(a["job_id"]), bool(a.get("force")))

    async def connections(_a: dict[str, Any]) -> list[dict[str, str]]:
        # For a simulated fleet driving this engine from another process (local.handles.process).
        return [
            {"client_id": c.client_id, "principal": c.principal, "thing": c.thing}
            for c in engine.connections()
        ]

    async def fault_released(a: dict[str, Any]) -> None:
        # A fault plan's killed device is dead: its next process may talk again (local.fault_hooks).
        engine.fault_released(str(a["thing"]))

    return {
        "fault_released": fault_released,
        "set_certificate_status": set_status,
        "set_rule": set_rule,
        "create_job": create_job,
        "cancel_job": cancel_job,
        "connections": connections,
    }


class AdminServer:
    def __init__(
        self, loop: asyncio.AbstractEventLoop, ops: dict[str, AdminOp], host: str = "127.0.0.1"
    ) -> None:
        self.loop, self.ops, self.token = loop, ops, secrets.token_urlsafe(24)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                if self.headers.get("X-Certrotator-Token") != server.token:
                    self._reply(403, {"error": "bad admin token"})
                    return
                try:
                    length = int(self.headers.get("Content-Length", "0"))
                    body = json.loads(self.rfile.read(min(length, 1 << 20)) or b"{}")
                    op = server.ops.get(str(body.get("op")))
                    if op is None:
                        raise AdminError(f"unknown admin operation {body.get('op')!r}")
                    result: Any = asyncio.run_coroutine_threadsafe(op(body), server.loop).result(timeout=60)
                    self._reply(200, {"result": result})
                except Exception as exc:  # every failure becomes a clear message for the CLI
                    self._reply(400, {"error": str(exc)})

            def _reply(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True, name="admin")
        self._thread.start()

    def write_engine_file(self, data_dir: Path, host: str, mqtt_port: int) -> None:
        path = data_dir / ENGINE_FILE
        info = {
            "pid": os.getpid(),
            "host": host,
            "mqtt_port": mqtt_port,
            "admin_port": self.port,
            "token": self.token,
        }
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        os.replace(tmp, path)

    def close(self, data_dir: Path) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        info = running_engine(data_dir)
        if info is not None and info["pid"] == os.getpid():
            (data_dir / ENGINE_FILE).unlink(missing_ok=True)


def running_engine(data_dir: Path) -> dict[str, Any] | None:
    """The engine.json of a live engine in data_dir, or None."""
    path = data_dir / ENGINE_FILE
    try:
        info = json.loads(path.read_text())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return dict(info)


def call(data_dir: Path, op: str, **args: Any) -> tuple[bool, Any]:
    """Send an admin operation to the running engine: (True, result), or (False, None) if none runs."""
    info = running_engine(data_dir)
    if info is None:
        return False, None
    request = urllib.request.Request(
        f"http://127.0.0.1:{info['admin_port']}/admin",
        data=json.dumps({"op": op, **args}).encode(),
        headers={"Content-Type": "application/json", "X-Certrotator-Token": str(info["token"])},
        method="POST",
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    try:
        with opener.open(request, timeout=65) as response:
            return True, json.loads(response.read())["result"]
    except urllib.error.HTTPError as exc:
        raise AdminError(json.loads(exc.read() or b"{}").get("error", str(exc))) from None
    except (urllib.error.URLError, OSError):
        return False, None  # a stale engine.json (crashed engine): fall back to the database
