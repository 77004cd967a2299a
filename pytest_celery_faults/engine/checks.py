"""The plugin's checks on the code under test: each finding is a line of text.

They are collected by the harness while it runs and reported by the pytest
plugin as :class:`~pytest_celery_faults.errors.CeleryFaultsWarning` (errors
under ``--celery-faults-strict``).
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from types import CodeType
from typing import Any

from celery import Celery, signals
from celery.local import Proxy
from kombu.serialization import dumps, loads

from .. import speedups
from ..grammar import INTERNAL_PREFIX
from .effects import Effect


def http_timeout_problem(effect: Effect) -> str | None:
    """An HTTP request whose connect or read phase could wait forever."""
    if effect.kind != "http" or effect.detail is None:
        return None
    timeout = effect.detail.get("timeout")
    if isinstance(timeout, tuple | list):
        phases = zip(("connect", "read"), timeout, strict=False)
        unbounded = [phase for phase, value in phases if value is None]
        if len(timeout) == 2 and not unbounded:
            return None
        missing = " and ".join(unbounded) or "connect and read"
    elif timeout is None:
        missing = "connect and read"
    else:
        return None
    where = f"task {effect.task_name}" if effect.task_name else "the test"
    return (
        f"{where}: HTTP {effect.label} without a {missing} timeout; requests waits "
        f"forever on a server that stops answering (pass timeout=(connect, read))"
    )


#: Serializers through which every value of an exact type in :data:`UNCHANGED_TYPES`
#: comes back equal and of the same type: JSON strings (escaped, lone surrogates
#: too), integers, booleans and null; pickle is exact for all four. (An integer
#: past Python's digit limit cannot be written as JSON: only small ones skip.)
ROUND_TRIP_EXACT = frozenset({"json", "pickle"})
UNCHANGED_TYPES = frozenset({str, int, bool, type(None)})


def comes_back_unchanged(value: Any, serializer: str) -> bool:
    """Whether ``value`` provably survives ``serializer`` unchanged, without trying it."""
    kind = type(value)
    if kind not in UNCHANGED_TYPES or serializer not in ROUND_TRIP_EXACT:
        return False
    return kind is not int or value.bit_length() <= 64


def round_trip_problem(value: Any, serializer: str, what: str, task: str) -> str | None:
    """``value`` does not come back equal (or at all) through ``serializer``."""
    if comes_back_unchanged(value, serializer):
        return None  # skip the check's own extra encode and decode
    try:
        content_type, encoding, data = dumps(value, serializer=serializer)
        back = loads(data, content_type, encoding, accept={content_type})
    except Exception as exc:  # what the worker would meet: the message cannot be built
        return f"task {task}: {what} {value!r} cannot be encoded with {serializer}: {exc}"
    if type(back) is not type(value) or (back != value and not same_copy(back, value)):
        return (
            f"task {task}: {what} {value!r} ({type(value).__name__}) comes back from the "
            f"{serializer} round trip as {back!r} ({type(back).__name__})"
        )
    return None


#: ``object.__eq__``: equality that is identity.
_IDENTITY: Any = object.__eq__


def same_copy(copy: Any, value: Any, seen: set[tuple[int, int]] | None = None) -> bool:
    """Whether ``copy`` is ``value`` again, where ``==`` cannot say so.

    A class without ``__eq__`` compares by identity, so its copy never equals it
    (an e-mail message, a plain object): its copy is the same when its state
    (``__dict__``) is. Everything else is compared with its own ``==`` and must
    keep its type, in lists, tuples and dicts too.
    """
    kind = type(value)
    if type(copy) is not kind:
        return False
    if kind is list or kind is tuple:
        return len(copy) == len(value) and all(
            same_copy(c, v, seen) for c, v in zip(copy, value, strict=True)
        )
    if kind is dict:
        return copy.keys() == value.keys() and all(
            same_copy(copy[key], value[key], seen) for key in value
        )
    if kind.__eq__ is not _IDENTITY:
        return bool(copy == value)
    if copy is value:  # None, and the other singletons
        return True
    seen = set() if seen is None else seen
    if (id(copy), id(value)) in seen:  # a cycle: compared already, on the way here
        return True
    seen.add((id(copy), id(value)))
    state, copied_state = getattr(value, "__dict__", None), getattr(copy, "__dict__", None)
    return state is not None and copied_state is not None and same_copy(copied_state, state, seen)


def argument_problems(task: Any, args: Any, kwargs: Any) -> list[str]:
    serializer = task.serializer or task.app.conf.task_serializer
    problems = []
    for index, value in enumerate(args or ()):
        problem = round_trip_problem(value, serializer, f"argument {index}", task.name)
        if problem:
            problems.append(problem)
    for key, value in sorted((kwargs or {}).items()):
        problem = round_trip_problem(value, serializer, f"argument {key}=", task.name)
        if problem:
            problems.append(problem)
    return problems


def result_problem(task: Any, retval: Any) -> str | None:
    if task.ignore_result:
        return None
    serializer = task.app.conf.result_serializer
    return round_trip_problem(retval, serializer, "result", task.name)


def definition_problems(app: Celery) -> list[str]:
    """Tasks hidden behind another decorator, and unbound tasks that call ``self.retry``."""
    problems = []
    for name, task in sorted(app.tasks.items()):
        if name.startswith(INTERNAL_PREFIX):
            continue
        run = type(task).__dict__.get("run")
        function = run.__func__ if isinstance(run, staticmethod) else run
        module = sys.modules.get(getattr(function, "__module__", "") or "")
        attribute = getattr(function, "__name__", "")
        exposed = getattr(module, attribute, None) if module is not None else None
        if isinstance(exposed, Proxy):  # app.task before finalize returns a proxy
            exposed = exposed._get_current_object()
        if module is not None and exposed is not task and _wraps(exposed, task):
            problems.append(
                f"task {name}: {module.__name__}.{attribute} is another decorator wrapped "
                f"around the task; put @app.task outermost, or .delay() and the worker "
                f"bypass the wrapper"
            )
        if isinstance(run, staticmethod) and _calls_self_retry(function):
            problems.append(
                f"task {name} calls self.retry but is not bound: add bind=True to its decorator"
            )
    return problems


def _wraps(candidate: Any, task: Any) -> bool:
    """Whether ``candidate`` reaches ``task`` through ``__wrapped__`` links."""
    for _ in range(10):
        if candidate is None:
            return False
        if isinstance(candidate, Proxy):  # app.task before finalize returns a proxy
            candidate = candidate._get_current_object()
        if candidate is task:
            return True
        candidate = getattr(candidate, "__wrapped__", None)
    return False


def _calls_self_retry(function: Any) -> bool:
    code = getattr(function, "__code__", None)
    return _code_calls_self_retry(code) if code is not None else False


def _code_calls_self_retry(code: CodeType) -> bool:
    """Whether the source of ``code`` calls ``self.retry(`` (read once per code object)."""
    if speedups.enabled():  # each harness checks every task of the app as it starts
        return _source_calls_self_retry_cached(code)
    return _source_calls_self_retry(code)


def _source_calls_self_retry(code: CodeType) -> bool:
    try:
        source = inspect.getsource(code)
    except (OSError, TypeError):
        return False
    return "self.retry(" in source


_source_calls_self_retry_cached = functools.lru_cache(maxsize=1024)(_source_calls_self_retry)


#: What Flask raises when code needs an app context no one pushed.
FLASK_NO_CONTEXT = "Working outside of application context"


def context_problem(task: Any, exception: BaseException | None) -> str | None:
    """A task that needed the test's Flask app context: a worker child has none."""
    if not isinstance(exception, RuntimeError) or FLASK_NO_CONTEXT not in str(exception):
        return None
    return (
        f"task {task.name} ran outside a Flask application context: it runs as in a worker "
        f"child, which has none of the test's context; give the task its own, as a worker "
        f"needs it too (a Task base class that pushes app.app_context(), set before the "
        f"tasks are bound, or a task_prerun receiver)"
    )


class Checks:
    """Connects the checks to Celery's signals for the life of a harness."""

    def __init__(self, app: Celery, report: Callable[[str], None]) -> None:
        self.app = app
        self.report = report

    def start(self) -> None:
        for problem in definition_problems(self.app):
            self.report(problem)
        signals.before_task_publish.connect(self._before_publish, weak=False)
        signals.task_postrun.connect(self._postrun, weak=False)
        signals.task_failure.connect(self._failure, weak=False)

    def stop(self) -> None:
        signals.before_task_publish.disconnect(self._before_publish)
        signals.task_postrun.disconnect(self._postrun)
        signals.task_failure.disconnect(self._failure)

    def _failure(
        self, sender: Any = None, exception: BaseException | None = None, **_: Any
    ) -> None:
        if sender is None or sender.app is not self.app:
            return
        problem = context_problem(sender, exception)
        if problem:
            self.report(problem)

    def effect(self, effect: Effect) -> None:
        problem = http_timeout_problem(effect)
        if problem:
            self.report(problem)

    def _before_publish(self, sender: str | None = None, body: Any = None, **_: Any) -> None:
        task = self.app.tasks.get(sender or "")
        if task is None or task.name.startswith(INTERNAL_PREFIX):
            return  # Celery's own tasks (chord_unlock...) are not the code under test
        if not isinstance(body, tuple | list) or len(body) < 2:
            return
        for problem in argument_problems(task, body[0], body[1]):
            self.report(problem)

    def _postrun(
        self, sender: Any = None, retval: Any = None, state: str | None = None, **_: Any
    ) -> None:
        if state != "SUCCESS" or sender is None or sender.app is not self.app:
            return
        if sender.name.startswith(INTERNAL_PREFIX):
            return
        problem = result_problem(sender, retval)
        if problem:
            self.report(problem)
