"""Footprint of one standalone agent: time from process start to subscribed, and idle RSS once subscribed.

Starts the local IoT Core (`certrotator local up --port 0`) in a temporary data directory, provisions
one device, and runs the agent as shipped, `python -m certrotator.device.standalone.runtime device.toml`,
several times. "Subscribed" is the agent's own log line (`connected and subscribed`), written once the
mutual-TLS connection is up and all four SUBACKs are in; idle RSS is read from /proc a few seconds
later, with the agent connected and waiting for work.

Bytecode: an installed package has its .pyc files compiled at install time; this checkout is an
editable install and the environment may set PYTHONDONTWRITEBYTECODE. The agent runs therefore get a
private PYTHONPYCACHEPREFIX: the first run compiles (reported as "cold"), the others use the cache as
an installed agent would. Also checks, from `-X importtime`, that neither entry point (`python -m
certrotator.device.standalone.runtime` and `certrotator agent --config`) imports boto3, the CDK, the broker
(amqtt) or the rest of the local IoT Core.

Run: .venv/bin/python bench/agent_footprint.py          ends with `agent_rss_mb=X agent_ready_s=Y`
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from certrotator.local.handles.process import EngineProcess, RemoteEngine
from certrotator.local.provision import CONFIG_FILE, ProvisionRequest

SUBSCRIBED = "connected and subscribed"
# Top-level packages an agent must never load: the AWS SDK and CDK (backend / infra), the broker.
FORBIDDEN = ("boto3", "botocore", "aws_cdk", "constructs", "jsii", "cdk_nag", "amqtt", "transitions", "moto")
# Parts of this project an agent must not load either.
FORBIDDEN_OWN = ("certrotator.local", "certrotator.backend", "certrotator.fleet")
TARGET_RSS_MB = 40.0
TARGET_READY_S = 0.5


@dataclass
class AgentRun:
    ready_s: float
    rss_mb: float
    peak_mb: float
    modules: set[str]


def rss(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, MB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def run_agent(command: list[str], env: dict[str, str], idle_s: float, timeout_s: float) -> AgentRun:
    """Start an agent, wait for its subscribed line, let it idle, read its memory, stop it."""
    started = time.monotonic()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ready = threading.Event()
    lines: list[str] = []
    ready_at: list[float] = []

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if SUBSCRIBED in line and not ready.is_set():
                ready_at.append(time.monotonic())
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not ready.wait(timeout_s):
            raise RuntimeError("the agent did not subscribe in time:\n" + "".join(lines[-20:]))
        time.sleep(idle_s)
        if process.poll() is not None:
            raise RuntimeError("the agent exited:\n" + "".join(lines[-20:]))
        now, peak = rss(process.pid)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join(timeout=5)
    modules = {m.group(1).strip() for line in lines if (m := re.match(r"import time:.*\|.*\|\s*(\S+)", line))}
    return AgentRun(ready_at[0] - started, now, peak, modules)


def check_imports(name: str, modules: set[str]) -> list[str]:
    bad = sorted(
        m for m in modules if m.split(".")[0] in FORBIDDEN or any(m.startswith(p) for p in FORBIDDEN_OWN)
    )
    print(f"{name}: {len(modules)} modules imported; forbidden: {', '.join(bad) if bad else 'none'}")
    return bad


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="agent starts (the first one compiles bytecode)")
    parser.add_argument("--idle", type=float, default=3.0, help="seconds subscribed before reading RSS")
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="certrotator-agent-bench-") as tmp:
        root = Path(tmp)
        with EngineProcess(root / "engine"):
            engine = RemoteEngine(root / "engine")
            device = root / "device"
            engine.provision(ProvisionRequest("footprint-device", device))
            engine.close()
            config = str(device / CONFIG_FILE)
            env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
            env["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
            standalone = [sys.executable, "-m", "certrotator.device.standalone.runtime", config]
            cli = [sys.executable, "-m", "certrotator.cli", "agent", "--config", config]

            runs = [run_agent(standalone, env, args.idle, args.timeout) for _ in range(max(args.runs, 2))]
            cold, warm = runs[0], runs[1:]
            traced_env = {**env, "PYTHONPROFILEIMPORTTIME": "1"}
            traced = run_agent(standalone, traced_env, 0.5, args.timeout)
            cli_runs = [run_agent(cli, env, args.idle, args.timeout) for _ in range(3)]
            cli_traced = run_agent(cli, traced_env, 0.5, args.timeout)

    ready = statistics.median(r.ready_s for r in warm)
    rss_mb = statistics.median(r.rss_mb for r in warm)
    print(
        f"python -m certrotator.device.standalone.runtime ({len(warm)} warm runs, idle {args.idle:g} s after subscribing)"
    )
    print(
        f"  process start -> subscribed   cold {cold.ready_s:.3f} s, warm median {ready:.3f} s "
        f"(min {min(r.ready_s for r in warm):.3f}, max {max(r.ready_s for r in warm):.3f})"
    )
    print(
        f"  idle RSS                      warm median {rss_mb:.1f} MB (peak {max(r.peak_mb for r in warm):.1f} MB)"
    )
    cli_ready = statistics.median(r.ready_s for r in cli_runs)
    cli_rss = statistics.median(r.rss_mb for r in cli_runs)
    print("certrotator agent --config device.toml (3 warm runs)")
    print(f"  process start -> subscribed   median {cli_ready:.3f} s;  idle RSS median {cli_rss:.1f} MB")
    bad = check_imports("standalone agent", traced.modules) + check_imports(
        "certrotator agent", cli_traced.modules
    )
    ok = not bad and rss_mb <= TARGET_RSS_MB and ready <= TARGET_READY_S
    print(
        f"targets: RSS <= {TARGET_RSS_MB:g} MB, ready <= {TARGET_READY_S:g} s: {'met' if ok else 'NOT met'}"
    )
    print(f"agent_rss_mb={rss_mb:.1f} agent_ready_s={ready:.3f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
