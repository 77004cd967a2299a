"""An in-memory result backend, one per harness, that never waits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery.backends.base import KeyValueStoreBackend
from celery.exceptions import TimeoutError as CeleryTimeoutError


class InMemoryResultBackend(KeyValueStoreBackend):  # type: ignore[misc]
    """Celery's key/value backend over a dict.

    ``AsyncResult.get()`` on a result that is not ready runs the harness's
    ``drain()`` once instead of polling, and raises Celery's ``TimeoutError``
    at once if the task is still not done: a test never sleeps on a result.
    """

    def __init__(
        self,
        app: Any,
        on_wait: Callable[[], None] | None = None,
        refuse_writes: Callable[[], bool] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app=app, **kwargs)
        # Shared by every execution's stack: only one of them ever runs at a time.
        self.thread_safe = True
        self.store: dict[bytes, Any] = {}
        self.on_wait = on_wait
        #: True while a dead child is unwinding: a dead process stores nothing.
        self.refuse_writes = refuse_writes or (lambda: False)

    def clear(self) -> None:
        """Forget every stored result: a fresh scenario."""
        self.store.clear()
        self._cache.clear()

    def get(self, key: bytes) -> Any:
        return self.store.get(key)

    def mget(self, keys: list[bytes]) -> list[Any]:
        return [self.store.get(key) for key in keys]

    def set(self, key: bytes, value: Any) -> None:
        if not self.refuse_writes():
            self.store[key] = value

    def delete(self, key: bytes) -> None:
        self.store.pop(key, None)

    def incr(self, key: bytes) -> int:
        value = int(self.store.get(key) or 0) + 1
        self.store[key] = value
        return value

    def wait_for(
        self,
        task_id: str,
        timeout: float | None = None,
        interval: float = 0.5,
        no_ack: bool = True,
        on_interval: Callable[[], None] | None = None,
    ) -> Any:
        meta = self.get_task_meta(task_id)
        if meta["status"] not in self.READY_STATES and self.on_wait is not None:
            self.on_wait()
            meta = self.get_task_meta(task_id, cache=False)
        if meta["status"] in self.READY_STATES:
            return meta
        raise CeleryTimeoutError(
            f"task {task_id} is {meta['status']} after draining the emulated worker; "
            "nothing left to run would finish it"
        )

    def as_uri(self, include_password: bool = False) -> str:
        return "celery-faults-results://"
