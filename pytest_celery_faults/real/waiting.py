"""Real time, in real-broker mode only.

Everything else in the plugin runs on the virtual clock; a real worker runs on
the wall clock, so observing it means polling. Every poll goes through
:func:`polls`, whose bound is a required argument.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

#: Seconds between two looks at a real worker, its record file or the broker.
POLL_SECONDS = 0.05


def polls(timeout: float, interval: float = POLL_SECONDS) -> Iterator[None]:
    """Yield once per poll until ``timeout`` seconds have passed, sleeping ``interval`` between.

    The caller breaks out when what it waits for has happened; running out of
    polls means it did not happen within the bound.
    """
    deadline = time.monotonic() + timeout
    while True:
        yield
        if time.monotonic() >= deadline:
            return
        time.sleep(interval)
