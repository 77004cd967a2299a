"""Integrations with the libraries tasks use, each imported only when a test asks for it.

* :mod:`.django`: worker-process connection semantics for Django, database
  writes and mail as side effects (``pip install 'pytest-celery-faults[django]'``);
* :mod:`.sqlalchemy`: the same for SQLAlchemy engines and sessions (``[sqlalchemy]``);
* :mod:`.httpx`: every ``httpx`` request through ``respx`` is a side effect (``[httpx]``);
* :mod:`.redis`: every redis-py command is a side effect (``[redis]``);
* :mod:`.smtp`: every ``smtplib`` send is a side effect (standard library).

Django's is also attached by the harness itself when Django is configured
(:func:`django_configured`): executions get worker connections without asking.
"""

from __future__ import annotations

import sys


def django_configured() -> bool:
    """Whether the process has configured Django (never imports Django to find out)."""
    if "django.conf" not in sys.modules:
        return False
    from django.conf import settings

    return bool(settings.configured)
