"""The emulation against a real prefork worker: same faults, same outcome, on both brokers.

Every cell of the pinned ack table (configuration x ending), then every other
form of the fault grammar and the canvases. Each scenario runs on the real
worker first, then in the emulation, through the code path real-broker mode
uses (``RealComparison``): state, exception, result, retries, executions,
each delivery's side effects, and the faults that fired must all agree.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import realapp
from celery import chain, chord, group

from pytest_celery_faults import CeleryFaults, ack_table
from pytest_celery_faults.real.compare import RealComparison
from pytest_celery_faults.real.plan import RESTORE_SWEEP_EVERY_SECOND
from pytest_celery_faults.real.runner import RealBrokerRunner

pytestmark = pytest.mark.real_broker

#: The ack table's columns: the body's ending (its argument) and the fault spec.
ENDINGS: dict[str, tuple[str, str | None]] = {
    "success": ("success", None),
    "exception": ("exception", None),
    "Reject(requeue=True)": ("reject_requeue", None),
    "Reject(requeue=False)": ("reject_drop", None),
    "Ignore": ("ignore", None),
    "sys.exit": ("success", "exit(1)@1"),
    "SIGKILL": ("success", "sigkill@1"),
    "SIGTERM": ("success", "sigterm@1"),
    "time limit": ("success", "timeout@1"),
    "power loss": ("success", "power_loss@1"),
    "ack lost": ("success", "ack_lost"),
}
CELLS = list(itertools.product(realapp.CONFIGURATIONS, ENDINGS))


def conform(runner: RealBrokerRunner, signature: Any, *specs: str) -> None:
    """Run ``signature`` under ``specs`` on the real worker, then emulated; fail if they differ."""
    with CeleryFaults(realapp.app, profile=runner.profile) as faults:
        faults.track("realapp.effect")
        comparison = RealComparison(faults, runner)
        try:
            faults.run(signature, *specs)
        finally:
            comparison.uninstall()


def test_the_cells_are_the_whole_pinned_ack_table() -> None:
    """A column or a configuration added to the ack table must be added here too."""
    assert list(ENDINGS) == list(ack_table.ENDINGS)
    rows = {
        (
            bool(options.get("acks_late")),
            bool(options.get("reject_on_worker_lost")),
            options.get("acks_on_failure_or_timeout", True),
        )
        for options in realapp.CONFIGURATIONS.values()
    }
    table = {
        config
        for config in itertools.product([False, True], [False, True], [True, False])
        if config[0] or config == (False, False, True)
    }
    assert rows == table


@pytest.mark.parametrize(("configuration", "ending"), CELLS, ids=[f"{c}-{e}" for c, e in CELLS])
def test_every_cell_of_the_ack_table(
    runner: RealBrokerRunner, configuration: str, ending: str
) -> None:
    argument, spec = ENDINGS[ending]
    # Time limits get tasks of their own: a short limit would beat billiard's
    # report of a killed child, and the other cells would see the limit instead.
    name = f"{configuration}_timed" if ending == "time limit" else configuration
    task = realapp.app.tasks[f"realapp.{name}"]
    conform(runner, task.s(argument), *([spec] if spec else []))


GRAMMAR = {
    "raise": (lambda: realapp.late.s(), ["raise(ValueError)@1"]),
    "raise-before-the-first": (lambda: realapp.late_requeue.s(), ["raise(KeyError)@0"]),
    "soft-timeout": (lambda: realapp.late_timed.s(), ["soft_timeout@1"]),
    "redeliver-early": (lambda: realapp.early.s(), ["redeliver*2"]),
    "redeliver-late": (lambda: realapp.late.s(), ["redeliver"]),
    "steps-over-deliveries": (lambda: realapp.late_requeue.s(), ["sigkill@1;exit(3)@1"]),
    "ok-then-ack-lost": (lambda: realapp.late_requeue.s(), ["sigterm@0;ack_lost"]),
    "boundary-0": (lambda: realapp.late_requeue.s(), ["power_loss@0"]),
    "named-target-in-a-chain": (
        lambda: chain(realapp.early.si(), realapp.late_requeue.si()),
        ["realapp.late_requeue:sigkill@2"],
    ),
    "group": (
        lambda: group(realapp.late.si(), realapp.early.si()),
        ["realapp.early:exit(3)@1"],
    ),
    "chord": (
        lambda: chord([realapp.late_requeue.si(), realapp.late.si()], realapp.collect.s()),
        ["realapp.late_requeue:sigkill@1"],
    ),
    "warm-shutdown-early": (lambda: realapp.early.s(), ["warm_shutdown@1"]),
    "ignore-result": (lambda: realapp.quiet.s(), []),
    "ignore-result-ack-lost": (lambda: realapp.quiet.s(), ["ack_lost"]),
    "retry": (lambda: realapp.late.s("retry"), []),
    # a side effect a body hands to a thread is the body's: the fault fires after it
    "effect-on-a-thread": (lambda: realapp.threaded.s(), ["sigkill@1"]),
    # messages the worker cannot take: Celery's consumer refuses them
    "unregistered-task": (lambda: realapp.app.signature("realapp.nobody_has_it"), []),
    "refused-serializer": (lambda: realapp.pickled.s().set(serializer="pickle"), []),
}


@pytest.mark.parametrize("case", sorted(GRAMMAR))
def test_every_form_of_the_grammar(runner: RealBrokerRunner, case: str) -> None:
    make, specs = GRAMMAR[case]
    conform(runner, make(), *specs)


@pytest.mark.parametrize("runner", ["redis"], indirect=True)
def test_redis_waits_for_the_visibility_timeout_before_redelivering(
    runner: RealBrokerRunner,
) -> None:
    real = runner.run("realapp.late", spec="power_loss@1")
    assert (real.executions, real.redelivered, real.state) == (2, [False, True], "SUCCESS")
    realapp.app.conf.broker_transport_options = {
        "visibility_timeout": runner.visibility_timeout,
        **RESTORE_SWEEP_EVERY_SECOND,
    }
    try:
        with CeleryFaults(realapp.app, profile="redis") as faults:
            faults.track("realapp.effect")
            faults.run(realapp.late.s(), "power_loss@1")
            assert faults.clock.elapsed == pytest.approx(runner.visibility_timeout)
    finally:
        realapp.app.conf.broker_transport_options = {}
