"""Compare an emulated outcome with what a real worker does under the same fault."""

from __future__ import annotations

from typing import Any

from ..faults import FaultSpec
from ..outcome import Outcome
from .runner import RealBrokerRunner, normalise_exception

READY = ("SUCCESS", "FAILURE", "REVOKED")


def emulated_view(outcome: Outcome) -> dict[str, Any]:
    exception = outcome.exception
    text = f"{type(exception).__name__}: {exception}" if exception is not None else None
    return {
        "executions": outcome.executions,
        "state": outcome.state,
        "exception": normalise_exception(text),
        "lost": outcome.state not in READY,
    }


def check_against_real(
    runner: RealBrokerRunner, signature: Any, specs: tuple[str | FaultSpec, ...], emulated: Outcome
) -> None:
    """Run ``signature`` under ``specs`` on the real worker; fail when it differs."""
    __tracebackhide__ = True
    if getattr(signature, "subtask_type", None) is not None or len(specs) > 1:
        raise AssertionError(
            "real-broker mode compares one plain signature under at most one spec; "
            f"got {signature!r} with {len(specs)} specs"
        )
    spec = str(specs[0]) if specs else None
    real = runner.run(signature.task, tuple(signature.args), dict(signature.kwargs), spec)
    observed = {
        "executions": real.executions,
        "state": real.state,
        "exception": real.exception,
        "lost": real.lost,
    }
    predicted = emulated_view(emulated)
    if observed != predicted:
        raise AssertionError(
            f"the real worker on {runner.broker_url} disagrees with the emulation for "
            f"{signature.task} under {spec!r}:\n  real:     {observed}\n"
            f"  emulated: {predicted}\nreal records:\n{real.timeline()}\n"
            f"emulated timeline:\n{emulated.timeline}"
        )
