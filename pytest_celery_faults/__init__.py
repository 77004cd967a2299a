"""pytest-celery-faults: fault-injection fixtures for Celery tasks.

The names below are loaded on first use, so that importing the pytest plugin
(which every test session does once it is installed) does not import Celery.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine.broker import BrokerProfile, InMemoryBroker, Ledger
    from .engine.clock import VirtualClock
    from .engine.outcome import Outcome, Timeline
    from .errors import (
        CeleryFaultsError,
        CeleryFaultsWarning,
        ConfigError,
        DrainError,
        EmulationError,
        FaultSpecError,
        RefusedError,
        TimeLimitPassed,
        UnfiredFaultError,
    )
    from .grammar import FaultSpec, Step, parse_spec
    from .harness import CeleryFaults
    from .verdicts.idempotency import Scenario, SweepReport

__all__ = [
    "BrokerProfile",
    "CeleryFaults",
    "CeleryFaultsError",
    "CeleryFaultsWarning",
    "ConfigError",
    "DrainError",
    "EmulationError",
    "FaultSpec",
    "FaultSpecError",
    "InMemoryBroker",
    "Ledger",
    "Outcome",
    "Scenario",
    "RefusedError",
    "Step",
    "SweepReport",
    "TimeLimitPassed",
    "Timeline",
    "UnfiredFaultError",
    "VirtualClock",
    "parse_spec",
]

_HOMES = {
    "BrokerProfile": "engine.broker",
    "InMemoryBroker": "engine.broker",
    "Ledger": "engine.broker",
    "VirtualClock": "engine.clock",
    "CeleryFaultsError": "errors",
    "CeleryFaultsWarning": "errors",
    "ConfigError": "errors",
    "DrainError": "errors",
    "EmulationError": "errors",
    "FaultSpecError": "errors",
    "TimeLimitPassed": "errors",
    "RefusedError": "errors",
    "UnfiredFaultError": "errors",
    "FaultSpec": "grammar",
    "Step": "grammar",
    "parse_spec": "grammar",
    "CeleryFaults": "harness",
    "Scenario": "verdicts.idempotency",
    "SweepReport": "verdicts.idempotency",
    "Outcome": "engine.outcome",
    "Timeline": "engine.outcome",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'pytest_celery_faults' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
