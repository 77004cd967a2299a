"""The worker's own rules: where a real prefork worker behaves one way, so does the harness."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from pytest_celery_faults import CeleryFaults, FaultSpecError


class World:
    """What the tasks of these tests change; ``touch`` is tracked as their side effect."""

    def __init__(self) -> None:
        self.log: list[Any] = []

    def touch(self, value: Any) -> None:
        self.log.append(value)


world = World()


@pytest.fixture(autouse=True)
def _fresh_world() -> None:
    world.log.clear()


class StatementFailed(Exception):
    """Built like SQLAlchemy's ``OperationalError(statement, params, orig)``."""

    def __init__(self, statement: str, params: Any, orig: BaseException | None) -> None:
        super().__init__(statement, params, orig)
        self.statement, self.params, self.orig = statement, params, orig


class NeedsKeyword(Exception):
    def __init__(self, message: str, *, code: int) -> None:
        super().__init__(message)
        self.code = code


def test_raise_builds_an_exception_whose_constructor_needs_more_than_a_message(
    app: Celery,
) -> None:
    @app.task(
        name="tests.query",
        shared=False,
        autoretry_for=(StatementFailed,),
        max_retries=1,
        default_retry_delay=0,
    )
    def query() -> str:
        world.touch("select")
        return "rows"

    with CeleryFaults(app) as faults:
        faults.track((world, "touch"))
        outcome = faults.run(query.s(), f"raise({__name__}.StatementFailed)@0")
    # The injected error is the one the task retries on: it was built, not a TypeError.
    assert (outcome.state, outcome.result, outcome.retries) == ("SUCCESS", "rows", 1)
    assert world.log == ["select"]


def test_raise_refuses_an_exception_it_cannot_build_when_armed(app: Celery) -> None:
    with CeleryFaults(app, check_unfired=False) as faults:
        with pytest.raises(FaultSpecError) as raised:
            faults.inject(f"raise({__name__}.NeedsKeyword)@0")
        assert faults.plan.armed == []
    message = str(raised.value)
    assert message.startswith(
        f"invalid fault spec 'raise({__name__}.NeedsKeyword)@0': cannot build "
        f"{__name__}.NeedsKeyword for raise(...) (TypeError: "
    )
    assert "missing 1 required keyword-only argument: 'code'" in message
    assert "\n" not in message
