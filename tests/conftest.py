"""Shared fixtures for the plugin's own tests."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator

import pytest
from celery import Celery
from recording import World

# pytester's in-process runs drop the modules first imported inside them; a
# later run would then import Celery's worker and billiard again, and classes
# from two imports of one module would meet (isinstance fails). Import them here.
import pytest_celery_faults.harness  # noqa: F401
import pytest_celery_faults.verdicts.idempotency  # noqa: F401


@pytest.fixture
def app() -> Iterator[Celery]:
    """A fresh Celery app per test, never connected to anything real."""
    application = Celery(f"test-{uuid.uuid4().hex[:8]}", set_as_current=False)
    application.conf.broker_url = "memory://"
    yield application
    application.close()


@pytest.fixture
def world() -> World:
    """A fresh recording world: what the test's tasks change, through ``world.touch``."""
    return World()


@pytest.fixture(autouse=True)
def _no_thread_left_behind() -> Iterator[None]:
    """The plugin starts no threads; a test that leaves one behind fails."""
    before = set(threading.enumerate())
    yield
    left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not left, f"threads left behind: {left}"


#: The loggers Celery's worker reports a refused message or a task's failure on.
CELERY_ERROR_LOGGERS = ("celery.worker.consumer.consumer", "celery.app.trace")


@pytest.fixture
def celery_error_log() -> Iterator[list[str]]:
    """What Celery's consumer and tracer log at ERROR and above, whatever logging an
    earlier test set up (Django's ``LOGGING`` disables the loggers that exist, a
    worker's setup stops propagation): ``caplog`` would see nothing after those."""
    lines: list[str] = []

    class Kept(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Kept(logging.ERROR)
    loggers = [logging.getLogger(name) for name in CELERY_ERROR_LOGGERS]
    saved = [(logger.level, logger.disabled) for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.ERROR)
        logger.disabled = False
    try:
        yield lines
    finally:
        for logger, (level, disabled) in zip(loggers, saved, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.disabled = disabled
