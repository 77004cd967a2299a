"""Caches that exist only for speed, over billiard's, Celery's and Python's private helpers.

Each one changes nothing a test can see, and each is left out when
:func:`pytest_celery_faults.speedups.enabled` says no (the one switch: the
environment variable ``CELERY_FAULTS_NO_SPEEDUPS=1`` or
``speedups.disabled()``); the context managers then do nothing.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import billiard.einfo
from celery import Celery

from .. import speedups

#: billiard's picklable stand-in for a code object, one per code object while cached.
_code_summaries: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_cache_users = 0


def _cached_code_summary(code: Any) -> Any:
    summary = _code_summaries.get(code)
    if summary is None:
        summary = _code_summaries[code] = billiard.einfo._Code(code)
    return summary


@contextlib.contextmanager
def code_summaries_cached() -> Iterator[None]:
    """Build billiard's ``_Code`` summary of each code object once, not per traceback.

    Every ``ExceptionInfo`` (a task that raises, a child that dies) copies each
    frame's code object, listing all of its ``co_positions()``: for Celery's
    ``trace_task`` that is most of the cost of a failure. The summary depends on
    the code object alone, so sharing it changes no traceback text.
    """
    global _cache_users
    if not speedups.enabled():
        yield
        return
    frame_class = billiard.einfo._Frame
    if getattr(frame_class, "Code", None) is not billiard.einfo._Code and _cache_users == 0:
        yield  # another billiard, or someone else's hook: leave it alone
        return
    _cache_users += 1
    frame_class.Code = staticmethod(_cached_code_summary)
    try:
        yield
    finally:
        _cache_users -= 1
        if _cache_users == 0:
            frame_class.Code = billiard.einfo._Code
            _code_summaries.clear()


#: The view's methods that change a setting: each drops the snapshot.
_SETTING_WRITES = (
    "__setitem__",
    "__delitem__",
    "update",
    "setdefault",
    "pop",
    "popitem",
    "clear",
    "add_defaults",
    "swap_with",
)
_snapshot_classes: dict[type[Any], type[Any]] = {}
_SNAPSHOT = "_celery_faults_defaults"


def _snapshotting_class(base: type[Any]) -> type[Any]:
    """``base`` (Celery's ``Settings``) answering default-only settings from a dict."""
    cached = _snapshot_classes.get(base)
    if cached is not None:
        return cached
    lookup = base.__getitem__

    def __getitem__(self: Any, key: str) -> Any:
        snapshot = self.__dict__.get(_SNAPSHOT)
        if snapshot is None:  # a copy of the view (Settings.copy): answered as Celery does
            return lookup(self, key)
        changes = self.changes
        if key in changes:
            if self.prefix is None and self.key_t is None:
                return changes[key]  # the first place Celery looks, when it spells keys as given
        elif key in snapshot:
            return snapshot[key]
        value = lookup(self, key)
        if not any(variant in changes for variant in self._to_keys(key)):
            snapshot[key] = value  # found only in the defaults: the same object every time
        return value

    def writer(name: str) -> Callable[..., Any]:
        write = getattr(base, name)

        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            snapshot = self.__dict__.get(_SNAPSHOT)
            if snapshot:
                snapshot.clear()
            return write(self, *args, **kwargs)

        method.__name__ = name
        return method

    namespace: dict[str, Any] = {
        "__getitem__": __getitem__,
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
    }
    namespace.update({name: writer(name) for name in _SETTING_WRITES if hasattr(base, name)})
    cached = _snapshot_classes[base] = type(base.__name__, (base,), namespace)
    return cached


@contextlib.contextmanager
def default_settings_snapshot(app: Celery) -> Iterator[None]:
    """Answer the settings the app finds only in Celery's defaults from a dict.

    Each miss in ``app.conf`` costs a chain of ``KeyError``s over the key's old
    and new spellings in every map. A setting read once and found in no map the
    app writes to is kept; any write through the view drops them all, and a
    key the app sets directly in ``changes`` is read from there. Undone on exit.
    """
    conf = app.conf
    base = type(conf)
    if not speedups.enabled():
        yield
        return
    if not hasattr(conf, "maps") or not hasattr(conf, "_to_keys") or _SNAPSHOT in conf.__dict__:
        yield  # not Celery's Settings as we know it, or already snapshotting
        return
    conf.__dict__[_SNAPSHOT] = {}
    object.__setattr__(conf, "__class__", _snapshotting_class(base))  # not a setting
    try:
        yield
    finally:
        object.__setattr__(conf, "__class__", base)
        conf.__dict__.pop(_SNAPSHOT, None)


#: Python's pure helpers that place a traceback's carets (3.11+; the second is 3.13's).
_CARET_ANCHORS = "_extract_caret_anchors_from_line_segment"
_SHOW_CARETS = "_should_show_carets"
_caret_users = 0
_caret_originals: dict[str, Any] = {}


def _cached_should_show_carets(show: Callable[..., bool]) -> Callable[..., bool]:
    cache: dict[tuple[Any, ...], bool] = {}

    def should_show(self: Any, start: int, end: int, lines: list[str], anchors: Any) -> bool:
        try:
            key = (start, end, tuple(lines), anchors)
            return cache[key]
        except KeyError:
            shown = cache[key] = show(self, start, end, lines, anchors)
            return shown
        except TypeError:  # arguments that cannot be hashed: compute as Python does
            return show(self, start, end, lines, anchors)

    return should_show


@contextlib.contextmanager
def caret_anchors_cached() -> Iterator[None]:
    """Compute Python's traceback caret anchors once per source segment, not per traceback.

    Formatting a traceback parses each frame's source segment (``ast.parse``)
    to place the ``~~~^^^`` carets; billiard's ``ExceptionInfo`` formats one for
    every failure and every killed child. The anchors are a pure function of
    the segment's text (on 3.13 also of the offsets and lines passed), so a
    cache keyed on those arguments leaves every traceback's text byte-identical.
    """
    global _caret_users
    import functools
    import traceback

    if not speedups.enabled():
        yield
        return
    summary = traceback.StackSummary
    if _caret_users == 0:
        extract = getattr(traceback, _CARET_ANCHORS, None)
        if extract is not None:
            _caret_originals["extract"] = extract
            setattr(traceback, _CARET_ANCHORS, functools.lru_cache(4096)(extract))
        show = summary.__dict__.get(_SHOW_CARETS)
        if show is not None:
            _caret_originals["show"] = show
            setattr(summary, _SHOW_CARETS, _cached_should_show_carets(show))
    _caret_users += 1
    try:
        yield
    finally:
        _caret_users -= 1
        if _caret_users == 0:
            if "extract" in _caret_originals:
                setattr(traceback, _CARET_ANCHORS, _caret_originals.pop("extract"))
            if "show" in _caret_originals:
                setattr(summary, _SHOW_CARETS, _caret_originals.pop("show"))
