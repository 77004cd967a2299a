"""What the plugin keeps between hooks: the keys of its entries in pytest's stashes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from ..harness import CeleryFaults
    from ..session.gate import EagerGate
    from ..session.report import SessionReport

#: The session's report (on the config): every test's record, written at the end.
report_key: pytest.StashKey[SessionReport] = pytest.StashKey()
#: Why the JSON report could not be written at the end of the session, for the summary.
report_error_key: pytest.StashKey[str] = pytest.StashKey()
#: The outcome of a test's call phase (on the item), for its record in the report.
verdict_key: pytest.StashKey[str] = pytest.StashKey()
#: The test's ``celery_faults`` harness (on the item), for its report.
harness_key: pytest.StashKey[CeleryFaults] = pytest.StashKey()
#: The test's eager gate (on the item), for its report.
gate_key: pytest.StashKey[EagerGate] = pytest.StashKey()
