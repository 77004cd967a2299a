"""The engine: Celery's own Request decides, the harness shows it."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from celery import Celery
from releases import BILLIARD, CELERY

from pytest_celery_faults import CeleryFaults, DrainError, UnfiredFaultError

calls: list[Any] = []


def side_effect(value: Any) -> None:
    calls.append(value)


@pytest.fixture(autouse=True)
def _clear_calls() -> None:
    calls.clear()


def make_task(app: Celery, **options: Any) -> Any:
    @app.task(name="tests.two_effects", bind=True, shared=False, **options)
    def two_effects(self: Any, x: int) -> int:
        side_effect(("first", x))
        side_effect(("second", x))
        return x * 2

    return two_effects


def test_fault_free_run_acks_and_stores_the_result(app: Celery) -> None:
    task = make_task(app)
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.side_effect")
        outcome = faults.run(task.s(21))
    assert (outcome.state, outcome.result, outcome.acked) == ("SUCCESS", 42, True)
    assert (outcome.deliveries, outcome.executions, outcome.lost) == (1, 1, False)
    assert [e.index for e in faults.effects] == [1, 2]
    assert faults.ledger.kinds(outcome.task_id) == ["published", "delivered", "acked"]


def test_sigkill_with_reject_on_worker_lost_requeues_and_reruns(app: Celery) -> None:
    task = make_task(app, acks_late=True, reject_on_worker_lost=True)
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.side_effect")
        outcome = faults.run(task.s(1), "sigkill@1")
    assert outcome.rejected == "requeue"
    assert (outcome.deliveries, outcome.executions, outcome.state) == (2, 2, "SUCCESS")
    # the first side effect ran twice: at-least-once, visible
    assert calls == [("first", 1), ("first", 1), ("second", 1)]
    assert "FAULT sigkill@1 after 1 side effect(s)" in str(outcome.timeline)


def test_early_ack_and_sigkill_loses_the_message(app: Celery) -> None:
    task = make_task(app)
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.side_effect")
        outcome = faults.run(task.s(1), "sigkill@1")
    assert outcome.lost and outcome.acked
    assert outcome.state == "FAILURE"
    assert str(outcome.exception) == "Worker exited prematurely: signal 9 (SIGKILL) Job: 0."
    assert calls == [("first", 1)]  # nothing after the crash ran


def test_nothing_after_the_crash_runs_even_in_finally(app: Celery) -> None:
    @app.task(name="tests.with_finally", acks_late=True, shared=False)
    def with_finally() -> None:
        try:
            side_effect("work")
        finally:
            side_effect("cleanup")

    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.side_effect")
        outcome = faults.run(with_finally.s(), "sigkill@1")
    assert calls == ["work"]
    assert outcome.state == "FAILURE"


def test_exit_reports_exitcode_like_billiard(app: Celery) -> None:
    task = make_task(app, acks_late=True, reject_on_worker_lost=False)
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.side_effect")
        outcome = faults.run(task.s(1), "exit(3)@1")
    # billiard 4.3 reports the child's SystemExit as the job's result and Celery 5.7's
    # Request._worker_lost_info words it; billiard 4.2's child dies with exit code 3 and
    # its Pool.mark_as_worker_lost names the job (job 0: the pool's first).
    expected = "Worker exited prematurely: exitcode 3" + (
        "." if BILLIARD >= (4, 3) else " Job: 0."
    )
    assert str(outcome.exception) == expected
    assert (outcome.acked, outcome.lost, outcome.deliveries) == (True, True, 1)


def test_power_loss_restores_unacked_on_rabbitmq_at_once(app: Celery) -> None:
    task = make_task(app, acks_late=True)
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.side_effect")
        outcome = faults.run(task.s(1), "power_loss@1")
        assert faults.clock.elapsed == 0
    assert (outcome.deliveries, outcome.state, outcome.lost) == (2, "SUCCESS", False)
    assert "back in the queue: connection lost" in outcome.timeline.texts()


def test_power_loss_on_redis_waits_for_the_visibility_timeout(app: Celery) -> None:
    # ... and for the next restore sweep: kombu's default cadence sweeps every 100 s
    app.conf.broker_transport_options = {"visibility_timeout": 30}
    task = make_task(app, acks_late=True)
    with CeleryFaults(app, profile="redis") as faults:
        faults.track(f"{__name__}.side_effect")
        outcome = faults.run(task.s(1), "power_loss@1")
        assert faults.clock.elapsed == pytest.approx(100)
    assert (outcome.deliveries, outcome.state) == (2, "SUCCESS")


def test_power_loss_with_early_ack_loses_the_message(app: Celery) -> None:
    task = make_task(app)
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.side_effect")
        outcome = faults.run(task.s(1), "power_loss@1")
    assert outcome.lost and outcome.state == "PENDING" and outcome.deliveries == 1


def test_redis_duplicates_a_countdown_longer_than_the_visibility_timeout(app: Celery) -> None:
    app.conf.broker_transport_options = {"visibility_timeout": 60}
    task = make_task(app, acks_late=True)
    with CeleryFaults(app, profile="redis") as faults:
        faults.track(f"{__name__}.side_effect")
        result = task.apply_async((5,), countdown=150)
        faults.drain()
        outcome = faults.outcome(result.id)
    assert outcome.executions >= 2, outcome
    assert calls.count(("first", 5)) == outcome.executions


def test_rabbitmq_runs_a_long_countdown_once(app: Celery) -> None:
    task = make_task(app, acks_late=True)
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.side_effect")
        result = task.apply_async((5,), countdown=150)
        faults.drain()
        assert faults.clock.elapsed == pytest.approx(150, abs=1)
        outcome = faults.outcome(result.id)
    assert (outcome.executions, outcome.deliveries) == (1, 1)


def test_retries_run_on_the_virtual_clock(app: Celery) -> None:
    attempts: list[int] = []

    @app.task(name="tests.flaky", bind=True, max_retries=3, default_retry_delay=600, shared=False)
    def flaky(self: Any) -> str:
        attempts.append(self.request.retries)
        if self.request.retries < 2:
            raise self.retry()
        return "done"

    with CeleryFaults(app) as faults:
        outcome = faults.run(flaky.s())
        assert faults.clock.elapsed == pytest.approx(1200, abs=1)
    assert attempts == [0, 1, 2]
    assert (outcome.state, outcome.result, outcome.retries) == ("SUCCESS", "done", 2)


def test_a_task_that_requeues_forever_stops_with_an_error_naming_it(app: Celery) -> None:
    from celery.exceptions import Reject

    @app.task(name="tests.forever", acks_late=True, shared=False)
    def forever() -> None:
        raise Reject("again", requeue=True)

    with CeleryFaults(app, max_executions=50) as faults:
        forever.delay()
        with pytest.raises(DrainError, match=r"tests\.forever \(5\d deliveries\)"):
            faults.drain()


def test_unfired_spec_fails_with_a_reason(app: Celery) -> None:
    task = make_task(app)
    unfired = pytest.raises(UnfiredFaultError, match=r"sigkill@5 \(delivery 1\) never fired")
    with unfired, CeleryFaults(app) as faults:
        faults.track(f"{__name__}.side_effect")
        faults.run(task.s(1), "sigkill@5")


@pytest.mark.parametrize(("acks_late", "fault_line"), [(True, 3), (False, 1)])
def test_a_lost_ack_fires_when_the_ack_is_sent(
    app: Celery, acks_late: bool, fault_line: int
) -> None:
    task = make_task(app, acks_late=acks_late)
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.side_effect")
        outcome = faults.run(task.s(1), "ack_lost")
    first_delivery = outcome.timeline.texts()[1:5]
    assert first_delivery[fault_line].startswith("FAULT ack_lost"), first_delivery
    assert outcome.deliveries == 2


def test_a_lost_ack_never_fires_on_a_message_that_is_never_acked(app: Celery) -> None:
    @app.task(name="tests.refused", shared=False, acks_late=True, acks_on_failure_or_timeout=False)
    def refused() -> None:
        raise ValueError("no")

    unfired = pytest.raises(UnfiredFaultError, match=r"ack_lost \(delivery 1\) never fired")
    with unfired, CeleryFaults(app) as faults:
        faults.run(refused.s(), "ack_lost")


def test_redeliver_delivers_each_message_again_marked_redelivered(app: Celery) -> None:
    seen: list[bool] = []

    @app.task(name="tests.seen", bind=True, shared=False)
    def record(self: Any) -> None:
        seen.append(self.request.delivery_info["redelivered"])

    with CeleryFaults(app) as faults:
        outcome = faults.run(record.s(), "redeliver*2")
    assert seen == [False, True, True]
    assert outcome.deliveries == 3


def test_app_configuration_is_restored(app: Celery) -> None:
    app.conf.task_always_eager = True
    task = make_task(app)
    app.finalize()
    before = dict(app.conf.changes)
    backend_before = app.backend
    with CeleryFaults(app) as faults:
        faults.run(task.s(1))
        assert app.conf.task_always_eager is False
    assert dict(app.conf.changes) == before
    assert app.backend is backend_before


class DjangoStyleSettings:
    """Celery's Django guide: ``config_from_object(settings, namespace="CELERY")``."""

    CELERY_TASK_ALWAYS_EAGER = True
    CELERY_BROKER_URL = "redis://127.0.0.1:1/0"  # never reached: nothing listens on port 1
    CELERY_RESULT_BACKEND = "redis://127.0.0.1:1/1"
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 60}


