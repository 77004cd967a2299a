"""Shared fixtures for the plugin's own tests."""

from __future__ import annotations

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
