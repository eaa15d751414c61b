"""`python -m certrotator.sim.agent_process [--resync-s S] device.toml`: the shipped standalone agent
process (`certrotator.device.standalone.runtime`, unchanged), optionally asking `$next/get` every S
seconds while idle, as the Greengrass runtime does every hour.

Why the simulated fleet needs it: the standalone agent asks only on each connection it gets. A
message lost on a connection that stays up (a notify-next, or the device's own IN_PROGRESS update,
after which the machine goes back to idle and waits for a notify-next that was already sent) leaves
its execution QUEUED for as long as the connection lasts; only an idle re-synchronisation finds it.
The fault matrix and the soak lose exactly such messages (docs/reliability.md, "Fault matrix").
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from certrotator.device.agent import Agent
from certrotator.device.standalone import runtime


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="certrotator.sim.agent_process")
    parser.add_argument("--resync-s", type=float, help="ask $next/get this often while idle")
    parser.add_argument("config")
    args = parser.parse_args(argv)
    if args.resync_s is not None:
        if args.resync_s <= 0:
            parser.error("--resync-s must be positive")
        build = runtime.build_agent

        def with_resync(*a: object, **k: object) -> Agent:
            agent = build(*a, **k)  # type: ignore[arg-type]
            agent.settings = replace(agent.settings, resync_interval_s=args.resync_s)
            return agent

        runtime.build_agent = with_resync  # type: ignore[assignment]
    return runtime.main([args.config])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
