"""The package's words for its ideas, typed once: fault kinds, endings, verdicts.

Each vocabulary is a ``Literal`` type with a constant per word, so a
misspelt word is a type error rather than a branch that never runs; the
modules that use a word import it from here.
"""

from __future__ import annotations

from typing import Final, Literal

# -- how an execution ended, as the worker saw it ------------------------------

#: How one execution of a task ended; ``""`` while it has not.
Ending = Literal["", "returned", "raised", "child killed", "exit", "power lost", "cold shutdown"]
RETURNED: Final = "returned"
RAISED: Final = "raised"  # an exception, a retry or a reject
CHILD_KILLED: Final = "child killed"  # a fatal signal, a hard time limit
EXITED: Final = "exit"  # sys.exit, os._exit
POWER_LOST: Final = "power lost"
COLD_SHUTDOWN: Final = "cold shutdown"
#: The endings where the process running the execution went away before the task ended.
CUT_SHORT: Final[frozenset[Ending]] = frozenset({CHILD_KILLED, EXITED, POWER_LOST, COLD_SHUTDOWN})
#: The endings where the task ran to an end of its own.
FINISHED: Final[frozenset[Ending]] = frozenset({RETURNED, RAISED})

# -- the verdict classes -------------------------------------------------------

#: The class a judged scenario gets (see :mod:`pytest_celery_faults.verdicts.classify`).
Verdict = Literal["duplicated", "diverged", "lost", "partial", "ended_otherwise", "ok"]
DUPLICATED: Final = "duplicated"
DIVERGED: Final = "diverged"
LOST: Final = "lost"
PARTIAL: Final = "partial"
ENDED_OTHERWISE: Final = "ended_otherwise"
OK: Final = "ok"
