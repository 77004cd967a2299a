"""Result backends' chord semantics, read from the configured class and the installed Celery.

Celery 5.7's Redis chord script ignores a header task's second result; earlier
releases count it (:func:`redis_chords_ignore_duplicates`).
"""

from __future__ import annotations

import functools
from typing import Any

from celery import Celery


def chord_semantics(app: Celery) -> str:
    """How the result backend ``app`` configures completes chords: redis, incr or unlock.

    Read from the backend's class (imported, never connected): Redis's native
    chord support (its ``on_chord_part_return``), Celery's key/value counting
    for classes that implement ``incr``, else the ``celery.chord_unlock``
    fallback of ``Backend.apply_chord``.

    ``celery.backends.redis`` imports redis-py, which an app on another
    backend need not have installed: it is looked at only once the configured
    class was imported, which imported it when that class is Redis's.
    """
    import sys

    from celery.app.backends import by_url
    from celery.backends.base import KeyValueStoreBackend

    configured = app.conf.result_backend
    if not configured:
        return "unlock"
    try:
        backend_class, _ = by_url(configured, app.loader)
    except Exception:  # an unknown scheme fails the same way in production, elsewhere
        return "unlock"
    redis_backends = sys.modules.get("celery.backends.redis")
    redis_backend = getattr(redis_backends, "RedisBackend", None)
    if redis_backend is not None and issubclass(backend_class, redis_backend):
        return "redis"
    if issubclass(backend_class, KeyValueStoreBackend) and backend_class.implements_incr:
        return "incr"
    return "unlock"


@functools.cache
def redis_chords_ignore_duplicates() -> bool:
    """Whether the installed Redis backend ignores a header task's second result.

    Celery 5.7's chord Lua script keeps a set of (task id, index) members and
    adds each once; earlier releases push every result, so a duplicate counts.
    Read once from the installed Celery.
    """
    from celery.backends import redis

    return "SISMEMBER" in getattr(redis, "CHORD_PART_RETURN_LUA", "")


#: Celery's poller for a chord on a backend without native chord support.
CHORD_UNLOCK = "celery.chord_unlock"


def chord_unlock_waits_forever(request: Any, app: Celery) -> bool:
    """Whether a held ``celery.chord_unlock`` request polls a header that is not ready, for good.

    Celery's fallback (``celery.app.builtins.add_unlock_chord_task``) gets the
    header's results as ``result`` (each ``AsyncResult.as_tuple()``) and
    retries every ``interval`` with ``max_retries`` (``None``: forever) until
    ``GroupResult.ready()``; the caller knows nothing else can make it ready.
    """
    if request.name != CHORD_UNLOCK:
        return False
    kwargs = request.kwargs or {}
    if kwargs.get("max_retries") is not None:
        return False
    from celery.result import result_from_tuple

    try:
        header = [result_from_tuple(item, app=app) for item in kwargs.get("result") or ()]
        return not all(result.ready() for result in header)
    except Exception:  # a form this reading does not know: let it poll as before
        return False
