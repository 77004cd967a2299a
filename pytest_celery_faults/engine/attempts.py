"""A side effect that may fail is still a side effect: it was attempted.

An HTTP request that ends in a connection error or a read timeout may have
reached the server; a Redis command cut off by a dropped connection may have
run. :func:`perform_attempt` records such a call as an effect (with what it
raised in its detail) and lets faults fire at its boundary, then raises the
error to the task, as the library would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from .effects import EffectLog

T = TypeVar("T")


def perform_attempt(
    log: EffectLog,
    kind: str,
    label: str,
    call: Callable[[], T],
    detail: dict[str, Any] | None = None,
    cause: Callable[[Exception], BaseException] | None = None,
) -> T:
    """``log.perform(kind, label, call)``, counting the call even when it raises.

    ``cause`` finds the error to describe in what the call raised (a mock's
    wrapper around the error the code will see); by default its ``__cause__``.
    """
    detail = dict(detail or {})
    failed: list[Exception] = []

    def attempt() -> T | None:
        try:
            return call()
        except Exception as exc:
            error = cause(exc) if cause is not None else exc.__cause__ or exc
            detail["raised"] = f"{type(error).__name__}: {error}"
            failed.append(exc)
            return None

    result = log.perform(kind, label, attempt, detail=detail)
    if failed:
        raise failed[0]
    return result  # type: ignore[return-value]
