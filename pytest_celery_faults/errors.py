"""The plugin's exceptions and its warning class."""

from __future__ import annotations

import os

#: Where the plugin's own code lives: an error raised from a frame here is the plugin's.
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


class CeleryFaultsError(Exception):
    """Base class of the plugin's errors."""


class FaultSpecError(CeleryFaultsError, ValueError):
    """A fault spec that cannot be read; the message names the bad token and the valid forms."""


class ConfigError(CeleryFaultsError, ValueError):
    """A setting the harness cannot run with (the app's or its own); the message names it."""


class DrainError(CeleryFaultsError):
    """``drain()`` could not reach quiet: a task that retries or requeues forever."""


class EmulationError(CeleryFaultsError):
    """The plugin itself failed inside an execution: not the task's own exception.

    The execution ended there, so the scenario shows nothing the task would
    have done; the harness raises it when the drain ends, failing the test
    with its message instead of classing the scenario.
    """


class UnfiredFaultError(CeleryFaultsError, AssertionError):
    """A fault the test asked for never fired, so the test proved nothing about it."""


class RefusedError(CeleryFaultsError, RuntimeError):
    """The harness cannot make what it promises true for this app; the message says why."""


class HarnessMisuseError(CeleryFaultsError, RuntimeError):
    """The harness was driven from inside a task, or from a thread other than its own."""


class BrokerPoolExhaustedError(CeleryFaultsError):
    """Every connection of the app's broker pool is taken and none was given back: a leak.

    kombu would wait for one; in the emulation nothing could give one back, so
    waiting would hang the test.
    """


class TimeLimitPassed(BaseException):
    """The test's time limit passed while the harness was draining: the drain stops.

    A ``BaseException``, so no ``except Exception`` in the code under test can keep
    the engine going after the time limit's own exception was swallowed or turned
    into another (a ``RecursionError`` raised inside pytest-timeout's handler).
    """


class CeleryFaultsWarning(UserWarning):
    """A problem noticed in the code under test; an error under ``--celery-faults-strict``."""


def raised_by_the_plugin(exc: BaseException) -> bool:
    """Whether ``exc`` was raised in the plugin's own code (not Celery's, kombu's or a task's).

    Celery's callbacks that fail on what a task gave them (a result the
    serializer refuses) fail the same way on a real worker, whose pool logs
    and swallows them; an error raised in the plugin's code is the
    emulation's own and must fail the test.
    """
    frame = exc.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and frame.tb_frame.f_code.co_filename.startswith(_PACKAGE)
