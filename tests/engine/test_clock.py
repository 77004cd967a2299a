"""The virtual clock on its own: its timers fire in due order, each at its instant."""

from __future__ import annotations

import functools

from pytest_celery_faults.engine.clock import VirtualClock

START = 1_000_000.0


def test_timers_fire_in_due_order_each_at_its_instant() -> None:
    clock = VirtualClock(start=START)
    fired: list[tuple[str, float]] = []
    clock.call_at(START + 5, lambda: fired.append(("late", clock.time())))
    clock.call_at(START + 1, lambda: fired.append(("early", clock.time())))
    clock.advance_to(START + 10)
    assert fired == [("early", START + 1), ("late", START + 5)]
    assert clock.time() == START + 10 and clock.elapsed == 10


def test_timers_due_at_one_instant_fire_in_the_order_they_were_set() -> None:
    clock = VirtualClock(start=START)
    fired: list[int] = []
    for n in range(5):
        clock.call_at(START + 1, functools.partial(fired.append, n))
    clock.advance_to(START + 1)
    assert fired == [0, 1, 2, 3, 4]


def test_a_timer_set_by_a_timer_fires_in_the_same_advance_if_it_is_due() -> None:
    clock = VirtualClock(start=START)
    fired: list[float] = []

    def sets_another() -> None:
        clock.call_at(START + 2, lambda: fired.append(clock.time()))

    clock.call_at(START + 1, sets_another)
    clock.advance_to(START + 3)
    assert fired == [START + 2]


def test_a_cancelled_timer_does_not_fire_and_is_not_due() -> None:
    clock = VirtualClock(start=START)
    fired: list[str] = []
    timer = clock.call_at(START + 1, lambda: fired.append("cancelled"))
    clock.call_at(START + 2, lambda: fired.append("kept"))
    clock.cancel(timer)
    assert clock.next_due() == START + 2
    clock.advance_to(START + 5)
    assert fired == ["kept"]


def test_the_clock_never_moves_backwards_and_a_reset_clears_its_timers() -> None:
    clock = VirtualClock(start=START)
    clock.advance_to(START + 5)
    clock.advance_to(START + 1)
    assert clock.time() == START + 5
    clock.call_at(START + 9, lambda: None)
    clock.reset()
    assert clock.time() == START and clock.next_due() is None
