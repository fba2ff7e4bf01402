"""Event loop selection and eager coroutine start. The only module that knows uvloop.

uvloop is used when it imports, unless TAPNBD_LOOP=asyncio (to compare the two). The
loop is passed to ``asyncio.Runner`` as a factory, never installed as a global policy
(policies are deprecated; uvicorn and the uvloop README do the same).
"""

from __future__ import annotations

import asyncio
import os
import types
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    if os.environ.get("TAPNBD_LOOP", "uvloop") != "asyncio":
        try:
            import uvloop

            return uvloop.new_event_loop  # type: ignore[no-any-return,unused-ignore]
        except ImportError:
            pass
    return asyncio.new_event_loop


def loop_name() -> str:
    return "uvloop" if loop_factory() is not asyncio.new_event_loop else "asyncio"


def run(main: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


def run_command(main: Coroutine[Any, Any, T]) -> T:
    """Run a short command (``info``, ``check``, ``map``...) on asyncio's own loop.

    uvloop pays off over many requests; a command that reads a few headers would spend
    more on importing it (about 3 ms) than it saves. Servers and copies use ``run``.
    """
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        return runner.run(main)


def eager_start(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run ``coro`` now, up to its first suspension; make a task only if it suspends.

    Most requests complete without waiting (a page-cache hit, a RAM disk), and a task
    per request would cost more than the request itself. This is Python 3.12's
    ``asyncio.eager_task_factory`` for 3.11: step the coroutine once by hand, and if it
    yields a future, hand the rest of it to a task that resumes where it stopped.
    """
    try:
        yielded = coro.send(None)
    except StopIteration:
        return None
    except BaseException:
        coro.close()
        raise
    if getattr(yielded, "_asyncio_future_blocking", False):
        # Until our task takes it, the future must look un-awaited: another coroutine
        # awaiting the same future (a shared "allocation in flight" future) would
        # otherwise fail with "await wasn't used with future". _resume sets it again.
        yielded._asyncio_future_blocking = False
    return asyncio.get_running_loop().create_task(_resume(coro, yielded))


@types.coroutine
def _resume(coro: Coroutine[Any, Any, None], yielded: Any) -> Generator[Any, Any, None]:
    """Continue a started coroutine: re-yield what it yielded, forward sends and throws."""
    if getattr(yielded, "_asyncio_future_blocking", None) is False:
        yielded._asyncio_future_blocking = True  # as Future.__await__ left it
    while True:
        try:
            sent = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:
            try:
                yielded = coro.throw(exc)
            except StopIteration:
                return
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration:
                return
