"""redis-py under faults: every command is a side effect (real Redis or fakeredis).

Every command of ``redis.Redis`` (and so of ``fakeredis.FakeRedis``, its
subclass) goes through ``execute_command``; a pipeline sends its commands in
one ``execute``, one side effect. A command that raises (a dropped connection)
is an attempted effect: it may have run on the server.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis
import redis.client

from ..engine.effects import EffectLog, Patch, perform_attempt

if TYPE_CHECKING:
    from ..harness import CeleryFaults


def track_redis(harness: CeleryFaults) -> None:
    """Count each redis-py command (and each pipeline ``execute``) as a side effect."""
    log = harness.effects
    for patch in (
        Patch(redis.Redis, "execute_command", _counted_command(log, redis.Redis.execute_command)),
        Patch(redis.client.Pipeline, "execute", _counted_pipeline(log)),
    ):
        harness.on_stop(patch.undo)


def _counted_command(log: EffectLog, command: Callable[..., Any]) -> Callable[..., Any]:
    def execute_command(client: Any, *args: Any, **options: Any) -> Any:
        label = " ".join(str(arg) for arg in args[:2])
        return perform_attempt(log, "redis", label, lambda: command(client, *args, **options))

    return execute_command


def _counted_pipeline(log: EffectLog) -> Callable[..., Any]:
    execute = redis.client.Pipeline.execute

    def counted(pipeline: Any, raise_on_error: bool = True) -> Any:
        names = " ".join(str(command[0][0]) for command in pipeline.command_stack)
        label = f"pipeline {names}".rstrip()
        return perform_attempt(log, "redis", label, lambda: execute(pipeline, raise_on_error))

    return counted
