"""The worker settings an emulated worker reads, checked as a worker would check them."""

from __future__ import annotations

from celery import Celery

from ..errors import ConfigError

#: in about 0.2 s; 10**6 would take minutes and gigabytes before the first task ran).
MAX_WORKERS = 1000


def check_workers(workers: object) -> int:
    """``workers`` as a whole number of emulated workers, or a ``ValueError`` naming it."""
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ConfigError(f"workers={workers!r}: expected a whole number >= 1")
    if workers > MAX_WORKERS:
        raise ConfigError(
            f"workers={workers!r}: at most {MAX_WORKERS:,} emulated workers (each is a "
            f"consumer in this process); a handful shows every interleaving"
        )
    return workers


def worker_concurrency(app: Celery) -> int:
    """The children a worker of ``app`` runs: ``worker_concurrency`` if the app sets it, else 1."""
    configured = app.conf.get("worker_concurrency")
    if configured is None:
        return 1
    if isinstance(configured, bool) or not isinstance(configured, int) or configured < 1:
        raise ConfigError(f"worker_concurrency={configured!r}: expected a whole number >= 1")
    return configured


def per_child_limit(app: Celery, name: str) -> int | None:
    """``worker_max_tasks_per_child`` or ``worker_max_memory_per_child``: None, or a number."""
    value = app.conf.get(name)
    if value is None or value == 0:
        return None  # billiard: no limit
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name}={value!r}: expected a whole number >= 1, or None for no limit")
    return value


def check_worker_settings(app: Celery) -> None:
    """Refuse, before anything starts, worker settings a worker would refuse."""
    worker_concurrency(app)
    for name in ("worker_max_tasks_per_child", "worker_max_memory_per_child"):
        per_child_limit(app, name)
