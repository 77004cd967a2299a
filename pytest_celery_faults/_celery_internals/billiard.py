"""billiard's pool as the emulated worker reports it: child deaths, exits, signals, time limits.

What billiard's parent tells Celery when a child dies, is killed, exceeds a
time limit or raises past ``Exception``, built with billiard's own classes so
the text is the text a real worker logs. Where billiard releases differ (4.2
and 4.3 report a ``BaseException`` from a job differently), the installed code
is read once at import and the adapter follows it.
"""

from __future__ import annotations

import functools
import pickle
import signal
from typing import Any

from billiard.common import human_status
from billiard.einfo import ExceptionInfo
from billiard.exceptions import TimeLimitExceeded, WorkerLostError
from billiard.pool import MaybeEncodingError
from celery import Celery


def _worker_lost_info(exitcode: int, job: int) -> ExceptionInfo:
    """What billiard's ``Pool.mark_as_worker_lost`` reports for a job whose child is gone."""
    try:
        raise WorkerLostError(f"Worker exited prematurely: {human_status(exitcode)} Job: {job}.")
    except WorkerLostError:
        return ExceptionInfo()


def child_death_info(signum: int, job: int) -> ExceptionInfo:
    """What billiard's pool reports for a child killed by ``signum``."""
    return _worker_lost_info(-signum, job)


def child_gone_info(status: int, job: int) -> ExceptionInfo:
    """What billiard's pool reports for a child that died with ``status``.

    ``status`` is what the pool reads from the dead process: its exit code
    (``os._exit(n)``), or minus the signal that killed it.
    """
    return _worker_lost_info(status, job)


#: What a prefork child does with a signal it receives, before any task code runs:
#: billiard's ``Worker.after_fork`` installs ``_shutdown_cleanup`` for its terminate
#: signals (``reset_signals``, the ``sigprotection`` set off as Celery runs it) and
#: the soft time limit's handler; Celery's ``process_initializer`` and billiard
#: ignore SIGINT. Read from the installed billiard and Celery.
@functools.cache
def child_signal_disposition(signum: int) -> str:
    """``"shutdown"``, ``"soft_timeout"``, ``"ignore"`` or ``"default"`` (the OS's action)."""
    from billiard import common
    from billiard.pool import SIG_SOFT_TIMEOUT
    from celery.concurrency.prefork import WORKER_SIGIGNORE

    if signum == SIG_SOFT_TIMEOUT:
        return "soft_timeout"
    names = {name for name in common.TERMSIGS_DEFAULT if name not in common.TERMSIGS_IGNORE}
    if signum in {getattr(signal, name, None) for name in names}:
        return "shutdown"
    ignored = {*WORKER_SIGIGNORE, *common.TERMSIGS_IGNORE, "SIGINT"}
    if signum in {getattr(signal, name, None) for name in ignored}:
        return "ignore"
    return "default"


@functools.cache
def child_initial_handler(signum: int) -> Any:
    """What ``signal.getsignal(signum)`` answers in a fresh prefork child."""
    from billiard import common
    from billiard.pool import soft_timeout_sighandler

    disposition = child_signal_disposition(signum)
    if disposition == "shutdown":
        return common._shutdown_cleanup
    if disposition == "soft_timeout":
        return soft_timeout_sighandler
    if disposition == "ignore":
        return signal.SIG_IGN
    return signal.SIG_DFL


def status_after_shutdown(signum: int) -> int:
    """How a child that ran ``_shutdown_cleanup`` for ``signum`` ends, as the pool reads it.

    The handler resets ``signum`` to its default action and raises
    ``SystemExit``; the child unwinds, tells the parent it is dying
    (``_do_exit``: DEATH, then a second's sleep), and the parent answers
    with its terminate signal (``on_death``). For the terminate signal
    itself that kills the child (``signal 15 (SIGTERM)``, measured); for
    another, the child's terminate handler runs a second time and leaves
    with ``os._exit(EX_SOFTWARE)``.
    """
    from billiard import common

    return -signum if signum == common.TERM_SIGNAL else int(common.EX_SOFTWARE)


