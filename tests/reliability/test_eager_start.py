"""Regression: two requests waiting on one shared future (found by the crash test).

The qcow driver parks a second writer of a cluster on the first writer's "allocation in
flight" future. With requests started eagerly (tapnbd.runtime.eager_start), the second
await used to fail with "await wasn't used with future" (sent to the client as EIO):
the first coroutine had left the future marked as being awaited until its task ran.
"""

from __future__ import annotations

import asyncio

import pytest

from tapnbd.runtime import eager_start, loop_factory


async def _shared_future_waiters() -> list[object]:
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    out: list[object] = []

    async def waiter() -> None:
        try:
            out.append(await fut)
        except Exception as e:  # the bug: RuntimeError
            out.append(repr(e))

    tasks = [eager_start(waiter()), eager_start(waiter()), asyncio.ensure_future(waiter())]
    await asyncio.sleep(0)
    tasks.append(eager_start(waiter()))  # after the first tasks took the future
    fut.set_result(7)
    await asyncio.gather(*(t for t in tasks if t is not None))
    return out


@pytest.mark.parametrize("loop", ["default", "asyncio"])
def test_eager_coroutines_share_a_future(loop: str) -> None:
    factory = loop_factory() if loop == "default" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        assert runner.run(_shared_future_waiters()) == [7, 7, 7, 7]


def test_eager_start_still_forwards_cancellation() -> None:
    async def main() -> str:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        seen: list[str] = []

        async def waiter() -> None:
            try:
                await fut
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise

        task = eager_start(waiter())
        assert task is not None
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return seen[0]

    assert asyncio.run(main()) == "cancelled"
