"""Shared fixtures for the plugin's own tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from celery import Celery


@pytest.fixture
def app() -> Iterator[Celery]:
    """A fresh Celery app per test, never connected to anything real."""
    application = Celery(f"test-{uuid.uuid4().hex[:8]}", set_as_current=False)
    application.conf.broker_url = "memory://"
    yield application
    application.close()
