"""assert_idempotent and sweep catch real non-idempotent tasks and pass their fixed twins."""

from __future__ import annotations

import json

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


@app.task(name="store.email_lossy", acks_late=True, shared=False)
def email_lossy(order):
    # acks_late without reject_on_worker_lost: Celery acks a killed task, so it is lost
    if order not in db["sent_marks"]:
        send_email(order)
        mark_sent(order)


@app.task(name="store.quiet_set", ignore_result=True, **late)
def quiet_set():
    db["counter"] = 1
    if "counted" not in db["emails"]:
        send_email("counted")


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
            "*store.count_up is not idempotent: 5 of 8 fault scenario(s) duplicated or diverged.*",
            "*under 'ack_lost' (replay: celery_faults.run(signature, 'ack_lost')):*",
            "*  duplicated: the task ran 2 time(s) over 2 deliveries and repeated side effects "
            "(store.send_email x2 where the fault-free run had 1), changing what observe() sees",
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


def test_diverged_is_told_apart_from_duplicated(store: pytest.Pytester) -> None:
    store.makepyfile(
        test_diverged="""
        import store

        def test_mark_first(tracked):
            tracked.assert_idempotent(
                store.mark_first.s(3), store.observe, store.reset, specs=["sigkill@1"]
            )
        """
    )
    result = store.runpytest("-p", "no:randomly")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "E   *store.mark_first is not idempotent: 1 of 1 fault scenario(s) duplicated or "
            "diverged. The simplest:",
            "E   *under 'sigkill@1'*",
            "E   *diverged: the task ran 2 time(s) over 2 deliveries and observe() differs "
            "from the fault-free run (no tracked side effect was repeated)",
            "E   *-{*'emails': [[]3[]], 'sent_marks': [[]3[]]*",
            "E   *+{*'emails': [[][]], 'sent_marks': [[]3[]]*",
        ]
    )


EARLY_ACK = """
import pytest
import store


@pytest.fixture
def early(tracked):
    store.count_set.acks_late = False
    yield tracked
    store.count_set.acks_late = True


def test_idempotent_names_the_loss_and_passes(early):
    scenarios = early.assert_idempotent(
        store.count_set.s(), store.observe, store.reset, specs=["power_loss@0", "redeliver"]
    )
    assert [s.verdict for s in scenarios] == ["lost", "ok"]


def test_no_loss_fails_on_it(early):
    early.assert_no_loss(
        store.count_set.s(), store.observe, store.reset, specs=["power_loss@0", "redeliver"]
    )
"""


def test_lost_fails_only_the_loss_assertion(store: pytest.Pytester) -> None:
    store.makepyfile(test_lost=EARLY_ACK)
    result = store.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "E   *store.count_set can be lost: 1 of 2 fault scenario(s) lost its work "
            "(lost or partial). The simplest:",
            "E   *under 'power_loss@0'*",
            "E   *lost: the task never completed and nothing ran it again (the worker "
            "lost power; the broker holds no copy)",
            "*= celery-faults =*",
            "2 test(s) used the harness, 0 ran tasks eagerly through the gate: 1 task(s) "
            "exercised, 6 message(s), 4 fault(s) injected, 4 scenario(s) classed (seed 0)",
            "lost (never completed, nothing ran it again): "
            "test_lost.py::test_idempotent_names_the_loss_and_passes under 'power_loss@0'",
            "lost (never completed, nothing ran it again): "
            "test_lost.py::test_no_loss_fails_on_it under 'power_loss@0'",
        ]
    )


def test_partial_work_is_its_own_class(store: pytest.Pytester) -> None:
    store.makepyfile(
        test_partial="""
        import store

        def test_lossy(tracked):
            tracked.assert_no_loss(
                store.email_lossy.s(4), store.observe, store.reset,
                specs=["sigkill@0", "sigkill@1", "redeliver"],
            )
        """
    )
    result = store.runpytest("-p", "no:randomly")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "E   *store.email_lossy can be lost: 2 of 3 fault scenario(s) lost its work*",
            "E   *under 'sigkill@0'*",
            "E   *lost: the task never completed and nothing ran it again (its child "
            "process was killed; the broker holds no copy)",
            "E   *Other failing specs (replay each with celery_faults.run):",
            "E   *'sigkill@1': partial: the task was lost after 1 side effect(s) "
            "(store.send_email x1) and nothing ran it again (its child process was killed), "
            "leaving the world half done",
        ]
    )


def test_ignore_result_fates_come_from_what_the_worker_saw(store: pytest.Pytester) -> None:
    store.makepyfile(
        test_quiet="""
        import store

        def test_quiet(tracked):
            outcome = tracked.run(store.quiet_set.s())
            assert (outcome.state, outcome.ended, outcome.succeeded) == (
                "PENDING", "returned", True
            )
            tracked.reset(); store.reset()
            failed = tracked.run(store.quiet_set.s(), "raise(ValueError)@0")
            assert (failed.state, failed.ended, failed.succeeded) == ("PENDING", "raised", False)
            tracked.assert_idempotent(store.quiet_set.s(), store.observe, store.reset)
        """
    )
    store.runpytest("-p", "no:randomly").assert_outcomes(passed=1)


def test_the_report_carries_each_scenario_class(store: pytest.Pytester) -> None:
    store.makepyfile(test_lost=EARLY_ACK)
    store.runpytest("-p", "no:randomly", "--celery-faults-report=report.json")
    document = json.loads((store.path / "report.json").read_text())
    test = document["tests"]["test_lost.py::test_no_loss_fails_on_it"]
    assert [(s["spec"], s["class"]) for s in test["scenarios"]] == [
        ("power_loss@0", "lost"),
        ("redeliver", "ok"),
    ]
    assert test["scenarios"][0]["problem"].startswith("lost: the task never completed")
    assert document["totals"]["scenarios"] == 4


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


