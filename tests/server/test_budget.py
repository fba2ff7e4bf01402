"""PayloadBudget, the server-wide bound on payload bytes in flight."""

from __future__ import annotations

import asyncio

import pytest

from tapnbd.server.budget import PayloadBudget


def test_take_give_and_wake_in_order() -> None:
    async def main() -> list[str]:
        woken: list[str] = []
        b = PayloadBudget(100)
        assert b.take(60) and not b.take(60)  # over the limit: nothing charged
        assert b.used == 60
        b.wait(lambda: woken.append("first"))
        b.wait(lambda: woken.append("second"))
        b.give(60)
        assert woken == []  # woken from the loop, not from inside give()
        await asyncio.sleep(0)
        assert b.used == 0 and b.peak == 60 and b.waits == 2
        return woken

    assert asyncio.run(main()) == ["first", "second"]


def test_a_request_bigger_than_the_budget_runs_alone() -> None:
    b = PayloadBudget(10)
    assert b.take(32)  # nothing in flight: admitted, or it would wait for ever
    assert not b.take(1)


def test_forgotten_waiters_are_not_woken() -> None:
    async def main() -> list[int]:
        woken: list[int] = []
        b = PayloadBudget(10)
        b.take(10)

        def wake() -> None:
            woken.append(1)

        b.wait(wake)
        b.forget(wake)
        b.give(10)
        await asyncio.sleep(0)
        return woken

    assert asyncio.run(main()) == []


def test_budget_must_be_positive() -> None:
    with pytest.raises(ValueError):
        PayloadBudget(0)
