"""The package's public names: what ``__all__`` promises resolves, lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest

import pytest_celery_faults


@pytest.mark.parametrize("name", pytest_celery_faults.__all__)
def test_every_public_name_resolves(name: str) -> None:
    value = getattr(pytest_celery_faults, name)
    assert getattr(value, "__name__", name) == name


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'Harness'"):
        _ = pytest_celery_faults.Harness  # type: ignore[attr-defined]


def test_importing_the_package_does_not_import_celery() -> None:
    probe = "import sys, pytest_celery_faults; print('celery' in sys.modules)"
    printed = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert printed.strip() == "False"
