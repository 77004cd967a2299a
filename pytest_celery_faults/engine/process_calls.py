"""What a task body does to its own process, answered as a prefork child would see it.

In a worker, a task that calls ``os._exit(n)``, sends itself a signal
(``os.kill(os.getpid(), sig)``, ``signal.raise_signal``) or calls
``os.abort()`` ends (or signals) the child process running it, and billiard's
pool reports the job's end; ``signal.signal`` installs a handler in the child
(its main thread runs the task), which stays there for the child's later
tasks and goes with it. The emulated child is the test process: the real
calls would end the test session, or raise "signal only works in main
thread" on an execution's own thread. While the worker side runs (a drain),
:class:`ProcessCallsInBodies` replaces those functions; on a thread where an
execution's body runs they act on that execution's emulated child, and
anywhere else (the test's own code, a thread the task started) they are the
real ones.

Only module attributes are replaced: code that bound the function before
(``from os import _exit``) reaches the real one.
"""

from __future__ import annotations

import errno
import operator
import os
import signal
from collections.abc import Callable
from typing import Any, Protocol


class ChildProcess(Protocol):
    """The emulated child an execution runs in (:class:`.child.ChildExecution`)."""

    def exit_process(self, code: int) -> None: ...

    def abort_process(self) -> None: ...

    def signal_process(self, signum: int) -> None: ...

    def set_handler(self, signum: int, handler: Any) -> Any: ...

    def get_handler(self, signum: int) -> Any: ...


_UNCATCHABLE = frozenset({signal.SIGKILL, signal.SIGSTOP})


def _signal_number(sig: Any, *, refused: Callable[[], BaseException]) -> int:
    number = operator.index(sig)  # Python's own TypeError for a non-integer
    if not 0 <= number < signal.NSIG:
        raise refused()
    return number


class ProcessCallsInBodies:
    """While active, ``os._exit``, ``os.kill``, ``os.abort``, ``signal.raise_signal``,
    ``signal.signal`` and ``signal.getsignal`` act on the emulated child when a
    task body calls them.

    ``current`` returns the execution whose body runs on the calling thread,
    if any. Entered and left once per drain, re-entrant.
    """

    def __init__(self, current: Callable[[], Any]) -> None:
        self.current = current
        self._depth = 0
        self._saved: dict[tuple[Any, str], Any] = {}
        real_exit, real_kill, real_abort = os._exit, os.kill, os.abort
        real_raise_signal, real_signal, real_getsignal = (
            signal.raise_signal,
            signal.signal,
            signal.getsignal,
        )

        def _exit(status: int) -> None:
            execution = current()
            if execution is None:
                real_exit(status)
            else:
                execution.exit_process(operator.index(status))

        def kill(pid: int, sig: int) -> None:
            execution = current()
            if execution is None:
                return real_kill(pid, sig)
            number = _signal_number(
                sig, refused=lambda: OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            )
            pid = operator.index(pid)
            if pid == os.getpid():
                if number:  # signal 0 only checks that the process exists
                    execution.signal_process(number)
                return None
            if pid <= 0 or pid == os.getppid():
                raise RuntimeError(
                    f"celery_faults: the task called os.kill({pid}, {number}), which would "
                    f"signal the worker's main process (or its process group); the emulated "
                    f"worker does not model that (use a fault such as warm_shutdown or "
                    f"cold_shutdown instead)"
                )
            return real_kill(pid, sig)

        def abort() -> None:
            execution = current()
            if execution is None:
                real_abort()
            else:
                execution.abort_process()

        def raise_signal(signalnum: int) -> None:
            execution = current()
            if execution is None:
                return real_raise_signal(signalnum)
            number = _signal_number(
                signalnum, refused=lambda: ValueError("signal number out of range")
            )
            if number:
                execution.signal_process(number)
            return None

        def set_signal(signalnum: int, handler: Any) -> Any:
            execution = current()
            if execution is None:
                return real_signal(signalnum, handler)
            number = _signal_number(
                signalnum, refused=lambda: ValueError("signal number out of range")
            )
            if number in _UNCATCHABLE:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            if not callable(handler) and handler not in (signal.SIG_IGN, signal.SIG_DFL):
                raise TypeError(
                    "signal handler must be signal.SIG_IGN, signal.SIG_DFL, or a callable object"
                )
            return execution.set_handler(number, handler)

        def getsignal(signalnum: int) -> Any:
            execution = current()
            if execution is None:
                return real_getsignal(signalnum)
            number = _signal_number(
                signalnum, refused=lambda: ValueError("signal number out of range")
            )
            return execution.get_handler(number)

        self._replacements: dict[tuple[Any, str], Any] = {
            (os, "_exit"): _exit,
            (os, "kill"): kill,
            (os, "abort"): abort,
            (signal, "raise_signal"): raise_signal,
            (signal, "signal"): set_signal,
            (signal, "getsignal"): getsignal,
        }

    def __enter__(self) -> ProcessCallsInBodies:
        self._depth += 1
        if self._depth == 1:
            for (owner, name), replacement in self._replacements.items():
                self._saved[owner, name] = getattr(owner, name)
                setattr(owner, name, replacement)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            for (owner, name), original in self._saved.items():
                setattr(owner, name, original)
            self._saved.clear()

    def close(self) -> None:
        while self._depth:
            self.__exit__(None, None, None)
