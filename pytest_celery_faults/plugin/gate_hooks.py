"""The eager gate of one test: with ``--celery-faults``, its eager task runs go through the worker.

A test that uses the ``celery_faults`` harness is left to the harness; a test
that runs tasks eagerly (``task_always_eager``, ``.apply()``, celery.contrib.pytest's
``celery_worker``) gets an :class:`~pytest_celery_faults.session.gate.EagerGate`
for its call phase.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from .markers import marker_settings, suite_specs
from .options import session_seed
from .stash import gate_key

if TYPE_CHECKING:
    from ..session.gate import EagerGate


def eager_gate(item: pytest.Item) -> EagerGate | None:
    """The gate ``item`` runs under, kept on the item for its report; ``None`` when it has none."""
    names = getattr(item, "fixturenames", ())
    specs = [] if "celery_faults" in names else suite_specs(item)
    if not specs:
        return None
    suite_wide = specs
    own = marker_settings(item).specs
    if own:
        stack = item.config.getoption("celery_faults_stack", default=False)
        specs = [*own, *specs] if stack else own
    from ..session.gate import EagerGate

    gate = EagerGate(
        specs,
        suite_wide=[spec for spec in suite_wide if spec in specs],
        seed=session_seed(item.config),
        profile=marker_settings(item).profile,
        catch_async="celery_worker" in names,
    )
    item.stash[gate_key] = gate
    return gate
