"""Finding the Celery app under test from its dotted name."""

from __future__ import annotations

import importlib
from typing import Any

from celery import Celery


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
    if not isinstance(found, Celery):
        raise ValueError(f"{dotted!r} is a {type(found).__name__}, not a Celery app")
    return found
