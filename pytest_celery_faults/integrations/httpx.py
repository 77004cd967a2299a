"""httpx under faults: every request through a ``respx`` router is a side effect.

``respx`` is the maintained mock for httpx; :func:`httpx_mock` starts a router
whose every request (matched or raising) goes through the harness's effect
log, like ``celery_faults.http`` does for ``requests``. A request whose route
raises (``side_effect=httpx.ConnectError``) is an attempted effect: it counts,
and the task sees the error. Synchronous clients only (Celery task bodies are
synchronous); ``httpx.AsyncClient`` is refused by a clear error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx
import respx

from ..engine.effects import EffectLog, perform_attempt

if TYPE_CHECKING:
    from ..harness import CeleryFaults


class TrackedRouter(respx.MockRouter):
    """A ``respx.MockRouter`` whose every request is a side effect."""

    def __init__(self, log: EffectLog, **kwargs: Any) -> None:
        kwargs.setdefault("assert_all_called", False)
        super().__init__(**kwargs)
        self.effect_log = log

    def handler(self, request: httpx.Request) -> httpx.Response:
        label = f"{request.method} {request.url}"
        timeout = request.extensions.get("timeout") or {}
        detail = {"timeout": (timeout.get("connect"), timeout.get("read"))}
        parent = super().handler
        return perform_attempt(
            self.effect_log, "http", label, lambda: parent(request), detail, cause=_route_error
        )

    async def async_handler(self, request: httpx.Request) -> httpx.Response:
        raise NotImplementedError(
            f"celery_faults tracks synchronous httpx clients only, not the async request "
            f"{request.method} {request.url}"
        )


def _route_error(error: Exception) -> BaseException:
    """The error a route raised (``respx`` wraps it in a ``SideEffectError``)."""
    origin = getattr(error, "origin", None)
    return origin if isinstance(origin, BaseException) else error


def httpx_mock(harness: CeleryFaults, **kwargs: Any) -> TrackedRouter:
    """A started ``respx`` router for the life of ``harness``; add routes to it as usual."""
    router = TrackedRouter(harness.effects, **kwargs)
    router.start()
    harness.on_stop(router.stop)
    return router
