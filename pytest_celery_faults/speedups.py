"""The one switch for everything the plugin does only to run faster.

A speed-up is a cache or a shortcut that must change nothing a test can see:
the same outcomes, the same timelines, the same report text, byte for byte.
Each one asks :func:`enabled` when it is set up and, when the answer is no,
leaves Celery, kombu, billiard and Python exactly as they are. That makes every
speed-up checkable: ``tests/test_speed.py`` runs the same
scenarios with the switch on and off and compares what comes out.

Turned off for a whole run with the environment variable
``CELERY_FAULTS_NO_SPEEDUPS=1`` (to rule the speed-ups out when a result looks
wrong), or for a block of code with :func:`disabled`.

The speed-ups behind the switch (those touching Celery's, kombu's or billiard's
private API live in ``_celery_internals/speedups.py``):

- ``code_summaries_cached``: billiard's ``_Code`` summary of a code object,
  built once per code object rather than once per traceback;
- ``caret_anchors_cached``: Python's traceback caret anchors, computed once
  per source segment;
- ``default_settings_snapshot``: settings found only in Celery's defaults,
  answered from a dict instead of a chain of ``KeyError``\\ s;
- ``copyable`` (``engine/copies.py``): a sweep publishes once and each
  scenario sends a faithful copy of that message, instead of ``apply_async``;
- ``BoundProducerPool`` (``engine/broker.py``): one producer per connection,
  its exchanges declared once;
- ``_code_calls_self_retry`` (``engine/checks.py``): a task's source read once
  per code object;
- ``tracked_call`` (``engine/effects.py``): a tracked call does what
  ``EffectLog.perform`` does, inlined, with no closure per call;
- timeline rows (``engine/history.py``): a timeline line is kept as the effect
  or the row of fields it is built from, and built when read;
- ``Stack.switch_point`` (``engine/scheduler.py``): a stack alone does not scan
  the others at each side effect;
- ``Engine._effect_observer`` (``engine/core.py``): a tracked call's count
  and timeline line in one frame, its fields read by position;
- ``TimeInBodies._to_now`` (``engine/clock.py``): one time-machine ``travel``
  pointed at the virtual clock at each drain, not one made per drain;
- ``SeededRandom`` (``engine/core.py``): a reset puts a scenario's random
  sources back to their seed only when something drew from them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

#: Set to ``1`` (or any non-empty value but ``0``) to turn every speed-up off.
ENVIRONMENT_VARIABLE = "CELERY_FAULTS_NO_SPEEDUPS"

_disabled_blocks = 0


def enabled() -> bool:
    """Whether the speed-ups apply: neither the environment nor :func:`disabled` says no."""
    if _disabled_blocks:
        return False
    return os.environ.get(ENVIRONMENT_VARIABLE, "") in ("", "0")


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Every speed-up set up inside this block is left out (re-entrant).

    A speed-up reads the switch when a harness starts, so a harness started
    inside the block runs without any, even if it outlives the block.
    """
    global _disabled_blocks
    _disabled_blocks += 1
    try:
        yield
    finally:
        _disabled_blocks -= 1
