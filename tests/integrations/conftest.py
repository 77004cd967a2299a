"""A small Django project for pytester runs: settings, models, tasks (made per test)."""

from __future__ import annotations

# pytester's in-process runs drop the modules first imported inside them, and
# classes from two imports of one module then meet (redis-py's DriverInfo, for
# one). Import the libraries the in-process runs use here, once.
import smtplib  # noqa: F401
import textwrap
from collections.abc import Callable

import fakeredis  # noqa: F401
import httpx  # noqa: F401
import pytest
import respx  # noqa: F401
import sqlalchemy  # noqa: F401

SETTINGS = """
SECRET_KEY = "tests"
INSTALLED_APPS = ["djshop"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": "djshop.sqlite3"}}
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
"""

MODELS = """
from django.db import models

class Order(models.Model):
    status = models.CharField(max_length=10, default="new")

class Payment(models.Model):
    order = models.ForeignKey(Order, on_delete=models.CASCADE)

class Receipt(models.Model):
    order = models.ForeignKey(Order, on_delete=models.CASCADE)
"""

TASKS = """
from celery import Celery
from django.core.mail import send_mail
from django.db import transaction

from djshop.models import Order, Payment, Receipt

app = Celery("djshop", set_as_current=False)
app.conf.task_acks_late = True
app.conf.task_reject_on_worker_lost = True


@app.task
def pay(order_id):
    with transaction.atomic():
        order = Order.objects.select_for_update().get(id=order_id)
        if order.status == "paid":
            return "already paid"
        Payment.objects.create(order=order)
        order.status = "paid"
        order.save()
        transaction.on_commit(lambda: receipt.delay(order_id))
    return "paid"


@app.task
def pay_in_two_commits(order_id):
    order = Order.objects.get(id=order_id)
    if order.status == "paid":
        return "already paid"
    Payment.objects.create(order=order)
    order.status = "paid"
    order.save()
    return "paid"


@app.task
def receipt(order_id):
    Receipt.objects.create(order_id=order_id)
    send_mail("receipt", f"order {order_id}", "shop@example.com", ["client@example.com"])
"""

CONFTEST = """
import pytest

from djshop.tasks import app


@pytest.fixture
def celery_faults_app():
    return app


@pytest.fixture(
    params=[
        pytest.param(False, marks=pytest.mark.django_db, id="db"),
        pytest.param(True, marks=pytest.mark.django_db(transaction=True), id="transactional_db"),
    ]
)
def transactional(request):
    # Each test taking it runs under pytest-django's db, then under transactional_db.
    return request.param


@pytest.fixture
def orm(celery_faults):
    from pytest_celery_faults.integrations.django import worker_connections

    return worker_connections(celery_faults)
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> Callable[..., pytest.Pytester]:
    """Make a project in pytester's directory: a conftest and the named modules."""

    def make(conftest: str, **modules: str) -> pytest.Pytester:
        pytester.makepyfile(**modules)
        pytester.makeconftest(conftest)
        pytester.makeini("[pytest]\naddopts = -p no:randomly\n")
        return pytester

    return make


@pytest.fixture
def django_project(pytester: pytest.Pytester) -> pytest.Pytester:
    """A Django project with pytest-django set up by an ini file, in pytester's directory."""
    package = pytester.mkpydir("djshop")
    (package / "settings.py").write_text(textwrap.dedent(SETTINGS))
    (package / "models.py").write_text(textwrap.dedent(MODELS))
    (package / "tasks.py").write_text(textwrap.dedent(TASKS))
    pytester.makeconftest(CONFTEST)
    pytester.makeini(
        "[pytest]\nDJANGO_SETTINGS_MODULE = djshop.settings\n"
        "addopts = -p no:randomly -p no:cacheprovider\ntimeout = 60\n"
    )
    return pytester


@pytest.fixture
def django_tests(django_project: pytest.Pytester) -> Callable[..., pytest.RunResult]:
    """Run a test file in the Django project (a subprocess); all ``passed`` tests pass."""

    def run(source: str, *, passed: int) -> pytest.RunResult:
        django_project.makepyfile(source)
        result = django_project.runpytest_subprocess("-v")
        result.assert_outcomes(passed=passed)
        return result

    return run
