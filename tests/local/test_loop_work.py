"""The engine's loop machinery without an engine: inbox order and slicing, the one timeout timer,
periodic tasks that survive a failing run."""

from __future__ import annotations

import asyncio
import time

import pytest

from certrotator.local.broker import Connection
from certrotator.local.loop_work import Inbox, PeriodicTasks, TimeoutTimer

CONNECTION = Connection("dev1", "0" * 64, "dev1")


def test_the_inbox_handles_messages_in_arrival_order_and_drops_the_rest_on_close() -> None:
    handled: list[str] = []

    async def scenario() -> None:
        inbox = Inbox(lambda topic, _connection, work: (handled.append(topic), work()))
        ran: list[int] = []
        for n in range(5):
            inbox.put(f"t{n}", CONNECTION, lambda n=n: ran.append(n))  # type: ignore[misc]
        while len(handled) < 5:
            await asyncio.sleep(0)
        assert ran == [0, 1, 2, 3, 4]
        inbox.put("late", CONNECTION, lambda: None)
        await inbox.close()  # before the worker ran: dropped

    asyncio.run(scenario())
    assert handled == ["t0", "t1", "t2", "t3", "t4"]


def test_the_timeout_timer_keeps_the_earliest_time() -> None:
    fired: list[float] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        timer = TimeoutTimer(lambda: fired.append(loop.time()))
        now = time.time()
        timer.fire_by(now + 3600)
        timer.fire_by(now)  # earlier: replaces the first
        timer.fire_by(now + 7200)  # later: ignored
        while not fired:
            await asyncio.sleep(0.001)
        timer.cancel()

    asyncio.run(asyncio.wait_for(scenario(), 5))
    assert len(fired) == 1


def test_a_periodic_task_that_raises_runs_again() -> None:
    runs: list[int] = []

    def flaky() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("first run fails")

    async def scenario() -> None:
        tasks = PeriodicTasks(lambda task: task())
        tasks.add("flaky", 0.001, flaky)
        tasks.start(asyncio.get_running_loop())
        while len(runs) < 3:
            await asyncio.sleep(0.001)
        tasks.stop()
        tasks.add("after-stop", 0.001, lambda: runs.append(2))  # kept, but not armed while stopped

    asyncio.run(asyncio.wait_for(scenario(), 5))
    with pytest.raises(ValueError, match="must be positive"):
        PeriodicTasks(lambda task: task()).add("bad", 0, lambda: None)
