"""The SQLAlchemy shop under faults: the crash between two commits is caught, the fix passes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sashop import tasks


def test_a_crash_between_two_commits_decrements_the_stock_twice(
    celery_faults: Any, shop: Any, observe: Callable[[], Any], reset: Callable[[], None]
) -> None:
    with pytest.raises(AssertionError, match=r"reserve_buggy is not idempotent") as caught:
        celery_faults.assert_idempotent(tasks.reserve_buggy.s(1, "mug"), observe, reset)
    message = str(caught.value)
    assert "-{'reservations': [1], 'stock': {'mug': 9}}" in message
    assert "+{'reservations': [1], 'stock': {'mug': 8}}" in message
    assert "side effect 1: db sashop.sqlite3 COMMIT" in message
    assert "'sigkill@1'" in message and "duplicated" in message


def test_one_transaction_survives_every_crash(
    celery_faults: Any, shop: Any, observe: Callable[[], Any], reset: Callable[[], None]
) -> None:
    celery_faults.assert_idempotent(tasks.reserve.s(1, "mug"), observe, reset)
    report = celery_faults.sweep(tasks.reserve.s(1, "mug"), observe, reset, pairs=False)
    assert report.failures == []
