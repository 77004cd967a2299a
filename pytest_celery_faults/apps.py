"""Finding the Celery app under test from its dotted name, or behind a proxy.

A library built only with ``@shared_task`` has no app of its own: its tasks
join every app when it finalizes. ``celery:current_app`` names the proxy to
whichever app is current; the harness needs the app itself (a proxy made the
current app would point at itself), so :func:`real_app` resolves it once.
"""

from __future__ import annotations

import importlib
from typing import Any

from celery import Celery, Task

from . import _celery_internals as internals


def load_app(dotted: str) -> Celery:
    """``module:attribute`` (or ``module.attribute``) -> the Celery app it names."""
    module_name, sep, attribute = dotted.partition(":")
    if not sep:
        module_name, _, attribute = dotted.rpartition(".")
    try:
        found: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(
            f"{dotted!r}: cannot load it ({exc}); expected 'module:attribute'"
        ) from None
    return real_app(found, dotted)


def real_app(value: Any, name: str | None = None) -> Celery:
    """``value`` itself when it is a Celery app, the app behind it when it is a proxy."""
    found = internals.app_behind_proxy(value)
    if not isinstance(found, Celery):
        what = repr(name) if name is not None else repr(value)
        if isinstance(found, Task):  # its class is generated, named after the function
            raise ValueError(
                f"{what} is the Celery task {found.name!r}, not a Celery app: name the app "
                f"its module defines (such as proj.celery:app)"
            )
        raise ValueError(f"{what} is a {type(found).__name__}, not a Celery app")
    return found
