"""The Celery and billiard releases installed, for the expectations that differ between them.

The plugin itself never branches on a version: Celery's own code decides, and
the few places where the plugin must know a release's behaviour are adapters in
``_celery_internals`` chosen from the installed code. A test's *expected*
value, though, is read from a release's source by hand and so is keyed by
release here; each use says which code it was read from.
"""

from __future__ import annotations

from importlib.metadata import version


def minor(distribution: str) -> tuple[int, int]:
    major, minor_, *_ = version(distribution).split(".")
    return int(major), int(minor_)


CELERY = minor("celery")
BILLIARD = minor("billiard")
