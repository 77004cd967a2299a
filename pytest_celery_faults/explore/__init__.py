"""Exploring whole workloads: seeded fault schedules, a history checker, shrinking.

``celery_faults.explore(workload, observe)`` runs the workload again and
again from a fresh state, each run under a fault schedule drawn from the seed
(faults per message and boundary, overlapping copies, interleavings, stalls on
the virtual clock; the mix of kinds varies run to run), checks each run
(``observe()`` against the fault-free run, ``invariant``, the fate of every
message), and shrinks a failing schedule to the smallest one, printed as a
replay string that ``explore(..., replay=...)`` runs again exactly.

Modules, one idea each: :mod:`.schedule` (a schedule and its replay string),
:mod:`.runner` (one run), :mod:`.checker` (what became of each message),
:mod:`.search` (the choices drawn through Hypothesis), :mod:`.database`
(failing schedules saved per test), :mod:`.report`.
"""

from __future__ import annotations

from typing import Any

#: The public names, imported when first used: exploring needs the engine (and
#: Hypothesis) only when a test explores.
_LAZY = {
    "explore": "explorer",
    "ExploreReport": "report",
    "Schedule": "schedule",
    "parse_schedule": "schedule",
    "DEFAULT_KINDS": "search",
    "OPTIONAL_KINDS": "search",
    "ExploreDefaults": "defaults",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f"{__name__}.{module}"), name)
