"""The emulation against a real prefork worker: same faults, same outcome, on both brokers."""

from __future__ import annotations

import pytest
import realapp

from pytest_celery_faults import CeleryFaults
from pytest_celery_faults.real.compare import emulated_view
from pytest_celery_faults.real.runner import RealBrokerRunner, RealOutcome

pytestmark = pytest.mark.real_broker

SCENARIOS = [
    ("early", None),
    ("early", "sigkill@1"),
    ("early", "exit(3)@1"),
    ("early", "sigterm@1"),
    ("early", "power_loss@1"),
    ("late", "sigkill@1"),
    ("late", "exit(3)@1"),
    ("late", "sigterm@1"),
    ("late", "power_loss@1"),
    ("late_requeue", "sigkill@1"),
    ("late_requeue", "exit(3)@1"),
    ("late_requeue", "sigterm@1"),
    ("late_requeue", "power_loss@0"),
    ("late_drop", "sigkill@1"),
    ("late_drop", "exit(3)@1"),
    ("failing", None),
]


#: The ack table's endings that are the task body's doing, on each configuration.
CONFIGURATIONS = ("early", "late", "late_requeue", "late_drop")
ENDINGS = ("exception", "retry", "reject_requeue", "reject_drop", "ignore")


def emulate(profile: str, name: str, spec: str | None, *args: str) -> dict[str, object]:
    task = realapp.app.tasks[f"realapp.{name}"]
    with CeleryFaults(realapp.app, profile=profile) as faults:
        faults.track("realapp.effect")
        outcome = faults.run(task.s(*args), *([spec] if spec else []))
    return emulated_view(outcome)


def observed_view(real: RealOutcome) -> dict[str, object]:
    return {
        "executions": real.executions,
        "state": real.state,
        "exception": real.exception,
        "lost": real.lost,
    }


@pytest.mark.parametrize(("name", "spec"), SCENARIOS, ids=[f"{n}-{s}" for n, s in SCENARIOS])
def test_real_worker_matches_the_emulation(
    runner: RealBrokerRunner, name: str, spec: str | None
) -> None:
    real = runner.run(f"realapp.{name}", spec=spec)
    observed = observed_view(real)
    predicted = emulate(runner.profile, name, spec)
    assert observed == predicted, (
        f"{runner.profile}: realapp.{name} under {spec!r}\n"
        f"real:      {observed}\nemulated:  {predicted}\nreal records:\n{real.timeline()}"
    )
    if real.executions > 1:
        assert real.redelivered[1:] == [True] * (real.executions - 1)
    if (
        spec
        and spec.startswith("power_loss")
        and not realapp.app.tasks[f"realapp.{name}"].acks_late
    ):
        # The emulation acks an early-ack task before its body; the real kill must
        # come after the parent's ack too, or the comparison is a race.
        events = [entry["event"] for entry in real.log if entry["event"] in ("acked", "fault")]
        assert events == ["acked", "fault"], real.timeline()


@pytest.mark.parametrize("ending", ENDINGS)
@pytest.mark.parametrize("name", CONFIGURATIONS)
def test_real_worker_matches_the_emulation_for_each_body_ending(
    runner: RealBrokerRunner, name: str, ending: str
) -> None:
    real = runner.run(f"realapp.{name}", (ending,))
    observed = observed_view(real)
    predicted = emulate(runner.profile, name, None, ending)
    assert observed == predicted, (
        f"{runner.profile}: realapp.{name}({ending!r})\n"
        f"real:      {observed}\nemulated:  {predicted}\nreal records:\n{real.timeline()}"
    )


@pytest.mark.parametrize("runner", ["redis"], indirect=True)
def test_redis_waits_for_the_visibility_timeout_before_redelivering(
    runner: RealBrokerRunner,
) -> None:
    real = runner.run("realapp.late", spec="power_loss@1")
    assert (real.executions, real.redelivered, real.state) == (2, [False, True], "SUCCESS")
    realapp.app.conf.broker_transport_options = {"visibility_timeout": runner.visibility_timeout}
    try:
        with CeleryFaults(realapp.app, profile="redis") as faults:
            faults.track("realapp.effect")
            faults.run(realapp.late.s(), "power_loss@1")
            assert faults.clock.elapsed == pytest.approx(runner.visibility_timeout)
    finally:
        realapp.app.conf.broker_transport_options = {}