def test_a_sweep_keeps_the_timelines_of_its_findings_only(store: pytest.Pytester) -> None:
    store.makepyfile(
        test_sweep="""
        from pytest_celery_faults.verdicts.idempotency import NOT_KEPT
        import store

        def test_sweep(tracked):
            report = tracked.sweep(store.email_first.s(1), store.observe, store.reset)
            found, passed = report.failures[0], report.of_class("ok")[0]
            assert any("side effect 1" in line for line in found.outcome.timeline.texts())
            assert "timeline:" in found.describe(report.baseline)
            assert passed.outcome.timeline.texts() == [NOT_KEPT]
            assert passed.diff == ""
            assert "-" in found.diff and "+" in found.diff  # made from both observations
            assert "observe() differs" in found.describe(report.baseline)
            assert passed.outcome.deliveries >= 1  # the rest of its outcome stays
            tracked.reset(); store.reset()
            replayed = tracked.run(store.email_first.s(1), passed.replay)
            assert any("side effect 1" in line for line in replayed.timeline.texts())
        """
    )
    store.runpytest("-p", "no:randomly").assert_outcomes(passed=1)


def test_sweep_reports_every_class(store: pytest.Pytester) -> None:
    store.makepyfile(
        test_sweep="""
        import store

        def test_sweep(tracked):
            report = tracked.sweep(store.email_lossy.s(2), store.observe, store.reset)
            counts = report.counts()
            assert list(counts) == [
                "duplicated", "diverged", "partial", "lost", "ended_otherwise", "ok", "unfired"
            ]
            assert counts["partial"] and counts["lost"] and counts["duplicated"], counts
            losses = {s.spec: s.verdict for s in report.losses}
            assert (losses["sigkill@0"], losses["sigkill@1"]) == ("lost", "partial"), losses
            assert sum(counts.values()) == len(report.scenarios)
            print(report.summary())
        """
    )
    result = store.runpytest("-p", "no:randomly", "-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*scenarios: * duplicated, * partial, * lost, * ok*"])


ENDED_OTHERWISE = """
from celery import signals

import store


@store.app.task(name="store.ship_audited", shared=False)
def ship_audited(order):
    store.send_email(order)
    return order


@store.app.task(name="store.ship_plain", shared=False)
def ship_plain(order):
    if order not in store.db["emails"]:
        store.send_email(order)
    return order


@signals.task_postrun.connect
def audit(sender=None, task_id=None, **kwargs):
    # after Celery stored SUCCESS: two audit rows observe() does not look at
    if sender is not None and sender.name == "store.ship_audited":
        store.mark_sent(task_id)
        store.mark_sent(task_id)


def observe():
    return {"emails": list(store.db["emails"]), "shipments": list(store.db["shipments"])}


def test_killed_after_the_result_was_stored(tracked):
    specs = ["sigkill@2", "sigkill@3", "power_loss@2"]
    for check in (tracked.assert_no_loss, tracked.assert_idempotent):
        scenarios = check(ship_audited.s(1), observe, store.reset, specs=specs)
        assert [(s.verdict, s.outcome.state) for s in scenarios] == [
            ("ended_otherwise", "SUCCESS")
        ] * 3, [s.problem for s in scenarios]
        assert not any(s.failed for s in scenarios)
    assert scenarios[0].problem == (
        "ended otherwise: its child process was killed after its result was stored "
        "(SUCCESS) and nothing ran it again, but nothing was lost: observe() matches the "
        "fault-free run"
    )


def test_killed_after_its_last_side_effect(tracked):
    report = tracked.sweep(ship_plain.s(1), observe, store.reset)
    verdicts = {s.spec: s.verdict for s in report.scenarios}
    assert verdicts["sigkill@0"] == "lost"
    assert verdicts["sigkill@1"] == verdicts["power_loss@1"] == "ended_otherwise"
    assert [s.spec for s in report.ended_otherwise][:2] == ["cold_shutdown@1", "exit(1)@1"]
    report.assert_ok()
    assert "sigkill@1" not in [s.spec for s in report.losses]
    assert report.ended_otherwise[0].problem.startswith(
        "ended otherwise: the worker was shut down cold after its last side effect (1 done, "
        "state "
    )


def test_a_loss_names_them_apart(tracked):
    tracked.assert_no_loss(ship_plain.s(1), observe, store.reset, specs=["sigkill@0", "sigkill@1"])
"""


def test_a_task_killed_after_its_work_is_done_ended_otherwise(store: pytest.Pytester) -> None:
    store.makepyfile(test_ended=ENDED_OTHERWISE)
    result = store.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "E   *store.ship_plain can be lost: 1 of 2 fault scenario(s) lost its work*",
            "E   *under 'sigkill@0'*",
            "E   *Ended otherwise, nothing lost (no assertion fails on these):",
            "E   *'sigkill@1': ended otherwise: its child process was killed after its last "
            "side effect (1 done, state FAILURE) and nothing ran it again, but nothing was "
            "lost: observe() "
            "matches the fault-free run",
            "*= celery-faults =*",
            "ended_otherwise (went away after its work was done, nothing lost): "
            "test_ended.py::test_killed_after_the_result_was_stored under 'sigkill@2', "
            "'sigkill@3', 'power_loss@2'*",
        ]
    )
