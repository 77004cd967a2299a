"""assert_idempotent and sweep catch real non-idempotent tasks and pass their fixed twins."""

from __future__ import annotations

import pytest

SHOP = """
from celery import Celery

app = Celery("store", set_as_current=False)
db = {"counter": 0, "emails": [], "sent_marks": set(), "charges": [], "shipments": []}


def reset():
    db["counter"] = 0
    db["emails"].clear()
    db["sent_marks"].clear()
    db["charges"].clear()
    db["shipments"].clear()


def observe():
    return {k: sorted(v) if isinstance(v, set) else v for k, v in db.items()}


def send_email(order):
    db["emails"].append(order)


def mark_sent(order):
    db["sent_marks"].add(order)


def charge_card(order, key=None):
    if key is None or key not in [k for _, k in db["charges"]]:
        db["charges"].append((order, key))


late = dict(acks_late=True, reject_on_worker_lost=True, shared=False)


@app.task(name="store.count_up", **late)
def count_up():
    db["counter"] = db["counter"] + 1
    send_email("counted")


@app.task(name="store.count_set", **late)
def count_set():
    db["counter"] = 1
    if "counted" not in db["emails"]:
        send_email("counted")


@app.task(name="store.email_first", **late)
def email_first(order):
    if order not in db["sent_marks"]:
        send_email(order)
        mark_sent(order)


@app.task(name="store.mark_first", **late)
def mark_first(order):
    # claim the row before sending; a crash after the claim loses the e-mail
    # instead of duplicating it, which observe() shows as a changed outcome too
    if order not in db["sent_marks"]:
        mark_sent(order)
        send_email(order)


@app.task(name="store.charge", **late)
def charge(order):
    charge_card(order)


@app.task(name="store.charge_keyed", **late)
def charge_keyed(order):
    charge_card(order, key=f"order-{order}")


@app.task(name="store.ship", **late)
def ship(order):
    if order not in db["shipments"]:
        db["shipments"].append(order)


@app.task(name="store.checkout", **late)
def checkout(order):
    charge_card(order, key=f"order-{order}")
    ship.delay(order)
"""

CONFTEST = """
import pytest
import store


@pytest.fixture
def tracked(celery_faults):
    for name in ("send_email", "mark_sent", "charge_card"):
        celery_faults.track(f"store.{name}")
    return celery_faults
"""


@pytest.fixture
def store(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(store=SHOP)
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\ncelery_faults_app = store:app\n")
    return pytester


def test_increment_is_caught_and_the_set_passes(store: pytest.Pytester) -> None:
    store.makepyfile(
        test_counter="""
        import store

        def test_count_up(tracked):
            tracked.assert_idempotent(store.count_up.s(), store.observe, store.reset)

        def test_count_set(tracked):
            tracked.assert_idempotent(store.count_set.s(), store.observe, store.reset)
        """
    )
    result = store.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*store.count_up is not idempotent: * of * fault scenario(s) changed the outcome*",
            "*under 'ack_lost' (replay: celery_faults.run(signature, 'ack_lost')):*",
            "*a side effect was duplicated or changed: the task ran 2 time(s) over 2 deliveries*",
            "*-*'counter': 1*",
            "*+*'counter': 2*",
            "*timeline:*",
            "*delivered to celery@faults-1#* (redelivered=True)*",
        ]
    )


def test_charge_without_key_is_caught_and_keyed_passes(store: pytest.Pytester) -> None:
    store.makepyfile(
        test_charge="""
        import store

        def test_charge(tracked):
            tracked.assert_idempotent(store.charge.s(7), store.observe, store.reset)

        def test_charge_keyed(tracked):
            tracked.assert_idempotent(store.charge_keyed.s(7), store.observe, store.reset)
        """
    )
    result = store.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*store.charge is not idempotent*"])


def test_email_before_mark_with_a_crash_between(store: pytest.Pytester) -> None:
    store.makepyfile(
        test_email="""
        import store

        def test_email_first(tracked):
            tracked.assert_idempotent(
                store.email_first.s(3), store.observe, store.reset, specs=["power_loss@1"]
            )
        """
    )
    result = store.runpytest("-p", "no:randomly")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*under 'power_loss@1'*",
            "*+*'emails': [[]3, 3[]]*",
        ]
    )


def test_child_published_once_then_crash_is_absorbed_by_an_idempotent_child(
    store: pytest.Pytester,
) -> None:
    store.makepyfile(
        test_checkout="""
        import store

        def test_checkout(tracked):
            tracked.assert_idempotent(store.checkout.s(5), store.observe, store.reset)

        def test_checkout_publishes_the_child_twice_under_a_crash_after_publishing(tracked):
            outcome = tracked.run(store.checkout.s(5), "store.checkout:sigkill@2")
            ships = [e for e in tracked.effects if e.kind == "publish"]
            assert outcome.state == "SUCCESS"
            assert len(ships) == 2
        """
    )
    store.runpytest("-p", "no:randomly").assert_outcomes(passed=2)


def test_explicit_specs_that_never_fire_fail(store: pytest.Pytester) -> None:
    store.makepyfile(
        test_unfired="""
        import store

        def test_x(tracked):
            tracked.assert_idempotent(
                store.count_set.s(), store.observe, store.reset, specs=["sigkill@9"]
            )
        """
    )
    result = store.runpytest("-p", "no:randomly")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*spec(s) 'sigkill@9' never fired against store.count_set (the fault-free run reached 1*"]
    )


def test_lost_message_is_told_apart_from_duplication(store: pytest.Pytester) -> None:
    store.makepyfile(
        test_lost="""
        import store
        from celery import Celery

        def test_early_ack(tracked):
            store.count_set.acks_late = False
            try:
                tracked.assert_idempotent(
                    store.count_set.s(), store.observe, store.reset, specs=["power_loss@0"]
                )
            finally:
                store.count_set.acks_late = True
        """
    )
    result = store.runpytest("-p", "no:randomly")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*the task's fate changed: lost (None) where the fault-free run ended SUCCESS*"]
    )


def test_sweep_orders_failures_simplest_first_and_replays_them(store: pytest.Pytester) -> None:
    store.makepyfile(
        test_sweep="""
        import store

        def test_sweep(tracked):
            report = tracked.sweep(store.email_first.s(1), store.observe, store.reset)
            failures = report.failures
            assert failures, report.summary()
            # simplest first: one fault, at the earliest boundary that breaks it
            assert ";" not in failures[0].spec and failures[0].spec.endswith("@1")
            assert "sigkill@1" in [f.spec for f in failures]
            counts = [len(f.spec.split(";")) for f in failures]
            assert counts == sorted(counts)
            # a replay reproduces the failure exactly
            tracked.reset(); store.reset()
            tracked.run(store.email_first.s(1), failures[0].replay)
            assert store.observe() == failures[0].observed
            assert any(";" in f.spec for f in failures)  # pairs over two deliveries

        def test_sweep_of_an_idempotent_task_is_ok(tracked):
            report = tracked.sweep(store.count_set.s(), store.observe, store.reset)
            report.assert_ok()
            assert len(report.scenarios) > 20
        """
    )
    store.runpytest("-p", "no:randomly").assert_outcomes(passed=2)
