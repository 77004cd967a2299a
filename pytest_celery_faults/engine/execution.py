"""The record of one execution: what happened to one delivery in a worker.

The worker's child fills it as the task runs (:mod:`.child`); the pool
writes how it ended (:mod:`.pool`); the history keeps it for outcomes and
timelines (:mod:`.history`), without knowing the worker.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..grammar import Step
from ..vocabulary import Ending


@dataclass
class ExecutionRecord:
    """What happened to one delivery in the worker, for outcomes and timelines."""

    task_id: str
    task_name: str
    delivery: int
    worker: str
    step: Step | None
    started: bool = False
    fired: Step | None = None
    fired_after: int | None = None
    ended: Ending = ""
    effects: int = 0
