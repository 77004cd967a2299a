"""The Django shop's test set-up: settings made here, so the rest of the suite never sees them.

A real project sets ``DJANGO_SETTINGS_MODULE`` in its pytest ini file. This
repository runs several suites in one session, so Django is configured by the
first test of this directory that needs the database (pytest-django's
``django_db_blocker``, overridden here, waits for it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import django
import pytest
from celery import Celery
from django.conf import settings
from django.utils.functional import empty


@pytest.fixture(scope="session")
def django_configured() -> None:
    if not settings.configured:  # not configured again on a second use: that is enough
        from djangoshop import settings as shop_settings

        settings.configure(
            **{name: getattr(shop_settings, name) for name in dir(shop_settings) if name.isupper()}
        )
        django.setup()


@pytest.fixture(scope="module", autouse=True)
def django_only_here(django_configured: None) -> Iterator[None]:
    """After this module, the rest of the suite sees Django unconfigured again.

    pytest-django (and the pytest runs the plugin's own tests start in this
    process) set up Django's test environment whenever settings are configured;
    other suites must not find them. A real project needs none of this.
    """
    _show_settings()
    yield
    _hidden.append(settings._wrapped)
    settings._wrapped = empty


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup: None) -> Iterator[None]:
    """pytest-django's test database, torn down with the settings visible again."""
    yield
    _show_settings()


_hidden: list[Any] = []  # Django's settings while the rest of the suite runs


def _show_settings() -> None:
    if _hidden:
        settings._wrapped = _hidden.pop()


@pytest.fixture(scope="session")
def django_db_blocker(django_configured: None, request: pytest.FixtureRequest) -> Any:
    """pytest-django's blocker, once Django is configured.

    pytest-django's own fixture is a session fixture that returns ``None`` when
    Django was not configured the first time a test (of any directory) used it.
    """
    from pytest_django.plugin import blocking_manager_key

    return request.config.stash[blocking_manager_key]


@pytest.fixture
def celery_faults_app(django_configured: None) -> Celery:
    from djangoshop.tasks import app

    return app


@pytest.fixture
def shop(db: None, celery_faults: Any) -> Any:
    """The shop's database as the task sees it: each commit is a side effect."""
    from pytest_celery_faults.integrations.django import worker_connections

    return worker_connections(celery_faults).count_writes("commits")


@pytest.fixture
def order_id(shop: Any) -> int:
    from djangoshop.models import Order

    return int(Order.objects.create().id)


@pytest.fixture
def observe() -> Callable[[], dict[str, Any]]:
    """What the shop's database and mailbox hold: the real tables, read by the test."""

    def read() -> dict[str, Any]:
        from django.core import mail
        from djangoshop.models import Order, Payment, Receipt

        return {
            "payments": list(Payment.objects.values_list("order_id", "amount")),
            "orders": list(Order.objects.values_list("id", "status")),
            "receipts": list(Receipt.objects.values_list("order_id", flat=True)),
            "mails": [message.subject for message in getattr(mail, "outbox", [])],
        }

    return read


@pytest.fixture
def reset(order_id: int) -> Callable[[], None]:
    def clear() -> None:
        from django.core import mail
        from djangoshop.models import Order, Payment, Receipt

        Payment.objects.all().delete()
        Receipt.objects.all().delete()
        Order.objects.filter(id=order_id).update(status="new")
        mail.outbox = []

    return clear
