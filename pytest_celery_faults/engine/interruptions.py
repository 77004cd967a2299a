"""Telling an interruption of the test run from an exception a task raised.

In a worker, whatever a task raises is the task's: billiard's child reports a
``KeyboardInterrupt``, a ``GeneratorExit`` or a pytest outcome as the job's
error, and the task ends FAILURE. The emulated child is the test process,
though: a Ctrl-C, or pytest-timeout's alarm, raises in whatever task body runs
at that moment, and must stop the test run as it would anywhere else.

Where the exception came from tells them apart. An interruption is raised by a
signal handler: a Python handler (pytest-timeout's) leaves its frame in the
traceback, and Python's default SIGINT handler raises ``KeyboardInterrupt``
from C between two instructions of whatever was running, never at a ``raise``.
"""

from __future__ import annotations

import dis
import signal
from types import CodeType, TracebackType

_RAISES = frozenset(dis.opmap[name] for name in ("RAISE_VARARGS", "RERAISE") if name in dis.opmap)
#: The signals that stop a test run from a Python handler (pytest-timeout's SIGALRM,
#: Ctrl-C, a terminal hanging up, a supervisor's TERM or QUIT, the USR pair).
_STOPPING_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGALRM", "SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
    if hasattr(signal, name)
)


def stops_the_test_run(exc: BaseException) -> bool:
    """Whether ``exc`` is the test run being interrupted, not something the task raised."""
    if isinstance(exc, Exception):
        return False
    handlers = _python_signal_handlers()
    innermost: TracebackType | None = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code in handlers:
            return True
        innermost, tb = tb, tb.tb_next
    if isinstance(exc, KeyboardInterrupt) and innermost is not None:
        code = innermost.tb_frame.f_code.co_code
        return code[innermost.tb_lasti] not in _RAISES
    return False


#: The process's own handlers: while a task body runs, ``signal.getsignal`` answers
#: for its emulated child (see :mod:`.process_calls`).
_process_handler = signal.getsignal


def _python_signal_handlers() -> set[CodeType]:
    codes = set()
    for signum in _STOPPING_SIGNALS:
        handler = _process_handler(signum)
        function = getattr(handler, "__func__", handler)
        code = getattr(function, "__code__", None)
        if isinstance(code, CodeType):
            codes.add(code)
    return codes
