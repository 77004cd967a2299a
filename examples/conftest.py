"""The shop's test set-up: a fresh database and fake payment and mail services per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from shop import services
from shop.celery_app import app
from shop.fakes import World


@pytest.fixture
def celery_faults_app() -> Celery:
    # A real project sets `celery_faults_app = "shop.celery_app:app"` in its ini file;
    # the plugin's own repository runs several suites, so this one overrides the fixture.
    return app


@pytest.fixture
def database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "shop.sqlite3"
    monkeypatch.setattr(services, "DB_PATH", str(path))
    services.execute("INSERT INTO orders VALUES (1, 'new', 0)")
    services.execute("INSERT INTO stock VALUES ('mug', 10)")
    yield path


@pytest.fixture
def world(celery_faults: Any, database: Path) -> World:
    world = World()
    celery_faults.http.add_callback("POST", services.PAYMENTS, callback=world.payments)
    celery_faults.http.add_callback("POST", services.MAIL, callback=world.mail)
    celery_faults.track("shop.services.execute")  # each committed write is a side effect
    return world