def _workloop_reports_exit() -> bool:
    from billiard.pool import Worker

    return "exit_exc" in Worker.workloop.__code__.co_varnames


#: billiard 4.3's ``Worker.workloop`` catches what a job raises past ``Exception``
#: (``exit_exc``), sends it as the job's result, then leaves; billiard 4.2's catches
#: only ``Exception``. Read from the installed billiard.
_WORKLOOP_REPORTS_BASE_EXCEPTIONS = _workloop_reports_exit()


#: How long billiard's ``Pool._trywaitkill`` waits after SIGTERM before SIGKILL when a
#: hard time limit passes (``worker._popen.wait(timeout=0.1)``; billiard 4.2 and 4.3).
HARD_TIMEOUT_TERM_GRACE = 0.1


def time_limit_info(timeout: float | None) -> ExceptionInfo:
    """What billiard's ``TimeoutHandler.on_hard_timeout`` hands to the error callback."""
    try:
        raise TimeLimitExceeded(timeout)
    except TimeLimitExceeded:
        return ExceptionInfo()


def job_error_info(exc: BaseException, job: int) -> ExceptionInfo:
    """What the pool reports to the parent for job ``job``, whose task raised ``exc``.

    billiard 4.2: an exception past ``Exception`` (``sys.exit``, ``KeyboardInterrupt``,
    ``GeneratorExit``, a pytest outcome) escapes the workloop; the child exits
    with ``sys.exit``'s code, else 0 (``Worker.__call__``'s ``exit`` hook and
    ``_do_exit``), and sends no result: the pool's ``mark_as_worker_lost``.
    Otherwise (and always on billiard 4.3) the ``ExceptionInfo`` pickled
    through the result pipe; when the exception does not pickle (pytest's
    outcomes are classes pickle cannot find), the child sends
    ``MaybeEncodingError`` instead, as ``Worker.workloop`` does.
    """
    if not isinstance(exc, Exception) and not _WORKLOOP_REPORTS_BASE_EXCEPTIONS:
        code = exc.code if isinstance(exc, SystemExit) else 0
        exitcode = 0 if code is None else code if isinstance(code, int) else 1
        return _worker_lost_info(exitcode & 0xFF, job)
    info = ExceptionInfo()
    try:
        pickle.dumps(exc)
    except Exception as failure:
        wrapped = MaybeEncodingError(failure, info)
        try:
            raise wrapped from None
        except MaybeEncodingError:
            return ExceptionInfo()
    return info


def time_limits_applied(request: Any, app: Celery) -> tuple[float | None, float | None]:
    """The (hard, soft) time limits a prefork worker applies to ``request``.

    ``Request.execute_using_pool`` passes the message's limits or the task's;
    billiard's pool falls back to its own, built from ``task_time_limit`` and
    ``task_soft_time_limit``.
    """
    hard, soft = request.time_limits
    task = request.task
    return (
        hard or task.time_limit or app.conf.task_time_limit,
        soft or task.soft_time_limit or app.conf.task_soft_time_limit,
    )


def soft_time_limit_signal() -> int | None:
    """The signal billiard's parent sends a child whose soft time limit passed."""
    from billiard.pool import SIG_SOFT_TIMEOUT

    return SIG_SOFT_TIMEOUT  # type: ignore[no-any-return]


def terminated_info(signum: int) -> ExceptionInfo:
    """What billiard reports for a job whose child ``terminate_job`` killed.

    ``Pool._join_exited_workers`` calls ``job._set_terminated(exitcode)``.
    """
    from billiard.exceptions import Terminated

    try:
        raise Terminated(signum)
    except Terminated:
        return ExceptionInfo()


def signal_number(signum: int | str | None) -> int:
    """The signal Celery's ``Request.terminate`` passes to the pool, as a number."""
    from billiard.common import TERM_SIGNAME
    from celery.platforms import signals

    return int(signals.signum(signum or TERM_SIGNAME))


def child_memory_kb() -> int:
    """The resident memory billiard reads in a child after each task (``mem_rss``), in kB."""
    from billiard.compat import mem_rss

    return int(mem_rss())