class PlainSettings:
    task_always_eager = True
    broker_url = "redis://127.0.0.1:1/0"
    result_backend = "redis://127.0.0.1:1/1"


def configured_app(way: str, monkeypatch: pytest.MonkeyPatch) -> Celery:
    project = Celery(f"configured-{way}", set_as_current=False)
    if way == "namespace":
        project.config_from_object(DjangoStyleSettings, namespace="CELERY")
    elif way == "config_from_object":
        project.config_from_object(PlainSettings)
    elif way == "conf.update":
        project.conf.update(
            task_always_eager=True,
            broker_url="redis://127.0.0.1:1/0",
            broker_read_url="redis://127.0.0.1:1/2",
            result_backend="redis://127.0.0.1:1/1",
        )
    else:  # Settings.broker_url and friends read these before any setting
        for name in ("CELERY_BROKER_URL", "CELERY_BROKER_READ_URL", "CELERY_BROKER_WRITE_URL"):
            monkeypatch.setenv(name, "redis://127.0.0.1:1/0")
        monkeypatch.setenv("CELERY_RESULT_BACKEND", "redis://127.0.0.1:1/1")
    return project


@pytest.mark.parametrize("way", ["namespace", "config_from_object", "conf.update", "environment"])
def test_what_the_harness_sets_wins_however_the_app_was_configured(
    way: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(#19.1) Celery 5.3 to 5.6 read CELERY_TASK_ALWAYS_EAGER before the harness's override."""
    project = configured_app(way, monkeypatch)
    task = make_task(project)
    project.finalize()
    before = {
        name: project.conf.get(name)
        for name in ("task_always_eager", "broker_url", "broker_read_url", "result_backend")
    }
    with CeleryFaults(project) as faults:
        faults.track(f"{__name__}.side_effect")
        outcome = faults.run(task.s(1))
        conf = project.conf
        assert conf.task_always_eager is False
        assert conf.broker_url == conf.broker_read_url == conf.broker_write_url
        assert conf.broker_url == faults.broker.url
        assert project.backend is faults.backend
        if way == "namespace":  # the project's transport options are kept beside the harness's
            assert conf.broker_transport_options["visibility_timeout"] == 60
    assert (outcome.state, outcome.deliveries, outcome.acked) == ("SUCCESS", 1, True)
    assert faults.ledger.kinds(outcome.task_id) == ["published", "delivered", "acked"]
    after = {name: project.conf.get(name) for name in before}
    assert after == before  # the project's own settings read as before
    project.close()


@pytest.mark.skipif(CELERY < (5, 7), reason="Settings.copy() fails on its own before 5.7")
def test_a_copy_of_the_settings_reads_as_the_app_does_under_the_harness(app: Celery) -> None:
    """``app.conf.copy()`` (Celery's Settings.copy) works while the harness holds the app."""
    app.conf.broker_url = "redis://127.0.0.1:1/0"
    app.finalize()
    with CeleryFaults(app) as faults:
        copied = app.conf.copy()
        copied.task_default_queue = "elsewhere"  # a write to the copy
        assert copied.task_always_eager is False
        assert app.conf.task_default_queue == "celery"
        assert faults.broker.url == app.conf.broker_url
    assert copied.broker_url == faults.broker.url  # a copy of the settings of that moment


def test_an_app_the_harness_cannot_take_over_is_refused_in_one_line(app: Celery) -> None:
    """(#19.1) A settings class that answers task_always_eager itself: refused, app restored."""
    task = make_task(app)
    app.finalize()
    own = type(app.conf)
    stubborn = type("StubbornSettings", (own,), {"task_always_eager": property(lambda _: True)})
    object.__setattr__(app.conf, "__class__", stubborn)
    before = dict(app.conf.changes)
    with pytest.raises(RuntimeError) as refused:
        CeleryFaults(app).start()
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"celery_faults: cannot take the app {app.main!r} over")
    assert "task_always_eager reads True" in message
    assert type(app.conf) is stubborn
    assert dict(app.conf.changes) == before
    object.__setattr__(app.conf, "__class__", own)
    with CeleryFaults(app) as faults:  # the app was given back whole
        assert faults.run(task.s(1)).state == "SUCCESS"


def test_stop_runs_every_restore_step_when_some_fail(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = make_task(app, acks_late=True)
    app.finalize()
    before = dict(app.conf.changes)
    backend_before = app.backend
    untracked = side_effect
    faults = CeleryFaults(app)
    faults.start()
    faults.track(f"{__name__}.side_effect")
    assert faults.run(task.s(1)).state == "SUCCESS"

    def failing(step: Any, text: str) -> Any:
        def run(*args: Any, **kwargs: Any) -> None:
            step(*args, **kwargs)  # it does its work (nothing leaks), then fails
            raise RuntimeError(text)

        return run

    # The first two steps to run: all those after them must still run.
    monkeypatch.setattr(faults.checks, "stop", failing(faults.checks.stop, "checks"))
    monkeypatch.setattr(faults.http, "stop", failing(faults.http.stop, "http"))
    with pytest.raises(BaseExceptionGroup) as raised:
        faults.stop()
    assert [str(failure) for failure in raised.value.exceptions] == ["checks", "http"]
    assert side_effect is untracked
    assert dict(app.conf.changes) == before
    assert app.backend is backend_before
    assert not faults.active
    task.apply(args=(2,))  # the app runs eagerly again, off the in-memory broker
    assert calls[-1] == ("second", 2)


def test_a_start_that_fails_half_way_undoes_what_it_did(app: Celery) -> None:
    """(#19.11) The app, the signals and the HTTP mock are as before; a second harness works."""
    import requests.adapters
    from celery import signals

    task = make_task(app)
    app.conf.worker_concurrency = "2"  # refused only after the app was taken over
    app.finalize()
    before = dict(app.conf.changes)
    backend_before = app.backend
    receivers = {
        name: list(getattr(signals, name).receivers)
        for name in ("task_prerun", "task_postrun", "before_task_publish")
    }
    send = requests.adapters.HTTPAdapter.send
    with pytest.raises(ValueError, match="worker_concurrency='2'"):
        CeleryFaults(app).start()
    assert dict(app.conf.changes) == before
    assert app.backend is backend_before
    assert {name: list(getattr(signals, name).receivers) for name in receivers} == receivers
    assert requests.adapters.HTTPAdapter.send is send  # the HTTP mock is inactive
    app.conf.worker_concurrency = 2
    with CeleryFaults(app) as faults:
        assert faults.run(task.s(1)).state == "SUCCESS"


def test_memory_mode_opens_no_socket(app: Celery, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"a socket was opened: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    task = make_task(app, acks_late=True)
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.side_effect")
        assert faults.run(task.s(1), "power_loss@1").state == "SUCCESS"


def test_two_harnesses_see_only_their_own_messages(app: Celery) -> None:
    task = make_task(app)
    with CeleryFaults(app) as first:
        task.delay(1)
        assert first.broker.ready_count() == 1
    with CeleryFaults(app) as second:
        assert second.broker.ready_count() == 0
        assert second.drain() == []


def test_cold_shutdown_early_ack_stores_retry_and_loses_the_message(app: Celery) -> None:
    task = make_task(app)
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.side_effect")
        outcome = faults.run(task.s(1), "cold_shutdown@1")
    # Celery 5.6's Consumer.cancel_active_requests (5.5's cancel_all_unacked_requests)
    # -> Request.cancel(emit_retry=True) stores RETRY. Celery 5.3 and 5.4 cancel no
    # request on a cold shutdown (WorkController.terminate kills the pool): nothing is
    # stored for the early-acked task.
    state = "RETRY" if CELERY >= (5, 5) else "PENDING"
    assert (outcome.state, outcome.lost, outcome.deliveries) == (state, True, 1)
    assert calls == [("first", 1)]


@pytest.mark.parametrize("profile", ["rabbitmq", "redis"])
def test_cold_shutdown_acks_late_restores_at_once(app: Celery, profile: str) -> None:
    task = make_task(app, acks_late=True)
    with CeleryFaults(app, profile=profile) as faults:
        faults.track(f"{__name__}.side_effect")
        outcome = faults.run(task.s(1), "cold_shutdown@1")
        assert faults.clock.elapsed == 0  # a closed connection, even on Redis
    assert (outcome.state, outcome.deliveries, outcome.lost) == ("SUCCESS", 2, False)


def test_warm_shutdown_finishes_the_task_and_returns_prefetched_messages(app: Celery) -> None:
    task = make_task(app, acks_late=True)
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.side_effect")
        faults.inject("tests.two_effects:warm_shutdown@1")
        first, second = task.delay(1), task.delay(2)
        faults.drain()
        one, two = faults.outcome(first.id), faults.outcome(second.id)
    assert (one.state, one.deliveries, one.acked) == ("SUCCESS", 1, True)
    # the second message was prefetched by the stopping worker: back, redelivered
    assert (two.state, two.deliveries) == ("SUCCESS", 2)
    assert calls == [("first", 1), ("second", 1), ("first", 2), ("second", 2)]


def test_run_binds_specs_to_the_first_task_of_a_chain(app: Celery) -> None:
    from celery import chain

    @app.task(name="tests.a", shared=False, acks_late=True, reject_on_worker_lost=True)
    def first(x: int) -> int:
        side_effect(("a", x))
        return x + 1

    @app.task(name="tests.b", shared=False)
    def second(x: int) -> int:
        side_effect(("b", x))
        return x * 10

    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.side_effect")
        outcome = faults.run(chain(first.s(1), second.s()), "sigkill@1")
    assert (outcome.name, outcome.result) == ("tests.b", 20)
    assert calls == [("a", 1), ("a", 1), ("b", 2)]


def test_a_message_expired_on_the_virtual_clock_is_revoked_by_celery(app: Celery) -> None:
    task = make_task(app)
    with CeleryFaults(app) as faults:
        result = task.apply_async((1,), countdown=120, expires=60)
        [outcome] = faults.drain()
    assert outcome.task_id == result.id
    assert (outcome.state, outcome.executions, outcome.acked) == ("REVOKED", 0, True)


def test_result_get_drains_instead_of_waiting(app: Celery) -> None:
    task = make_task(app)
    with CeleryFaults(app):
        assert task.delay(4).get() == 8


def test_sigterm_lets_finally_blocks_run_as_billiards_handler_does(app: Celery) -> None:
    # Measured on a real prefork worker: billiard's SIGTERM handler raises
    # SystemExit in the task, so cleanup code runs; the result is not reported.
    @app.task(name="tests.with_cleanup", acks_late=True, shared=False)
    def with_cleanup() -> None:
        try:
            side_effect("work")
        finally:
            side_effect("cleanup")

    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.side_effect")
        outcome = faults.run(with_cleanup.s(), "sigterm@1")
    assert calls == ["work", "cleanup"]
    assert str(outcome.exception) == "Worker exited prematurely: signal 15 (SIGTERM) Job: 0."


def test_executions_count_bodies_not_deliveries(app: Celery) -> None:
    # worker_deduplicate_successful_tasks: the redelivery after a lost ack is
    # recognised as done and its body skipped; and a fault at @0 comes before
    # the body. Neither is an execution (found by the ack-table work).
    app.conf.worker_deduplicate_successful_tasks = True
    task = make_task(app, acks_late=True, reject_on_worker_lost=True)
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.side_effect")
        deduplicated = faults.run(task.s(1), "ack_lost")
        killed_first = faults.run(task.s(2), "sigkill@0")
    assert (deduplicated.deliveries, deduplicated.executions) == (2, 1)
    assert (killed_first.deliveries, killed_first.executions) == (2, 1)


def _raise_through_frames(depth: int) -> None:
    if depth:
        _raise_through_frames(depth - 1)
    raise KeyError(f"deep {depth}")


def test_tracebacks_are_unchanged_by_the_code_summary_cache(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failures are cheaper in a harness (billiard's per-frame summaries are shared), same text."""
    import traceback

    monkeypatch.delenv("CELERY_FAULTS_NO_SPEEDUPS", raising=False)  # the cache is what it checks

    import billiard.einfo

    def exception_info() -> billiard.einfo.ExceptionInfo:
        try:
            _raise_through_frames(3)
        except KeyError:
            return billiard.einfo.ExceptionInfo()
        raise AssertionError("unreachable")

    def text(info: billiard.einfo.ExceptionInfo) -> tuple[str, list[str]]:
        return info.traceback, traceback.format_tb(info.tb)  # type: ignore[arg-type]

    outside = text(exception_info())
    other = Celery("other", set_as_current=False)
    with CeleryFaults(app), CeleryFaults(other):  # two harnesses at once, on two apps
        inside = text(exception_info())
        assert text(exception_info()) == inside  # from the cache, the second time
        assert billiard.einfo._Frame.Code is not billiard.einfo._Code
    assert inside == outside
    assert "_raise_through_frames(depth - 1)" in outside[0]
    assert billiard.einfo._Frame.Code is billiard.einfo._Code  # nothing outlives the harness


def test_the_engine_runs_without_the_harness_and_stop_undoes_its_one_stack(app: Celery) -> None:
    # The façade only shows what the engine wires: the engine alone publishes,
    # drains and gives the app back. (#23)
    from pytest_celery_faults.engine.core import Engine

    task = make_task(app, acks_late=True, reject_on_worker_lost=True)
    app.finalize()
    before = dict(app.conf.changes)
    engine = Engine(
        app, profile="rabbitmq", workers=1, seed=0, max_executions=10, deadline=lambda: None
    )
    engine.start()
    try:
        engine.arm_for(None, task.name, ["sigkill@0"])
        sent = task.delay(1)
        assert engine.drain_delivered() == [sent.id]
        assert engine.history.outcome(sent.id).deliveries == 2
    finally:
        engine.stop()
    assert not engine.active
    assert dict(app.conf.changes) == before
    assert task.apply(args=(2,)).get() == 4  # eager again, off the in-memory broker
